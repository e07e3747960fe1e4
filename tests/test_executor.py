"""Training modules as Ray tasks: the same adapters as in-process, committed by the driver, resumable.

One local Ray (2 CPUs, shared by the whole session: see conftest): starting Ray costs seconds. Deselect with -m "not ray".
"""

import json

import pytest
from safetensors.torch import load_file

from loramem import LoraSpec, Memory, TrainSpec
from loramem.corpus import Document
from loramem.errors import LoramemError
from loramem.executor import InProcess, make_executor
from loramem.synth import SynthSpec
from loramem.examples import Example
from sample_facts import SIX_FACTS as FACTS, LINEAR_TO_ZERO

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

LORA = LoraSpec(rank=4, layers="all")
FAST = TrainSpec(lr=1e-2, epochs=10, batch_size=2, **LINEAR_TO_ZERO)
SHARD_TOKENS = 60  # two facts a shard: three modules


@pytest.fixture(scope="module")
def executor(local_ray):
    from loramem.executor import RayExecutor

    return RayExecutor()


class Counting:
    """An executor that notes the modules it was asked to train."""

    def __init__(self, inner):
        self.inner, self.submitted = inner, []

    def submit(self, job):
        self.submitted.append(job.module_id)
        self.inner.submit(job)

    def finished(self, staging, wait=True):
        return self.inner.finished(staging, wait)

    def cancel(self):
        self.inner.cancel()


def adapter(memory, module_id):
    return load_file(memory.store.module_dir(module_id) / "adapter_model.safetensors")


def test_ray_modules_equal_in_process_ones(tiny, executor, tmp_path):
    local = Memory.open(tmp_path / "local.mem", create=True, base=tiny)
    remote = Memory.open(tmp_path / "ray.mem", create=True, base=tiny)
    here = {r.id: r for r in local.write_shards(FACTS, SHARD_TOKENS, LORA, FAST, progress=False)}
    there = {r.id: r for r in remote.write_shards(FACTS, SHARD_TOKENS, LORA, FAST, progress=False, executor=executor)}
    assert len(here) == 3 and here.keys() == there.keys()
    for module_id, record in here.items():
        assert (there[module_id].name, there[module_id].recall, there[module_id].train_tokens) == \
               (record.name, record.recall, record.train_tokens)
        ours, theirs = adapter(local, module_id), adapter(remote, module_id)
        assert ours.keys() == theirs.keys()
        assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
    question = "What is the phone number of Di Novak?"
    assert remote.ask(question, mode="lora", router="bm25").text == local.ask(question, mode="lora", router="bm25").text
    assert not (remote.path / "tmp").exists() or not any((remote.path / "tmp").iterdir())


def test_ray_write_resumes_without_retraining_committed_modules(tiny, executor, tmp_path):
    memory = Memory.open(tmp_path / "resume.mem", create=True, base=tiny)
    first = memory.write(FACTS[:2], LORA, FAST, name="shard-0", progress=False)  # as if interrupted after one
    counting = Counting(executor)
    records = list(memory.write_shards(FACTS, SHARD_TOKENS, LORA, FAST, progress=False, executor=counting))
    assert len(records) == 3 and len(counting.submitted) == 2 and first.id not in counting.submitted
    assert [r for r in records if r.id == first.id] == [first]  # the committed one, untouched
    again = Counting(executor)
    assert {r.id for r in memory.write_shards(FACTS, SHARD_TOKENS, LORA, FAST, executor=again)} == {r.id for r in records}
    assert again.submitted == [] and len(memory.modules()) == 3


def test_ray_documents_one_module_each(tiny, executor, tmp_path):
    memory = Memory.open(tmp_path / "docs.mem", create=True, base=tiny)
    docs = [Document.from_text("Zorblat engines use quantum gears built in Oslo.", title="gears"),
            Document.from_text("Mira Tan designed the first Quix engine in 1984.", title="quix")]
    written = list(memory.write_documents(docs, SynthSpec(formats="original"), lora=LORA,
                                          train_spec=TrainSpec(epochs=2), progress=False, executor=executor))
    assert sorted(r.name for r, _ in written) == ["gears", "quix"]
    assert all(reports[0].doc_id == memory.documents(r)[0].id for r, reports in written)


def test_a_bad_job_fails_with_its_own_error_and_writes_nothing(tiny, executor, tmp_path):
    memory = Memory.open(tmp_path / "bad.mem", create=True, base=tiny)
    with pytest.raises(LoramemError, match="empty answer"):
        memory.write([Example("Question: x? Answer:", "")], LORA, FAST, progress=False, executor=executor)
    assert not (tmp_path / "bad.mem").exists()


def test_cli_writes_shards_with_the_ray_executor(tiny, executor, tmp_path):
    from typer.testing import CliRunner

    from loramem.cli import app

    facts = tmp_path / "facts.txt"
    facts.write_text("".join(f"{e.prompt}{e.answer}\n" for e in FACTS))
    # In this process, so the command joins the running Ray (whose workers already hold the model).
    out = CliRunner().invoke(app, ["write", str(tmp_path / "m"), str(facts), "--model", "tiny", "--shard-tokens",
                                   str(SHARD_TOKENS), "--rank", "4", "--epochs", "2", "--executor", "ray", "--json"])
    assert out.exit_code == 0, out.output
    assert sorted(m["name"] for m in json.loads(out.stdout)["modules"]) == ["shard-0", "shard-1", "shard-2"]


def test_executor_choice_is_checked():
    assert make_executor("inprocess") is None
    with pytest.raises(LoramemError, match="unknown executor"):
        make_executor("slurm")
    with pytest.raises(LoramemError, match="--address needs --executor ray"):
        make_executor("inprocess", "auto")


def test_in_process_trains_when_asked_and_cancel_drops_the_queue(tiny, tmp_path):
    from loramem.executor import TrainJob

    runner = InProcess(tiny, progress=False)
    job = TrainJob("x", FACTS[:1], LORA, TrainSpec(epochs=1), "tiny", tiny.fingerprint)
    runner.submit(job)
    runner.cancel()
    assert list(runner.finished(lambda: tmp_path)) == []
    runner.submit(job)
    [(done, folder, stats)] = runner.finished(lambda: tmp_path)
    assert done is job and folder == tmp_path and (tmp_path / "adapter_model.safetensors").is_file()
    assert stats.steps == 1
