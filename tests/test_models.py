import pytest
import torch

from loramem.errors import LoramemError
from loramem.models import fingerprint, load_base, resolve, same_base


def test_tiny_is_a_small_llama_with_the_bundled_tokenizer(tiny):
    assert tiny.model.config.model_type == "llama"
    assert sum(p.numel() for p in tiny.model.parameters()) < 5_000_000
    assert tiny.tokenizer("Question: hi").input_ids  # the real SmolLM2 tokenizer
    assert tiny.fingerprint["layers"] == 4


def test_fingerprint_tells_weights_apart(tiny):
    fp = fingerprint(tiny.model)
    assert fp == tiny.fingerprint  # cached one equals a fresh computation
    weight = tiny.model.model.layers[0].mlp.down_proj.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(1.5)
        changed = fingerprint(tiny.model)
        weight.copy_(original)
    assert not same_base(fp, changed)
    assert same_base(fp, fingerprint(tiny.model))


def test_unknown_model_name():
    with pytest.raises(LoramemError, match="unknown model 'gpt-17'"):
        resolve("gpt-17")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(LoramemError, match="is not a model"):
        resolve(str(tmp_path))


def test_folder_with_only_pickle_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(LoramemError, match="safetensors"):
        resolve(str(tmp_path))


def test_local_folder_loads_like_the_registry_name(tiny):
    again = load_base(str(resolve("tiny")))
    assert same_base(again.fingerprint, tiny.fingerprint)


def test_unreadable_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMEM_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(LoramemError, match="cannot read GGUF file"):
        resolve(str(bad))
    assert not any((tmp_path / "cache" / "models").iterdir())  # no half-converted folder left
