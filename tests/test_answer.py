import pytest
import torch

from loramem.answer import Caches, module_applied, modules_applied
from loramem.config import LoraSpec
from loramem.errors import LoramemError
from loramem.train.adapters import attached, save_adapter


def _random_module(tiny, folder, seed: int, **spec):
    with attached(tiny.model, LoraSpec(rank=4, **({"layers": "all"} | spec)), seed=seed) as peft_model:
        gen = torch.Generator().manual_seed(seed)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=gen) * 0.05
        save_adapter(peft_model, folder)
    return folder


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("modules")
    return [_random_module(tiny, root / f"m{i}", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def ids(tiny):
    return tiny.tokenizer("Question: Who wrote the letter? Answer:", return_tensors="pt").input_ids


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


def test_linear_and_cat_average_the_modules(tiny, folders, ids):
    with modules_applied(tiny.model, folders, "linear") as m:
        linear = _logits(m, ids)
    with modules_applied(tiny.model, folders, "cat") as m:
        cat = _logits(m, ids)
    with modules_applied(tiny.model, folders, "ties", density=1.0, weights=[1 / 3] * 3) as m:
        ties_dense = _logits(m, ids)
    base = _logits(tiny.model, ids)
    assert torch.allclose(linear, cat, atol=1e-5)
    assert not torch.allclose(linear, base, atol=1e-3)
    # TIES keeps every entry at density 1, but still drops entries whose sign lost the election.
    assert not torch.allclose(ties_dense, linear, atol=1e-5)


def test_one_module_merged_alone_is_the_module(tiny, folders, ids):
    with module_applied(tiny.model, folders[0]) as m:
        single = _logits(m, ids)
    with modules_applied(tiny.model, folders[:1], "linear") as m:
        assert torch.equal(_logits(m, ids), single)
    with modules_applied(tiny.model, folders[:1], "ties", density=1.0) as m:
        assert torch.allclose(_logits(m, ids), single, atol=1e-5)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_weights_restored_bit_for_bit(tiny, folders, method):
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    with modules_applied(tiny.model, folders, method):
        changed = any(not torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())
    assert changed
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_low_rank_merges_run_beside_the_weights(tiny, folders, ids, method):
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    base = _logits(tiny.model, ids)
    with modules_applied(tiny.model, folders, method) as m:
        assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())  # no weight copied or changed
        assert not torch.allclose(_logits(m, ids), base, atol=1e-3)
    assert torch.equal(_logits(tiny.model, ids), base)


def test_one_module_equals_peft(tiny, folders, ids):
    from peft import PeftModel

    with module_applied(tiny.model, folders[0]) as m:
        ours = _logits(m, ids)
    peft_model = PeftModel.from_pretrained(tiny.model, folders[0])
    try:
        reference = _logits(peft_model, ids)
    finally:
        peft_model.unload()  # takes the LoRA layers out without merging them: the shared model stays as it was
    assert not torch.allclose(ours, _logits(tiny.model, ids), atol=1e-3)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_ties_from_factors_equals_the_dense_merge(tiny, folders, ids):
    from loramem.answer import adapter_scale, read_adapter
    from loramem.merge import applied, lora_deltas, merge

    deltas = [lora_deltas(t, adapter_scale(c)) for c, t in map(read_adapter, folders)]
    with applied(tiny.model, deltas=merge(deltas, "ties", density=0.3)) as m:
        dense = _logits(m, ids)
    caches = Caches()
    with modules_applied(tiny.model, folders, "ties", density=0.3, caches=caches) as m:
        torch.testing.assert_close(_logits(m, ids), dense, atol=1e-5, rtol=1e-5)
    assert len(caches.thresholds) == 3  # one entry per module


def test_merges_are_cached(tiny, folders, ids):
    caches = Caches()
    name = "model.layers.0.mlp.down_proj.weight"
    with modules_applied(tiny.model, folders, "ties", caches=caches) as m:
        first, pointer = _logits(m, ids), m.get_parameter(name).data_ptr()
    assert len(caches.merged) == 1 and tiny.model.get_parameter(name).data_ptr() != pointer
    with modules_applied(tiny.model, folders, "ties", caches=caches) as m:
        assert torch.equal(_logits(m, ids), first)
        assert m.get_parameter(name).data_ptr() == pointer  # the cached merged weight, swapped in as it is
    with modules_applied(tiny.model, folders, "ties", caches=caches, density=0.2):
        pass
    assert len(caches.merged) == 2


@pytest.mark.parametrize("chosen", [[0], [0, 1]])
def test_prepared_factors_are_kept_and_answer_alike(tiny, folders, ids, chosen, monkeypatch):
    from loramem import answer

    picked = [folders[i] for i in chosen]
    caches, base = Caches(), _logits(tiny.model, ids)
    with modules_applied(tiny.model, picked, "linear") as m:
        uncached = _logits(m, ids)
    with modules_applied(tiny.model, picked, "linear", caches=caches) as m:
        assert torch.equal(_logits(m, ids), uncached)
    assert len(caches.low_rank) == 1

    def unread(folder):
        raise AssertionError(f"{folder} read again")

    monkeypatch.setattr(answer, "read_adapter", unread)
    with modules_applied(tiny.model, picked, "linear", caches=caches) as m:
        assert torch.equal(_logits(m, ids), uncached)
    assert torch.equal(_logits(tiny.model, ids), base) and len(caches.low_rank) == 1
    with pytest.raises(AssertionError, match="read again"):  # another module set is not in the cache
        with modules_applied(tiny.model, folders[1:2] if chosen == [0] else folders[:1], "linear", caches=caches):
            pass


def test_bad_merges(tiny, folders, tmp_path):
    with pytest.raises(LoramemError, match="unknown merge method"):
        with modules_applied(tiny.model, folders, "average"):
            pass
    with pytest.raises(LoramemError, match="no parameter"):
        with modules_applied(tiny.model, folders, "ties", sharpness=2):
            pass
    dora = _random_module(tiny, tmp_path / "dora", seed=9, dora=True)
    with pytest.raises(LoramemError, match="DoRA"):
        with modules_applied(tiny.model, [folders[0], dora], "ties"):
            pass
