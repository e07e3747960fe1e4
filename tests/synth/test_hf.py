"""HFGenerator: the plumbing on the tiny random model (gibberish out), and one real run on the bundled model."""

from __future__ import annotations

import pytest
import torch

from loramem.corpus import Document
from loramem.synth import HFGenerator, SynthSpec, synthesize

PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed by the engineer "
    "Gustave Eiffel and completed in 1889 for the World's Fair. The tower is 330 metres tall and was the "
    "tallest structure in the world until 1930."
)


@pytest.fixture(autouse=True)
def one_thread():
    """Token-by-token decoding of small models is fastest on one thread; on a busy machine several threads
    wait on each other (64 tokens of the tiny model: 33 s on 2 threads, 3 s on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_complete_batches_seeds_and_leaves_state_alone(tiny):
    generator = HFGenerator(tiny, batch_size=2)
    assert generator.name.startswith("hf:tiny@")
    prompts = ["one", "two", [{"role": "user", "content": "three"}]]
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    side = tiny.tokenizer.padding_side
    first = generator.complete(prompts, max_tokens=4, temperature=1.0, seed=7)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's random stream is untouched
    assert tiny.tokenizer.padding_side == side
    assert len(first) == 3 and all(isinstance(reply, str) for reply in first)
    assert generator.complete(prompts, max_tokens=4, temperature=1.0, seed=7) == first
    assert generator.complete(prompts, max_tokens=4, temperature=1.0, seed=8) != first
    greedy = generator.complete(prompts, max_tokens=4, temperature=0.0, seed=1)
    assert generator.complete(prompts, max_tokens=4, temperature=0.0, seed=2) == greedy


def test_synthesize_on_the_tiny_model_reports_counts(tiny):
    spec = SynthSpec(formats="qa+summary", questions=2, refine_rounds=0, max_retries=0)
    examples, report = synthesize(Document.from_text(PARAGRAPH), spec, HFGenerator(tiny))
    assert report.asked == {"qa": 2, "summary": 1}
    # A random model's word salad holds no "Q: ... A: ..." line: both QA prompts (one question each, no retry, no
    # refinement) come back malformed, while any text is a summary.
    assert report.produced == {"qa": 0, "summary": 1}
    assert report.malformed == 2 and report.dropped_unsupported == 0 and report.duplicates == 0
    assert len(examples) == sum(report.produced.values()) == 1
    assert examples[0].prompt == f"Summary of document {Document.from_text(PARAGRAPH).id}:\n"


@pytest.mark.slow
def test_bundled_model_writes_qa_for_a_paragraph(smollm):
    spec = SynthSpec(questions=4, refine_rounds=0, max_retries=0)
    examples, report = synthesize(Document.from_text(PARAGRAPH), spec, HFGenerator(smollm), cache=False)
    print(f"\nsmollm2-135m: {report.produced['qa']} usable of {report.asked['qa']} asked, "
          f"{report.dropped_unsupported} unsupported, {report.duplicates} duplicates, {report.malformed} malformed, "
          f"{report.seconds:.1f} s")
    assert report.asked == {"qa": 4}
    assert report.produced["qa"] == len(examples) <= 4
    assert all(e.prompt.startswith("Question: ") and e.prompt.endswith(" Answer:") for e in examples)
