"""Adapters: attached and detached without a trace on the base, and every PEFT variant written and answered."""

import pytest
import torch

from loramem import Memory
from loramem.config import LoraSpec, TrainSpec
from loramem.train.adapters import attached
from loramem.train.loop import train
from sample_facts import LINEAR_TO_ZERO
from train_reference import EXAMPLES

def test_attached_restores_base_model(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model:
        train(model, tiny.tokenizer, EXAMPLES, TrainSpec(epochs=1, target_recall=None), progress=False)
    after = tiny.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("variant", ["rslora", "dora", "pissa"])
def test_peft_variants_train_and_answer(tiny, tmp_path, variant):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    memory = Memory.open(tmp_path / "m", create=True, base=tiny)
    record = memory.write(EXAMPLES[:1], lora=LoraSpec(rank=4, layers="all", **{variant: True}),
                          train_spec=TrainSpec(lr=1e-2, epochs=60, batch_size=1, **LINEAR_TO_ZERO), progress=False)
    assert record.recall == 1.0
    # The base is untouched (PiSSA rewrites it while training) and the saved module applies to it.
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    assert memory.ask("What is the phone number of Ann Lee?").text.startswith("603-556-7631")
