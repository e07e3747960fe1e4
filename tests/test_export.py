"""Export for vLLM: the exported adapters, loaded by plain PEFT, answer as loramem does."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from loramem import LoraSpec, Memory, TrainSpec
from loramem.answer import generate, module_applied, modules_applied
from loramem.errors import LoramemError
from loramem.export import export_vllm, parse_merge_set, vllm_rank
from loramem.models import resolve
from loramem.prompts import closed_book_prompt
from sample_facts import SIX_FACTS as FACTS

QUESTIONS = [e.prompt for e in FACTS]
FULL_RANK = 64  # the tiny model's hidden size: no layer's delta has a higher rank


@pytest.fixture(scope="module")
def memory(tiny, tmp_path_factory):
    memory = Memory.open(tmp_path_factory.mktemp("export") / "m.mem", create=True, base=tiny)
    spec = TrainSpec(lr=1e-2, epochs=30, batch_size=2)
    records = list(memory.write_shards(FACTS, 60, LoraSpec(rank=4, layers="all"), spec, progress=False))
    assert len(records) == 3
    return memory


@torch.no_grad()
def logits(model, tokenizer):
    tokenizer.padding_side = "left"
    batch = tokenizer([closed_book_prompt(q) for q in QUESTIONS], return_tensors="pt", padding=True)
    return model(**batch).logits


@torch.no_grad()
def through_peft(tiny, folder):
    """Logits and greedy answers of the base model with the adapter in `folder`, loaded by PEFT alone."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(tiny.model, folder)
    try:
        texts = generate(peft_model, tiny.tokenizer, [closed_book_prompt(q) for q in QUESTIONS])
        return logits(peft_model, tiny.tokenizer), [t.strip() for t in texts]
    finally:
        peft_model.unload()


def test_exported_modules_answer_like_loramem(tiny, memory, tmp_path):
    result = export_vllm(memory.path, tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["lora-modules.json", "shard-0", "shard-1", "shard-2", "vllm-serve.sh"]
    for record in memory.modules():
        folder = out / record.name
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(resolve("tiny")) and config["r"] == 4
        theirs, answers = through_peft(tiny, folder)
        with module_applied(tiny.model, memory.store.module_dir(record.id)) as model:
            ours = logits(model, tiny.tokenizer)
        assert (theirs - ours).abs().max().item() <= 1e-5
        assert answers == [a.text for a in memory.ask_many(QUESTIONS, module=record.id)]
    listed = json.loads((out / "lora-modules.json").read_text())
    assert [m["name"] for m in listed] == ["shard-0", "shard-1", "shard-2"]
    assert all(m["path"] == str(out / m["name"]) and m["base_model_name"] == str(resolve("tiny")) for m in listed)
    assert result.max_lora_rank == 8 and "rounded up to --max-lora-rank 8" in result.notes[0]
    command = (out / "vllm-serve.sh").read_text()
    assert f"--max-lora-rank 8 --lora-modules shard-0={out / 'shard-0'} shard-1=" in command


@pytest.mark.parametrize("method,rank", [("ties", FULL_RANK), ("linear", None)])
def test_merged_export_answers_like_loramem_merge(tiny, memory, tmp_path, method, rank):
    ids = [m.id for m in memory.modules()]
    result = export_vllm(memory.path, tmp_path / "out", modules=[ids[0]], merged=[parse_merge_set(f"{'+'.join(ids)}:{method}")],
                         merged_rank=rank)
    merged = result.adapters[1]
    assert merged.name == f"{method}-shard-0+shard-1+shard-2" and merged.modules == ids
    assert merged.rank == (rank or 16)  # linear of three rank-4 modules: rank 12, rounded up for vLLM
    assert merged.relative_error < 1e-5  # full rank, or a merge whose rank fits: the SVD drops nothing
    theirs, answers = through_peft(tiny, tmp_path / "out" / merged.name)
    with modules_applied(tiny.model, [memory.store.module_dir(i) for i in ids], method) as model:
        ours = logits(model, tiny.tokenizer)
    assert (theirs - ours).abs().max().item() <= 1e-5
    assert answers == [a.text for a in memory.ask_many(QUESTIONS, mode="multi", module=ids, merge=method)]


def test_a_truncated_merge_reports_its_error(memory, tmp_path):
    ids = [m.id for m in memory.modules()]
    result = export_vllm(memory.path, tmp_path / "out", merged=[parse_merge_set("+".join(ids))], merged_rank=8)
    assert result.adapters[-1].method == "ties" and 0.01 < result.adapters[-1].relative_error < 1
    assert "raise --merged-rank" in result.notes[-1]


def test_refusals_leave_nothing_behind(memory, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(LoramemError, match="not empty"):
        export_vllm(memory.path, tmp_path / "full")
    with pytest.raises(LoramemError, match="no module 'nope'"):
        export_vllm(memory.path, tmp_path / "out", modules=["nope"])
    pickled = tmp_path / "pickled.mem"
    shutil.copytree(memory.path, pickled)
    victim = pickled / "modules" / memory.modules()[1].id
    (victim / "adapter_model.safetensors").rename(victim / "adapter_model.bin")
    with pytest.raises(LoramemError, match=r"pickle \(.bin\) adapters are not exported"):
        export_vllm(pickled, tmp_path / "out")
    dora = tmp_path / "dora.mem"
    shutil.copytree(memory.path, dora)
    config = dora / "modules" / memory.modules()[0].id / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"use_dora": True}))
    with pytest.raises(LoramemError, match="DoRA"):
        export_vllm(dora, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dora.mem", "full", "pickled.mem"]  # no out, no temp
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_export_into_an_empty_folder_made_for_it(memory, tmp_path):
    (tmp_path / "made").mkdir()
    assert len(export_vllm(memory.path, tmp_path / "made", modules=["shard-2"]).adapters) == 1


def test_vllm_ranks_and_merge_sets():
    assert [vllm_rank(r) for r in (1, 4, 8, 9, 300, 512)] == [8, 8, 8, 16, 320, 512]
    with pytest.raises(LoramemError, match="above the largest"):
        vllm_rank(513)
    assert parse_merge_set("a+b") == parse_merge_set("a + b:ties")
    assert parse_merge_set("a+b+c:dare_ties").method == "dare_ties"
    with pytest.raises(LoramemError, match="two or more"):
        parse_merge_set("a:ties")
    with pytest.raises(LoramemError, match="unknown merge method"):
        parse_merge_set("a+b:blend")


def test_cli_export(memory, tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = [sys.executable, "-m", "loramem.cli", "export", str(memory.path), "--vllm", str(tmp_path / "out")]
    out = subprocess.run([*run, "--merged", "shard-0+shard-1:linear", "--json"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert [a["name"] for a in result["adapters"]] == ["shard-0", "shard-1", "shard-2", "linear-shard-0+shard-1"]
    assert result["command"].startswith(f"vllm serve {resolve('tiny')} --enable-lora --max-lora-rank 8 --lora-modules")
    again = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'out'} already exists and is not empty; export into a new folder"]
