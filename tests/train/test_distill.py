"""Distillation: the teacher's cached targets, the loss, and training towards the teacher."""

import pytest
import torch

from loramem.config import LoraSpec, TrainSpec
from loramem.errors import LoramemError
from loramem.examples import Example
from loramem.train.adapters import attached
from loramem.train.distill import distill_loss, sparse_logp, teacher_targets
from loramem.train.forward import supervised_logits
from loramem.train.loop import train
from loramem.train.pack import encode, pack
from train_reference import CONTEXT, EXAMPLES

def test_distill_loss_is_zero_only_when_student_matches_teacher():
    logits = torch.randn(5, 50) * 3
    index, teacher = sparse_logp(logits, None, 8, 2.0)
    assert teacher.exp().sum(-1).allclose(torch.ones(5))  # top 8 and the rest bucket cover everything
    assert distill_loss(logits, index, teacher, 2.0).abs() < 1e-6
    assert distill_loss(logits + torch.randn(5, 50), index, teacher, 2.0) > 1e-3
    tail = logits.clone()
    tail.scatter_(1, index, float("-inf"))  # mass moved only among the tokens outside the teacher's top 8
    outside = tail.argmax(-1, keepdim=True)
    moved = logits.scatter_add(1, outside, torch.full((5, 1), 5.0))
    assert distill_loss(moved, index, teacher, 2.0) > 1e-3  # the rest bucket sees it
    hidden = torch.randn(5, 2, 16)
    assert distill_loss(logits, index, teacher, 2.0, hidden, hidden.clone()).abs() < 1e-6
    assert distill_loss(logits, index, teacher, 2.0, hidden + 0.1, hidden) > 1e-3


@pytest.mark.parametrize("loss_on", ["answer", "all"])
def test_cached_teacher_targets_equal_a_fresh_plain_forward(tiny, loss_on):
    spec = TrainSpec(objective="distill", distill_top_k=4, loss_on=loss_on, precision="fp32", distill_layers="0,1")
    encoded = encode(tiny.tokenizer, EXAMPLES + [Example("", "Plain text is distilled at every token.")])
    context_ids = tiny.tokenizer(CONTEXT + "\n\n", add_special_tokens=False).input_ids
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model:
        for name, p in model.named_parameters():  # a non-zero adapter, which the teacher must not see
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
        teacher_targets(model, tiny.tokenizer, encoded, CONTEXT, spec, max_labels=30)  # several groups
    for e in encoded:
        ids = torch.tensor([context_ids + e.ids])  # the tiny tokenizer adds no BOS
        first = max(e.n_prompt if loss_on == "answer" else 1, 1)
        out = tiny.model(input_ids=ids, output_hidden_states=True)
        positions = slice(len(context_ids) + first - 1, -1)
        index, logp = sparse_logp(out.logits[0, positions], None, 4, 1.0)
        assert torch.equal(e.teacher.index, index)
        assert e.teacher.logp.allclose(logp, atol=1e-4)
        hidden = torch.stack([out.hidden_states[layer + 1][0, positions] for layer in (0, 1)], 1)
        assert e.teacher.hidden.allclose(hidden, atol=1e-4)


def test_distill_training_moves_the_student_towards_the_teacher(tiny):
    spec = TrainSpec(objective="distill", lr=1e-2, epochs=30, batch_size=2, target_recall=None, precision="fp32",
                     distill_layers="1")
    encoded_before = encode(tiny.tokenizer, EXAMPLES)
    with attached(tiny.model, LoraSpec(rank=4, layers="all")) as model:
        teacher_targets(model, tiny.tokenizer, encoded_before, CONTEXT, spec)

        def kl() -> float:
            batch = pack(encoded_before, "answer", pad_id=tiny.tokenizer.pad_token_id)
            with torch.no_grad():
                logits = supervised_logits(model, batch)
            return float(distill_loss(logits, torch.cat([e.teacher.index for e in encoded_before]),
                                      torch.cat([e.teacher.logp for e in encoded_before])))  # the KL part

        untrained = kl()
        stats = train(model, tiny.tokenizer, EXAMPLES, spec, progress=False, context=CONTEXT)
        assert kl() < 0.5 * untrained and stats.steps == 60  # final_loss also holds the hidden-state term
    with pytest.raises(LoramemError, match="needs the documents"):
        with attached(tiny.model, LoraSpec(rank=4, layers="all")) as model:
            train(model, tiny.tokenizer, EXAMPLES, spec, progress=False)
    with pytest.raises(LoramemError, match="objective must be"):
        TrainSpec(objective="kd")
