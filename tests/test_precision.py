"""Every path under each precision, on the tiny model: fp32; bf16 autocast over fp32 weights (a CPU with bf16
matmul); bf16 weights (a GPU). Each is forced, so all three run on any CPU (bf16 is emulated, slowly, where the
hardware lacks it). bf16 results are compared with the same computation by another path, or with fp32, at a
tolerance bf16's 8-bit mantissa allows; behaviour (exact recall, greedy answers) must be the same."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch

from loramem import LoraSpec, Memory, TrainSpec
from loramem.answer import DEFAULT_DENSITY, MODES, Caches, default_weights, module_applied, modules_applied
from loramem.errors import LoramemError
from loramem.merge import METHODS, applied, lora_deltas, merge
from loramem.models import load_base
from loramem.precision import ENV, autocast, hardware, requested, resolve, use_bf16
from loramem.prompts import closed_book_prompt
from sample_facts import SIX_FACTS as FACTS, LINEAR_TO_ZERO

SETTINGS = ["fp32", "autocast", "bf16-weights"]
TRAIN = TrainSpec(lr=1e-2, epochs=150, batch_size=2, **LINEAR_TO_ZERO)  # stops at exact recall, in fewer


@dataclass
class Run:
    setting: str
    base: object
    memory: Memory
    reference: object  # the same weights (bf16 ones as they were rounded) in fp32, run without autocast

    @property
    def precision(self) -> str:
        return "fp32" if self.setting == "fp32" else "bf16"

    @property
    def folders(self):
        return [self.memory.store.module_dir(m.id) for m in self.memory.modules()]

    def logits(self, model, fp32: bool = False):
        tokenizer = self.base.tokenizer
        tokenizer.padding_side = "left"
        batch = tokenizer([closed_book_prompt(e.prompt) for e in FACTS], return_tensors="pt", padding=True)
        with torch.no_grad(), autocast(not fp32 and use_bf16("auto", model), self.base.device):
            return model(**batch).logits.float()


@pytest.fixture(scope="module", params=SETTINGS)
def run(request, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "bf16-weights":
            patch.delenv(ENV, raising=False)  # auto: bf16 weights run in bf16
            base = load_base("tiny", dtype=torch.bfloat16)
        else:
            patch.setenv(ENV, "fp32" if request.param == "fp32" else "bf16")
            base = load_base("tiny")
        memory = Memory.open(tmp_path_factory.mktemp(request.param) / "m.mem", create=True, base=base)
        list(memory.write_shards(FACTS, 60, LoraSpec(rank=4, layers="all"), TRAIN, progress=False))
        reference = dataclasses.replace(base, model=copy.deepcopy(base.model).float())
        yield Run(request.param, base, memory, reference)


def close(a: torch.Tensor, b: torch.Tensor, precision: str) -> bool:
    """Equal up to rounding: a relative (Frobenius) error of 1e-5 in fp32, 3% in bf16, whose 0.4% per rounding
    compounds over the layers (0.4-2.1% measured here; a module moves these logits by over 100%)."""
    error = ((a - b).norm() / b.norm()).item()
    return error <= (1e-5 if precision == "fp32" else 3e-2)


def test_write_trains_every_module_to_exact_recall_and_records_the_precision(run):
    records = run.memory.modules()
    assert len(records) == 3 and all(r.recall == 1.0 for r in records)
    assert {r.stats["precision"] for r in records} == {run.precision}
    # adapters stay standard fp32 safetensors whatever the base weights (PEFT, vLLM load them unchanged)
    from safetensors.torch import load_file

    tensors = load_file(run.folders[0] / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}


@pytest.mark.parametrize("mode", MODES)
def test_every_answer_mode_answers(run, mode):
    questions = [e.prompt.removeprefix("Question: ").removesuffix(" Answer:") for e in FACTS]
    gold = [r.id for r in run.memory.modules() for _ in range(2)]  # two facts per module, in order
    every = [r.id for r in run.memory.modules()]
    answers = run.memory.ask_many(questions, mode=mode, router="oracle", gold=gold, top_k=2,
                                  module=every if mode.startswith("multi") else None)
    assert len(answers) == len(FACTS) and all(isinstance(a.text, str) for a in answers)
    if mode.startswith("lora"):  # one module each: its facts come back exactly, as training measured
        assert all(a.modules == [g] for a, g in zip(answers, gold))
        if mode == "lora":
            assert [a.text for a in answers] == [e.answer.strip() for e in FACTS]
    elif mode.startswith("multi"):
        assert all(sorted(a.modules) == sorted(every) for a in answers)  # the three merged
    assert all(set(a.timing) >= {"route", "merge", "prefill", "decode"} for a in answers)


def test_teacher_forced_scoring_reads_exact_answers(run):
    for record, facts in zip(run.memory.modules(), (FACTS[:2], FACTS[2:4], FACTS[4:])):
        assert all(s.exact for s in run.memory.score(facts, record.id))
    assert not all(s.exact for s in run.memory.score(FACTS))  # the base model does not know them


def test_fused_factors_equal_the_module_merged_into_fp32_weights(run):
    from loramem.answer import adapter_scale, read_adapter

    with module_applied(run.base.model, run.folders[0]) as model:
        fused = run.logits(model)
    config, tensors = read_adapter(run.folders[0])
    with applied(run.reference.model, deltas=lora_deltas(tensors, adapter_scale(config))) as model:
        merged = run.logits(model, fp32=True)
    assert close(fused, merged, run.precision) and not close(fused, run.logits(run.base.model), run.precision)


@pytest.mark.parametrize("method", [*METHODS, "cat"])
def test_every_merge_method_equals_its_fp32_merge_and_is_reverted_exactly(run, method):
    from loramem.answer import adapter_scale, read_adapter

    before = {n: p.detach().clone() for n, p in run.base.model.named_parameters()}
    with modules_applied(run.base.model, run.folders, method) as model:
        merged = run.logits(model)
    assert all(torch.equal(p, before[n]) for n, p in run.base.model.named_parameters())
    deltas = [lora_deltas(t, adapter_scale(c)) for c, t in map(read_adapter, run.folders)]
    method, params = ("linear", {}) if method == "cat" else (method, {"density": DEFAULT_DENSITY})
    params = params if method != "linear" else {}
    with applied(run.reference.model, deltas=merge(deltas, method, default_weights(method, 3), **params)) as model:
        reference = run.logits(model, fp32=True)  # the dense merge, applied to fp32 weights
    assert torch.isfinite(merged).all() and close(merged, reference, run.precision)
    assert not close(reference, run.logits(run.reference.model, fp32=True), run.precision)  # the merge matters


def test_cached_merges_answer_alike(run):
    caches, name = Caches(), "model.layers.0.mlp.down_proj.weight"
    dtype = run.base.model.get_parameter(name).dtype
    with modules_applied(run.base.model, run.folders, "ties", caches=caches) as model:
        first, pointer = run.logits(model), model.get_parameter(name).data_ptr()
    with modules_applied(run.base.model, run.folders, "ties", caches=caches) as model:
        assert torch.equal(run.logits(model), first) and model.get_parameter(name).data_ptr() == pointer
        assert model.get_parameter(name).dtype == dtype  # merged in fp32, kept in the weights' own dtype


def test_a_study_cell_scores_at_its_precision(run, monkeypatch):
    from loramem.experiments import runner

    monkeypatch.delenv("LORAMEM_DATA", raising=False)
    cell = runner.Cell("phonebook", "0.1K", LoraSpec(rank=4, targets="ffn", layers="last2"),
                       TrainSpec(epochs=12, batch_size=8), model="tiny")
    row = runner.run_cell(cell, run.base)
    assert row["precision"] == run.precision and row["hardware"] == hardware(run.base.device)
    assert row["score"] == pytest.approx(row["train_recall"])  # scoring reads what training measured


def test_export_loads_in_peft_and_answers_as_loramem(run, tmp_path):
    from peft import PeftModel

    from loramem.export import export_vllm

    exported = export_vllm(run.memory.path, tmp_path / "served")
    with module_applied(run.base.model, run.folders[0]) as model:
        ours = run.logits(model)
    peft_model = PeftModel.from_pretrained(run.base.model, exported.adapters[0].path)
    try:
        assert close(run.logits(peft_model), ours, run.precision)
    finally:
        peft_model.unload()


# ---------------------------------------------------------------------------------------------------
# The setting itself


def test_the_environment_forces_auto_and_an_explicit_choice_wins(monkeypatch):
    monkeypatch.setenv(ENV, "bf16")
    assert resolve("auto") == "bf16" and resolve("fp32") == "fp32"
    monkeypatch.setenv(ENV, "fp32")
    assert resolve("auto") == "fp32" and resolve("bf16") == "bf16"
    monkeypatch.delenv(ENV)
    assert requested("auto") == "auto"
    assert resolve("auto", dtype=torch.bfloat16) == "bf16"  # bf16 weights can only run bf16


@pytest.mark.parametrize("value", ["fp16", "BF16", "float32"])
def test_unknown_precisions_are_refused_in_one_line(monkeypatch, value):
    with pytest.raises(LoramemError, match="precision must be auto, bf16, fp32"):
        resolve(value)
    monkeypatch.setenv(ENV, value)
    with pytest.raises(LoramemError, match=f"{ENV} must be auto, bf16, fp32"):
        resolve("auto")


def test_fp32_cannot_be_asked_of_bf16_weights():
    with pytest.raises(LoramemError, match="weights are bf16"):
        resolve("fp32", dtype=torch.bfloat16)


def test_hardware_names_the_device_and_cpu_features():
    info = hardware(torch.device("cpu"))
    assert info["device"] == "cpu" and info["threads"] == torch.get_num_threads()
    with open("/proc/cpuinfo") as f:
        flags = set(f.read().split())
    assert info["cpu_features"] == [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    assert json.loads(json.dumps(info)) == info
