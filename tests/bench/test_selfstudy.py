"""The self-study benchmark's rows on a tiny model: every setting, write seconds, locality kept with the modules."""

from __future__ import annotations

import pytest

from loramem.bench import selfstudy as study
from loramem.config import LoraSpec, TrainSpec
from loramem.corpus import Document
from loramem.errors import LoramemError
from loramem.memory import Memory
from loramem.synth import SynthSpec
from loramem.synth.selfstudy import SelfStudySpec

A = "The Aurora telescope was built in Chile in 1998. It observes galaxies in infrared light. " * 4
B = "Lisbon has been the home of the consortium since 2004. The quasar Q7 was found in 2011 by the team. " * 4


class Gen:
    name = "scripted"

    def complete(self, prompts, max_tokens, temperature, seed):
        return ["What is it?"] * len(prompts)


@pytest.fixture(autouse=True)
def synth_cache(tmp_path, monkeypatch):
    from loramem.synth import cache

    monkeypatch.setattr(cache, "synth_dir", lambda: tmp_path / "synth")


def test_every_row_and_the_locality_record(tiny, tmp_path):
    items = [study.Item(Document.from_text(A, title="a"), ("Where was Aurora built?", "What light?"),
                        ("Chile", ["infrared", "IR"])),
             study.Item(Document.from_text(B, title="b"), ("Where is the consortium?",), ("Lisbon",))]
    memory = Memory.open(tmp_path / "m", create=True, base=tiny, prompt="chat")
    result = study.run(memory, items, ["self-study", "self-study-ntp"], SynthSpec(),
                       SelfStudySpec(prompts=3, kinds="question+continue", windows=(32,), answer_tokens=4), Gen(),
                       LoraSpec(rank=2, layers="all"),
                       TrainSpec(epochs=1, lr=1e-3, target_recall=None, candidates=0), 4, locality_questions=2,
                       merges=("select", "linear"), base_weights=(0.0, 0.5))
    settings = [row["setting"] for row in result["rows"]]
    routed = [f"{s} {c}" for c in ("closed book", "+ rag")
              for s in ("routed top 1", "top 2 select", "top 2 linear", "top 2 select base 0.5")]
    assert settings == ["base", "icl", "rag"] + [f"{m} {c}" for m in ("self-study", "self-study-ntp")
                                                 for c in [*study.CONTEXTS, *routed]]
    assert result["questions"] == 3 and all(0.0 <= row["rouge_l"] <= 1.0 for row in result["rows"])
    closed = result["rows"][3]
    assert closed["write_s_per_doc"] >= closed["train_s_per_doc"] > 0 and 0 <= closed["locality_other_changed"] <= 1
    sibling = Memory.open(tmp_path / "m-self-study", base=tiny)
    for written in result["modules"]["self-study"]:
        stats = sibling.store.get(written["module"]).stats
        assert set(stats["locality"]) == {"general", "other_documents"}
        assert sibling.store.get(written["module"]).train_spec["objective"] == "distill"
    with pytest.raises(LoramemError, match="unknown method 'poems'"):
        study.run(memory, items, ["poems"], SynthSpec(), SelfStudySpec(), Gen(), LoraSpec(), TrainSpec(), 4)
