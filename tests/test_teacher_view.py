"""The distill teacher reading each question as ICL asks it (its own prompt), not the documents before the student's."""

from __future__ import annotations

import torch

from loramem.prompts import render_prompt
from loramem.config import LoraSpec, TrainSpec
from loramem.corpus import Document
from loramem.memory import Memory
from loramem.examples import Example
from loramem.train.adapters import attached
from loramem.train.distill import sparse_logp, teacher_targets
from loramem.train.pack import encode

CONTEXT = "The vault of the old bank in Tarnow holds the code 4417 9921."
EXAMPLES = [Example("Question: What code does the vault hold? Answer:", " 4417 9921"),
            Example("", "A plain text keeps the shared-prefix view.")]


def test_own_teacher_prompts_give_the_targets_of_a_plain_forward_on_them(tiny):
    spec = TrainSpec(objective="distill", distill_top_k=4, precision="fp32")
    encoded = encode(tiny.tokenizer, EXAMPLES)
    own = render_prompt(tiny.tokenizer, EXAMPLES[0].prompt, CONTEXT, "chat")
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model:
        teacher_targets(model, tiny.tokenizer, encoded, CONTEXT, spec, teacher_prompts=[own, None])
    first = encoded[0]
    prompt_ids = tiny.tokenizer(own).input_ids
    ids = torch.tensor([prompt_ids + first.ids[first.n_prompt:]])
    logits = tiny.model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1]
    index, logp = sparse_logp(logits, None, 4, 1.0)
    assert torch.equal(first.teacher.index, index) and first.teacher.logp.allclose(logp, atol=1e-4)
    plain = encoded[1]  # no own prompt: the documents before the student's tokens, as before
    context_ids = tiny.tokenizer(CONTEXT + "\n\n", add_special_tokens=False).input_ids
    # a plain text is labelled from its second token (its first has no prediction before it)
    logits = tiny.model(input_ids=torch.tensor([context_ids + plain.ids])).logits[0, len(context_ids):-1]
    assert torch.equal(plain.teacher.index, sparse_logp(logits, None, 4, 1.0)[0])


def test_chat_memories_give_the_teacher_the_icl_prompt(tiny, tmp_path):
    doc = Document.from_text(CONTEXT)
    spec = TrainSpec(objective="distill")
    chat = Memory.open(tmp_path / "chat.mem", create=True, base=tiny, prompt="chat")
    job, _ = chat._job(EXAMPLES, [doc], LoraSpec(rank=2, layers="all"), spec)
    assert job.teacher_prompts == (chat._prompt(EXAMPLES[0].prompt, CONTEXT), None)
    plain = Memory.open(tmp_path / "plain.mem", create=True, base=tiny)
    assert plain._job(EXAMPLES, [doc], LoraSpec(rank=2, layers="all"), spec)[0].teacher_prompts == ()
