import json

import pytest
import torch

from loramem import LoraSpec, Memory, TrainSpec, facts_from_text
from loramem.config import AskSpec
from loramem.errors import LoramemError
from loramem.examples import Example
from loramem.precision import autocast, use_bf16
from sample_facts import LINEAR_TO_ZERO, SIX_FACTS

FACTS = "Question: What is the phone number of Ann Lee? Answer: 603-556-7631\nQuestion: What is the phone number of Bo Kim? Answer: 705-882-9365\n"
FAST = TrainSpec(lr=1e-2, epochs=80, batch_size=2, **LINEAR_TO_ZERO)


@pytest.fixture(scope="module")
def written(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("mem") / "facts.mem"
    memory = Memory.open(path, create=True, base=tiny)
    record = memory.write(facts_from_text(FACTS), lora=LoraSpec(rank=8, layers="all"), train_spec=FAST, progress=False)
    return memory, record


def test_write_then_ask(written):
    memory, record = written
    assert record.recall == 1.0
    answer = memory.ask("What is the phone number of Bo Kim?")
    assert answer.text.startswith("705-882-9365") and answer.modules == [record.id]
    assert memory.ask("What is the phone number of Bo Kim?", mode="base").text != answer.text


def test_module_is_a_standard_peft_adapter(written, tiny):
    from peft import PeftModel

    memory, record = written
    folder = memory.store.module_dir(record.id)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8
    with torch.no_grad():
        ids = tiny.tokenizer("Question: What is the phone number of Bo Kim? Answer:", return_tensors="pt").input_ids
        peft_model = PeftModel.from_pretrained(tiny.model, folder)
        via_peft = peft_model(input_ids=ids).logits
        peft_model.unload()
        from loramem.answer import module_applied

        with module_applied(tiny.model, folder) as merged:
            via_merge = merged(input_ids=ids).logits
    torch.testing.assert_close(via_merge, via_peft, rtol=1e-4, atol=1e-4)


def test_base_weights_unchanged_after_answers(written, tiny):
    memory, _ = written
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    memory.ask("What is the phone number of Ann Lee?")
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())


def test_a_modules_factors_are_read_once_for_many_answers(written, monkeypatch):
    from loramem import answer

    memory, record = written
    first = memory.ask("What is the phone number of Bo Kim?")

    def unread(folder):
        raise AssertionError(f"{folder} read again")

    monkeypatch.setattr(answer, "read_adapter", unread)
    again = memory.ask("What is the phone number of Bo Kim?")
    assert again.text == first.text and again.modules == [record.id]


def test_same_write_again_is_skipped(written):
    memory, record = written
    again = memory.write(facts_from_text(FACTS), lora=LoraSpec(rank=8, layers="all"), train_spec=FAST, progress=False)
    assert again.id == record.id and len(memory.modules()) == 1


def test_reopened_memory_and_icl(written, tiny):
    memory, record = written
    reopened = Memory.open(memory.path, base=tiny)
    assert [m.id for m in reopened.modules()] == [record.id]
    assert reopened.model_name == "tiny"
    answer = reopened.ask("What is the phone number of Ann Lee?", mode="icl")
    assert answer.mode == "icl" and answer.modules == [record.id]


def test_other_base_model_is_refused(written, tiny):
    from loramem.models import Base

    memory, _ = written
    other = Base("other", tiny.model, tiny.tokenizer, dict(tiny.fingerprint, weights_sha256="0" * 64))
    with pytest.raises(LoramemError, match="different model"):
        Memory.open(memory.path, base=other).ask("q?")


def test_bad_questions_and_modes(written):
    memory, _ = written
    with pytest.raises(LoramemError, match="empty question"):
        memory.ask("  ")
    with pytest.raises(LoramemError, match="unknown mode"):
        memory.ask("q?", mode="telepathy")
    with pytest.raises(LoramemError, match="no module"):
        memory.ask("q?", module="nope")


def test_failed_write_leaves_no_memory(tiny, tmp_path):
    memory = Memory.open(tmp_path / "new.mem", create=True, base=tiny)
    with pytest.raises(LoramemError):
        memory.write([Example("Question: x? Answer:", "")], progress=False)
    assert not (tmp_path / "new.mem").exists()


def test_write_into_an_empty_folder_made_for_it(tiny, tmp_path):
    (tmp_path / "made").mkdir()
    memory = Memory.open(tmp_path / "made", create=True, base=tiny)
    memory.write(facts_from_text(FACTS), lora=LoraSpec(rank=8, layers="all"), train_spec=FAST, progress=False)
    assert len(Memory.open(tmp_path / "made", base=tiny).modules()) == 1


SHARDS = [
    "Question: What is the phone number of Ann Lee? Answer: 603-556-7631\nQuestion: What is the phone number of Bo Kim? Answer: 705-882-9365\n",
    "Question: What is the phone number of Cy Ortega? Answer: 212-340-1187\nQuestion: What is the phone number of Di Novak? Answer: 319-450-2298\n",
    "Question: What is the phone number of Ed Brandt? Answer: 415-560-3309\nQuestion: What is the phone number of Flo Quist? Answer: 509-670-4410\n",
]


@pytest.fixture(scope="module")
def sharded(tiny, tmp_path_factory):
    memory = Memory.open(tmp_path_factory.mktemp("mem") / "shards.mem", create=True, base=tiny)
    records = [memory.write(facts_from_text(text), lora=LoraSpec(rank=8, layers="all"), train_spec=FAST, name=f"shard-{i}",
                            progress=False) for i, text in enumerate(SHARDS)]
    return memory, records


def test_lora_routes_each_question_to_its_shard(sharded):
    memory, records = sharded
    for router in ("bm25", "dense", "hybrid"):
        answers = memory.ask_many(["What is the phone number of Di Novak?", "What is the phone number of Flo Quist?"],
                                  mode="lora", router=router)
        assert [a.modules for a in answers] == [[records[1].id], [records[2].id]]
    assert answers[0].text.startswith("319-450-2298") and answers[1].text.startswith("509-670-4410")
    assert set(answers[0].timing) == {"route", "merge", "prefill", "decode"}
    assert answers[0].seconds == pytest.approx(sum(answers[0].timing.values()))


def test_multi_merges_the_top_k_and_oracle_takes_the_gold(sharded):
    memory, records = sharded
    answer = memory.ask("What is the phone number of Ann Lee?", mode="multi", router="bm25", top_k=2, merge="linear")
    assert len(answer.modules) == 2 and answer.modules[0] == records[0].id
    assert answer.module_scores[0] >= answer.module_scores[1]
    oracle = memory.ask("What is the phone number of Ann Lee?", mode="lora", router="oracle", gold=[records[2].id])
    assert oracle.modules == [records[2].id]


def test_rag_retrieves_the_fact_and_icl_uses_the_routed_documents(sharded):
    memory, records = sharded
    answer = memory.ask("What is the phone number of Ed Brandt?", mode="lora+rag", router="bm25", top_k=1)
    assert answer.chunks[0]["id"] == f"{records[2].id}:0" and answer.modules == [records[2].id]
    icl = memory.ask("What is the phone number of Ed Brandt?", mode="icl", router="bm25", top_k=1)
    assert icl.modules == [records[2].id] and icl.chunks == []
    assert (memory.path / "index").is_dir()  # the routing indexes are kept for the next open


@pytest.mark.parametrize("method", ["mix", "select"])
def test_a_base_row_takes_its_weight_and_keeps_the_modules_facts(sharded, method):
    memory, records = sharded
    questions = ["What is the phone number of Cy Ortega?", "What is the phone number of Flo Quist?"]
    answers = memory.ask_many(questions, mode="multi", router="bm25", top_k=2, merge=method, base_weight=0.25)
    plain = memory.ask_many(questions, mode="multi", router="bm25", top_k=2, merge=method)
    assert [a.text[:12] for a in answers] == ["212-340-1187", "509-670-4410"]
    for with_base, without in zip(answers, plain):
        assert with_base.modules == without.modules and sum(with_base.module_weights) == pytest.approx(0.75)
        # the modules keep their router ratio beside the base row
        assert with_base.module_weights == pytest.approx([0.75 * w for w in without.module_weights])
        assert set(with_base.supplied_by) <= set(with_base.modules) | {"base"}
    # at a weight of all but 1, select takes the base row, whose answer is the base weights'
    leaning = memory.ask(questions[0], mode="multi", router="bm25", top_k=2, merge="select", base_weight=1 - 1e-9)
    assert leaning.text == memory.ask(questions[0], mode="base").text and set(leaning.supplied_by) <= {"base"}
    for bad in (-0.1, 1.0):
        with pytest.raises(LoramemError, match="base_weight must be at least 0 and below 1"):
            memory.ask(questions[0], mode="multi", merge=method, base_weight=bad)
    with pytest.raises(LoramemError, match="base_weight is for output compositions"):
        memory.ask(questions[0], mode="multi", merge="ties", base_weight=0.5)


@pytest.mark.parametrize("method", ["mix", "select"])
def test_a_router_temperature_sharpens_the_weights_and_keeps_the_facts(sharded, method):
    memory, records = sharded
    questions = ["What is the phone number of Cy Ortega?", "What is the phone number of Flo Quist?"]
    flat = memory.ask_many(questions, mode="multi", router="bm25", top_k=2, merge=method, router_temperature=1.0)
    sharp = memory.ask_many(questions, mode="multi", router="bm25", top_k=2, merge=method, router_temperature=0.25)
    default = memory.ask_many(questions, mode="multi", router="bm25", top_k=2, merge=method)
    assert [a.text[:12] for a in sharp] == ["212-340-1187", "509-670-4410"]
    for answers, temperature in ((flat, 1.0), (sharp, 0.25), (default, AskSpec.router_temperature)):
        for a, b in zip(answers, flat):
            assert a.modules == b.modules and a.module_scores == b.module_scores
            expected = torch.tensor(b.module_scores).div(temperature).softmax(-1).tolist()
            assert a.module_weights == pytest.approx(expected)
    assert all(s.module_weights[0] > f.module_weights[0] for s, f in zip(sharp, flat))
    for bad in (0.0, -1.0):
        with pytest.raises(LoramemError, match="router_temperature must be above 0"):
            memory.ask(questions[0], mode="multi", merge=method, router_temperature=bad)
    with pytest.raises(LoramemError, match="router_temperature weighs output compositions"):
        memory.ask(questions[0], mode="multi", merge="linear", router_temperature=0.5)


def test_router_abstains_below_its_threshold(sharded):
    memory, _ = sharded
    answer = memory.ask("Which river flows through Vienna?", mode="lora", router="bm25", threshold=1e6)
    assert answer.modules == []


def test_bad_top_k_router_and_merge(sharded):
    memory, _ = sharded
    with pytest.raises(LoramemError, match="top-k 4"):
        memory.ask("q?", mode="multi", top_k=4)
    with pytest.raises(LoramemError, match="top-k"):
        memory.ask("q?", mode="multi", top_k=0)
    with pytest.raises(LoramemError, match="unknown router"):
        memory.ask("q?", router="psychic")
    with pytest.raises(LoramemError, match="unknown merge method"):
        memory.ask("q?", mode="multi", router="bm25", merge="blend")


def test_empty_memory_asks_clearly(tiny, tmp_path):
    memory = Memory.open(tmp_path / "none.mem", create=True, base=tiny)
    with pytest.raises(LoramemError, match="no modules"):
        memory.ask("q?", mode="multi")
    assert memory.ask("q?", mode="base").modules == []


def test_facts_sharded_by_tokens(tiny, tmp_path):
    memory = Memory.open(tmp_path / "sharded.mem", create=True, base=tiny)
    facts = facts_from_text("".join(SHARDS))  # six facts of ~25 tokens each
    records = list(memory.write_shards(facts, 60, LoraSpec(rank=4, layers="all"), TrainSpec(epochs=1), progress=False))
    assert [r.n_examples for r in records] == [2, 2, 2] and [r.name for r in records] == ["shard-0", "shard-1", "shard-2"]
    assert [m.id for m in memory.modules()] == [r.id for r in records]
    with pytest.raises(LoramemError, match="at least 1 token"):
        list(memory.write_shards(facts, 0))


def test_shards_are_even_with_no_runt(tiny, tmp_path):
    memory = Memory.open(tmp_path / "even.mem", create=True, base=tiny)
    facts = facts_from_text("".join(f"Question: What is the code of room {i}? Answer: {i}{i}{i}\n" for i in range(9)))
    per_fact = max(len(tiny.tokenizer(e.prompt + e.answer, add_special_tokens=False).input_ids) for e in facts)
    records = list(memory.write_shards(facts, 4 * per_fact, LoraSpec(rank=2, layers="all"), TrainSpec(epochs=1), progress=False))
    assert [r.n_examples for r in records] == [3, 3, 3]  # not 4, 4, 1


def test_chat_prompts_are_trained_and_answered_alike(tiny, tmp_path):
    memory = Memory.open(tmp_path / "chat.mem", create=True, base=tiny, prompt="chat")
    # Trained past the first exact recall so that merged and unmerged float rounding cannot flip a near tie.
    spec = TrainSpec(lr=1e-2, epochs=60, batch_size=2, target_recall=None, **LINEAR_TO_ZERO)
    record = memory.write(facts_from_text(FACTS), lora=LoraSpec(rank=8, layers="all"), train_spec=spec, progress=False)
    assert record.recall == 1.0  # recall is measured on the chat-rendered prompts
    answer = memory.ask("What is the phone number of Ann Lee?")
    assert answer.text == "603-556-7631"
    assert memory.examples(record)[0].prompt.startswith("Question:")  # stored in the plain form
    reopened = Memory.open(tmp_path / "chat.mem", base=tiny)
    assert reopened.prompt == "chat" and reopened.ask("What is the phone number of Bo Kim?").text == "705-882-9365"
    with pytest.raises(LoramemError, match="written with chat prompts"):
        Memory.open(tmp_path / "chat.mem", base=tiny, prompt="plain")
    with pytest.raises(LoramemError, match="unknown prompt style"):
        Memory.open(tmp_path / "other.mem", create=True, base=tiny, prompt="fancy")


def test_a_module_set_is_merged_once_whatever_the_routers_order():
    from loramem.memory import _group_by_modules
    from loramem.route import Hit

    picks = [[Hit("a", 0.9), Hit("b", 0.5)], [Hit("b", 0.8), Hit("a", 0.7)], [Hit("c", 1.0)]]
    assert _group_by_modules(picks) == {("a", "b"): [0, 1], ("c",): [2]}


def test_score_reads_answers_teacher_forced_with_and_without_the_module(written, tiny):
    memory, record = written
    facts = facts_from_text(FACTS)
    with_module, without = memory.score(facts, record.id), memory.score(facts)
    assert all(s.exact for s in with_module) and not any(s.exact for s in without)
    # the log-probabilities are those of a plain forward pass over prompt + answer
    ids = tiny.tokenizer(facts[0].prompt).input_ids
    answer = tiny.tokenizer(facts[0].answer, add_special_tokens=False).input_ids
    with torch.no_grad(), autocast(use_bf16("auto", tiny.model), tiny.device):  # scoring's precision
        logp = torch.log_softmax(tiny.model(input_ids=torch.tensor([ids + answer])).logits[0].float(), -1)
    expected = logp[len(ids) - 1 : len(ids) + len(answer) - 1].gather(1, torch.tensor(answer)[:, None])[:, 0]
    torch.testing.assert_close(without[0].logp, expected, rtol=1e-4, atol=1e-4)
    assert without[0].target.tolist() == answer


def test_score_puts_questions_in_the_memory_prompt_style(tiny, tmp_path):
    memory = Memory.open(tmp_path / "chat.mem", create=True, base=tiny, prompt="chat")
    record = memory.write(facts_from_text(FACTS), lora=LoraSpec(rank=8, layers="all"), train_spec=FAST, progress=False)
    assert record.recall == 1.0
    # stored plain, trained in the chat template: scoring the stored form reads it as it was trained
    assert all(s.exact for s in memory.score(facts_from_text(FACTS), record.id))


@pytest.mark.parametrize("method", ["mix", "select", "select-token"])
def test_composed_answers_name_their_modules_weights_and_suppliers(tiny, tmp_path, method):
    memory = Memory.open(tmp_path / "m.mem", model="tiny", create=True, base=tiny)
    spec = TrainSpec(lr=1e-2, epochs=3, batch_size=2, target_recall=None, **LINEAR_TO_ZERO)
    for i, part in enumerate((SIX_FACTS[:3], SIX_FACTS[3:])):
        memory.write(part, lora=LoraSpec(rank=2, layers="all"), train_spec=spec, name=f"part-{i}")
    questions = [f.prompt for f in SIX_FACTS[:2]]
    answers = memory.ask_many(questions, mode="multi", router="bm25", top_k=2, merge=method, max_new_tokens=6)
    one_by_one = [memory.ask(q, mode="multi", router="bm25", top_k=2, merge=method, max_new_tokens=6) for q in questions]
    assert [a.text for a in answers] == [a.text for a in one_by_one]
    for a in answers:
        assert len(a.modules) == 2 and len(a.module_weights) == 2 and sum(a.module_weights) == pytest.approx(1.0)
        assert len(a.supplied_by) == a.completion_tokens and set(a.supplied_by) <= set(a.modules)
        assert a.timing["decode"] > 0
    with pytest.raises(LoramemError, match="top-k 3 is more than the 2 modules"):
        memory.ask(questions[0], mode="multi", top_k=3, merge=method)


def test_forgotten_facts_answer_as_the_base_model_and_the_others_do_not_change(tiny, tmp_path):
    from loramem.bench.phonebook import phone_exact_match
    from loramem.route import _set_digest

    memory = Memory.open(tmp_path / "m.mem", create=True, base=tiny)
    records = [memory.write(facts_from_text(text), lora=LoraSpec(rank=8, layers="all"), train_spec=FAST,
                            name=f"shard-{i}", progress=False) for i, text in enumerate(SHARDS)]
    facts = [f for text in SHARDS for f in facts_from_text(text)]
    questions = [f.prompt.removeprefix("Question: ").removesuffix(" Answer:") for f in facts]
    router = memory.router("bm25")
    scores = router.scores(questions)  # (questions, modules): each question's own shard is its best
    column = [router.modules.index(r.id) for r in records]
    own = [scores[q, column[q // 2]] for q in range(6)]
    other = [max(scores[q, column[m]] for m in range(3) if m != q // 2) for q in range(6)]
    assert min(own) > max(other)
    ask = dict(mode="lora", router="bm25", threshold=(min(own) + max(other)) / 2)
    before = [a.text for a in memory.ask_many(questions, **ask)]
    base = [a.text for a in memory.ask_many(questions, mode="base")]
    assert all(phone_exact_match(t, f.answer.strip()) for t, f in zip(before, facts))
    assert not any(phone_exact_match(t, f.answer.strip()) for t, f in zip(base, facts))

    assert [m.id for m in memory.forget(module="shard-0")] == [records[0].id]
    after = memory.ask_many(questions, **ask)
    assert [a.text for a in after[:2]] == base[:2] and [a.modules for a in after[:2]] == [[], []]
    assert [a.text for a in after[2:]] == before[2:]
    rag = memory.ask(questions[0], mode="rag", router="bm25", top_k=4)  # its passages are gone: 4 of 6 left
    assert all(not c["id"].startswith(records[0].id) for c in rag.chunks)
    assert [m.id for m in Memory.open(memory.path, base=tiny).modules()] == [r.id for r in records[1:]]
    with pytest.raises(LoramemError, match="no module 'shard-0'"):
        memory.forget(module="shard-0")
    with pytest.raises(LoramemError, match="no document 'nowhere.md'"):
        memory.forget(document="nowhere.md")
    freed = memory.compact()
    assert freed["modules_deleted"] == 1 and freed["bytes_freed"] > 0
    assert not memory.store.module_dir(records[0].id).exists()
    assert freed["indexes_deleted"] >= 1  # the index of the three modules' set
    assert all(f.name.endswith(_set_digest([r.id for r in records[1:]])) for f in (memory.path / "index").iterdir())


def test_forgetting_while_another_process_writes_is_refused(tiny, tmp_path):
    from loramem.store import writer_lock

    memory = Memory.open(tmp_path / "m.mem", create=True, base=tiny)
    memory.write(facts_from_text(FACTS), lora=LoraSpec(rank=2, layers="all"), train_spec=TrainSpec(epochs=1),
                 progress=False)
    with writer_lock(memory.path), pytest.raises(LoramemError, match="is being written"):
        memory.forget(module="module-1")
    assert len(memory.modules()) == 1
    assert memory.modules()[0].train_spec["lr"] == 1e-2  # the default rate, resolved for its 4 layers and kept


@pytest.mark.parametrize("style", ["plain", "chat"])
def test_an_anchor_is_distilled_from_the_model_without_the_documents(tiny, tmp_path, style):
    from loramem.corpus import Document
    from loramem.examples import data_hash
    from loramem.prompts import closed_book_prompt

    memory = Memory.open(tmp_path / "anchored.mem", create=True, base=tiny, prompt=style)
    doc = Document.from_text("The Aurora telescope was built in Chile in 1998.", title="aurora")
    about, general = closed_book_prompt("Where was Aurora built?"), closed_book_prompt("What is the capital of France?")
    examples = [Example(about, " In Chile."), Example(general, " Paris.", anchor=True)]
    spec = TrainSpec(objective="distill", epochs=1, target_recall=None, precision="fp32")
    job, digest = memory._job(examples, [doc], LoraSpec(rank=2, layers="all"), spec)
    document_view = memory._prompt(about, doc.text) if style == "chat" else None  # plain: the shared context prefix
    assert job.teacher_prompts == (document_view, memory._prompt(general))  # the anchor's teacher reads no document
    assert digest != data_hash([examples[0], Example(general, " Paris.")])
    assert data_hash(examples[:1]) == data_hash([Example(about, " In Chile.", anchor=False)])  # old ids unchanged
    record = memory.write(examples, LoraSpec(rank=2, layers="all"), spec, name="anchored", documents=[doc],
                          progress=False)
    assert memory.examples(record) == examples  # stored with the mark


@pytest.mark.parametrize("style", ["plain", "chat"])
def test_a_passage_prompt_trains_the_question_after_its_passages_against_the_documents_teacher(tiny, tmp_path, style):
    from loramem.corpus import Document
    from loramem.examples import data_hash
    from loramem.prompts import closed_book_prompt

    memory = Memory.open(tmp_path / "passages.mem", create=True, base=tiny, prompt=style)
    doc = Document.from_text("The Aurora telescope was built in Chile in 1998. It observes galaxies.", title="aurora")
    about = closed_book_prompt("Where was Aurora built?")
    examples = [Example(about, " In Chile."), Example(about, " In Chile.", context="It observes galaxies.")]
    spec = TrainSpec(objective="distill", epochs=1, target_recall=None, precision="fp32")
    job, digest = memory._job(examples, [doc], LoraSpec(rank=2, layers="all"), spec)
    assert job.examples[1].prompt == memory._prompt(about, "It observes galaxies.")  # as lora+rag asks it
    assert job.examples[0].prompt == (about if style == "plain" else memory._prompt(about))
    teacher = memory._prompt(about, doc.text) if style == "chat" else None
    assert job.teacher_prompts == ((teacher, teacher) if style == "chat" else ())  # both read the whole document
    assert digest != data_hash([examples[0], examples[0]])
    record = memory.write(examples, LoraSpec(rank=2, layers="all"), spec, name="passages", documents=[doc],
                          progress=False)
    assert memory.examples(record) == examples  # stored with the passage
