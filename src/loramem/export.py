"""Exporting memory modules for vLLM: PEFT adapter folders, merged sets as low-rank adapters, and the
`vllm serve` arguments that load them.

    OUT/
      <name>/adapter_config.json          base_model_name_or_path: the model vLLM must serve
      <name>/adapter_model.safetensors    (pickle adapters are never read nor written)
      lora-modules.json                   [{"name", "path", "base_model_name"}], vLLM's LoRAModulePath
      vllm-serve.sh                       vllm serve BASE --enable-lora --max-lora-rank R --lora-modules name=path ...

A module is copied as it is stored (it is already a standard PEFT adapter). A merged set is merged in
weight-delta space exactly as loramem answers with it, then compressed back to a rank-r LoRA by SVD (scale
1): exact up to rounding when r covers the merge's rank (linear and cat merges of r_i-rank modules have rank
<= sum r_i), a truncation otherwise (TIES and DARE deltas are full rank), reported as a relative error.
OUT is built under a temporary name and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loramem.answer import DEFAULT_DENSITY, MERGE_METHODS, adapter_scale, default_weights, read_adapter
from loramem.errors import LoramemError
from loramem.merge import linear, lora_deltas, merge, to_low_rank
from loramem.models import BUNDLED, resolve
from loramem.store import ModuleRecord, Store

# The values vLLM's --max-lora-rank accepts (recent versions also take 1; 8 works everywhere).
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MODULES_FILE, SCRIPT_FILE = "lora-modules.json", "vllm-serve.sh"


@dataclass
class MergeSet:
    """Modules (ids or names) to export as one merged adapter, and the merge method."""

    modules: list[str]
    method: str = "ties"


def parse_merge_set(text: str) -> MergeSet:
    """"a+b+c:ties" -> MergeSet(["a", "b", "c"], "ties"); the method defaults to ties."""
    members, _, method = text.partition(":")
    modules = [m.strip() for m in members.split("+") if m.strip()]
    method = method.strip() or "ties"
    if len(modules) < 2:
        raise LoramemError(f"a merged set needs two or more modules joined by '+', got {text!r}")
    if method not in MERGE_METHODS:
        raise LoramemError(f"unknown merge method {method!r} in {text!r}; choose one of {', '.join(MERGE_METHODS)}")
    return MergeSet(modules, method)


def vllm_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`."""
    for allowed in VLLM_RANKS:
        if rank <= allowed:
            return allowed
    raise LoramemError(f"rank {rank} is above the largest --max-lora-rank vLLM accepts ({VLLM_RANKS[-1]})")


@dataclass
class ExportedAdapter:
    name: str
    path: str  # where it will be after the export, absolute
    rank: int
    modules: list[str]  # module ids
    method: str | None = None  # merged sets only
    relative_error: float | None = None  # merged sets: ||dW - B A|| / ||dW|| over all layers


@dataclass
class VllmExport:
    out: str
    base_model: str  # what vLLM serves: the adapters were trained on exactly these weights
    adapters: list[ExportedAdapter]
    max_lora_rank: int
    notes: list[str] = field(default_factory=list)

    def lora_modules(self) -> list[dict]:
        return [{"name": a.name, "path": a.path, "base_model_name": self.base_model} for a in self.adapters]

    def command(self) -> list[str]:
        # vLLM splits name=path at "="; a path holding one needs the JSON form of the argument.
        specs = [f"{m['name']}={m['path']}" if "=" not in m["path"] else json.dumps(m) for m in self.lora_modules()]
        return ["vllm", "serve", self.base_model, "--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
                "--lora-modules", *specs]

    def to_dict(self) -> dict:
        return asdict(self) | {"command": shlex.join(self.command())}


def export_vllm(memory: str | Path, out: str | Path, modules: list[str] | None = None, merged: list[MergeSet] = (),
                merged_rank: int | None = None, base_model: str | None = None) -> VllmExport:
    """Write the chosen modules (default all) and merged sets of `memory` into the new folder `out` for vLLM."""
    store = Store.open(memory)
    out = Path(out).absolute()
    _check_out(out)
    if merged_rank is not None:
        if merged_rank < 1:
            raise LoramemError(f"merged rank must be at least 1, got {merged_rank}")
        vllm_rank(merged_rank)  # refuse one vLLM cannot serve before computing anything
    base_model = base_model or _served_base(store.base_model)
    chosen = [store.get(m) for m in modules] if modules else store.modules()
    sets = [(s, [store.get(m) for m in s.modules]) for s in merged]
    if not chosen and not sets:
        raise LoramemError(f"{memory} has no modules to export")
    names = _unique_names([m.name for m in chosen] + [f"{s.method}-" + "+".join(m.name for m in members)
                                                      for s, members in sets])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        adapters = [_copy_module(store, record, tmp / name, base_model) for record, name in zip(chosen, names)]
        adapters += [_write_merged(store, s, members, tmp / name, base_model, merged_rank)
                     for (s, members), name in zip(sets, names[len(chosen):])]
        for adapter in adapters:
            adapter.path = str(out / adapter.name)  # where it is once OUT is renamed into place
        result = VllmExport(str(out), base_model, adapters, vllm_rank(max(a.rank for a in adapters)),
                            _notes(store.base_model, base_model, adapters))
        (tmp / MODULES_FILE).write_text(json.dumps(result.lora_modules(), indent=1) + "\n")
        _write_script(tmp / SCRIPT_FILE, result)
        if out.exists():
            out.rmdir()  # an empty folder made for it (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoramemError(f"{out} already exists and is not empty; export into a new folder")


def _served_base(model: str) -> str:
    """The local Hugging Face folder of the memory's base model: for GGUF and bundled models the converted,
    dequantized weights the modules were trained on (vLLM would otherwise serve other weights)."""
    try:
        return str(resolve(model))
    except LoramemError as err:
        raise LoramemError(f"{err}; name the model vLLM serves with --base-model") from None


def _unique_names(wanted: list[str]) -> list[str]:
    """Names safe as vLLM adapter names and folder names, distinct from each other and from OUT's own files."""
    taken = {MODULES_FILE, SCRIPT_FILE}
    names = []
    for name in wanted:
        slug = re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-.") or "module"
        unique, n = slug, 1
        while unique in taken:
            n += 1
            unique = f"{slug}-{n}"
        taken.add(unique)
        names.append(unique)
    return names


def _loadable(store: Store, record: ModuleRecord) -> tuple[dict, dict[str, torch.Tensor]]:
    """A module's adapter, checked to be one vLLM loads."""
    folder = store.module_dir(record.id)
    if not (folder / "adapter_model.safetensors").is_file():
        raise LoramemError(f"module {record.name} ({record.id}) has no safetensors adapter; pickle (.bin) adapters "
                           "are not exported")
    config, tensors = read_adapter(folder)
    if config.get("use_dora"):
        raise LoramemError(f"module {record.name} ({record.id}) is a DoRA module, which vLLM does not load; "
                           "leave it out with --modules")
    if config.get("modules_to_save") or config.get("bias", "none") != "none":
        raise LoramemError(f"module {record.name} ({record.id}) trains biases or whole modules; vLLM loads plain LoRA only")
    return config, tensors


def _copy_module(store: Store, record: ModuleRecord, folder: Path, base_model: str) -> ExportedAdapter:
    config, _ = _loadable(store, record)
    folder.mkdir()
    _write_config(folder, config | {"base_model_name_or_path": base_model})
    shutil.copyfile(store.module_dir(record.id) / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    rank = max([config["r"], *(config.get("rank_pattern") or {}).values()])
    return ExportedAdapter(folder.name, str(folder), rank, [record.id])


def _write_merged(store: Store, merge_set: MergeSet, members: list[ModuleRecord], folder: Path, base_model: str,
                  rank: int | None) -> ExportedAdapter:
    """Merge the members as loramem answers with them (answer.modules_applied), then back to a rank-r LoRA."""
    from safetensors.torch import save_file

    adapters = [_loadable(store, m) for m in members]
    deltas = [lora_deltas(tensors, adapter_scale(config)) for config, tensors in adapters]
    weights = default_weights(merge_set.method, len(deltas))
    if merge_set.method in ("linear", "cat"):  # cat is linear with the ranks side by side: the same deltas
        merged = linear(deltas, weights)
    else:
        merged = merge(deltas, merge_set.method, weights, density=DEFAULT_DENSITY)
    rank = rank or vllm_rank(sum(config["r"] for config, _ in adapters))  # vLLM reserves that rank anyway
    factors = to_low_rank(merged, rank)
    tensors, error, total = {}, 0.0, 0.0
    for name, (a, b) in factors.items():
        error += float((merged[name] - b @ a).square().sum())
        total += float(merged[name].square().sum())
        a, b = _padded(a, b, rank)  # a layer narrower than the rank: zero rows keep one rank for all layers
        key = "base_model.model." + name.removesuffix(".weight")
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a.contiguous(), b.contiguous()
    folder.mkdir()
    config = adapters[0][0] | {
        "base_model_name_or_path": base_model, "r": rank, "lora_alpha": rank, "use_rslora": False,  # scale 1
        "use_dora": False, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
    }
    _write_config(folder, config)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return ExportedAdapter(folder.name, str(folder), rank, [m.id for m in members], merge_set.method,
                           (error / total) ** 0.5 if total else 0.0)


def _padded(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    missing = rank - a.shape[0]
    if missing <= 0:
        return a, b
    return torch.cat([a, a.new_zeros(missing, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], missing)], dim=1)


def _write_config(folder: Path, config: dict) -> None:
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_script(path: Path, export: VllmExport) -> None:
    path.write_text("#!/bin/sh\n# Written by `loramem export`: serve the base model with these memory modules.\n"
                    f"exec {shlex.join(export.command())} \"$@\"\n")
    path.chmod(0o755)


def _notes(memory_model: str, base_model: str, adapters: list[ExportedAdapter]) -> list[str]:
    """What the user should know before serving: rank rounding, lossy merges, GGUF bases."""
    notes = []
    largest = max(a.rank for a in adapters)
    if vllm_rank(largest) != largest:
        notes.append(f"largest rank {largest} rounded up to --max-lora-rank {vllm_rank(largest)} "
                     f"(vLLM accepts {', '.join(map(str, VLLM_RANKS))})")
    for adapter in adapters:
        if (adapter.relative_error or 0) > 0.01:
            notes.append(f"{adapter.name}: rank {adapter.rank} keeps the merge only to a relative error of "
                         f"{adapter.relative_error:.1%} ({adapter.method} merges are not low rank); raise --merged-rank")
    if memory_model in BUNDLED or memory_model.endswith(".gguf"):
        notes.append(f"{memory_model} is a GGUF model: serve the converted folder {base_model} (the dequantized "
                     "weights the modules were trained on), not the GGUF file or the original checkpoint")
    return notes
