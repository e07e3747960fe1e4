"""Where modules are trained: in this process (the default) or as Ray tasks across a cluster.

Training one module is a pure function of its job (examples, LoRA and training specs, base model): the
same job gives the same adapter wherever it runs. An executor takes jobs (`submit`) and hands back
trained adapters in staging folders (`finished`); the driver (Memory) commits each one into the store,
so the store is only ever written by one process and a commit stays atomic.

    executor.submit(job)
    for job, staged, stats in executor.finished(staging, wait=True):
        store.commit(staged, record_for(job, stats))
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from loramem.config import LoraSpec, TrainSpec
from loramem.errors import LoramemError
from loramem.models import Base, load_base, same_base
from loramem.examples import Example
from loramem.train.adapters import attached, save_adapter
from loramem.train.loop import TrainStats, train

EXECUTORS = ("inprocess", "ray")
Staging = Callable[[], Path]  # a fresh empty folder to put a trained adapter in (the store's tmp/)
Finished = tuple["TrainJob", Path, TrainStats]


@dataclass(frozen=True)
class TrainJob:
    """Everything needed to train one module, and nothing of the store: it travels to Ray workers."""

    module_id: str
    examples: list[Example]
    lora: LoraSpec
    train_spec: TrainSpec
    model: str  # registry name or path, resolved on the machine that trains
    fingerprint: dict  # of the driver's base model: a worker with other weights refuses the job
    context: str = ""  # the module's documents, read by the teacher of the distill objective
    # Per example, the whole prompt the distill teacher reads before the answer (the question asked with the documents
    # in the prompt, as ICL asks it); None or absent: the documents put before the student's prompt.
    teacher_prompts: tuple[str | None, ...] = ()


def train_module(base: Base, job: TrainJob, staging: Staging, progress: bool = True) -> tuple[Path, TrainStats]:
    """Train one module on `base` and save it as a PEFT adapter in a folder from `staging`."""
    with attached(base.model, job.lora, seed=job.train_spec.seed) as peft_model:
        stats = train(peft_model, base.tokenizer, job.examples, job.train_spec, progress=progress,
                      context=job.context or None, teacher_prompts=job.teacher_prompts or None)
        folder = staging()  # asked for only now: a failed training leaves no memory behind
        save_adapter(peft_model, folder)
    return folder, stats


class InProcess:
    """Train each job in this process on an already loaded base model, when its result is asked for."""

    def __init__(self, base: Base, progress: bool = True):
        self.base = base
        self.progress = progress
        self._queue: list[TrainJob] = []

    def submit(self, job: TrainJob) -> None:
        self._queue.append(job)

    def finished(self, staging: Staging, wait: bool = True) -> Iterator[Finished]:
        # Training here is synchronous, so a job is "finished" as soon as it is asked for, wait or not.
        while self._queue:
            job = self._queue.pop(0)
            folder, stats = train_module(self.base, job, staging, self.progress)
            yield job, folder, stats

    def cancel(self) -> None:
        self._queue.clear()


class RayExecutor:
    """Train each job as a Ray task (one GPU each on a cluster with GPUs, else `num_cpus` CPUs) and hand the
    adapters back as they complete, in any order.

    `address`: None starts a local Ray (or uses the one this process already started), "auto" joins the
    cluster of this machine (`ray start --head`), "ray://host:10001" connects through Ray Client.
    """

    def __init__(self, address: str | None = None, num_cpus: int = 1):
        self.ray = ray = connect_ray(address)
        self._remote = ray_task(ray, _train_to_files, num_cpus)
        self._pending: dict = {}  # ObjectRef -> TrainJob

    def submit(self, job: TrainJob) -> None:
        # the driver's thread count: matmuls reduce in another order on another count (a Ray worker with num_cpus=1
        # runs one thread), which moved adapters by ~1e-5 from in-process training's
        self._pending[self._remote.remote(job, torch.get_num_threads())] = job

    def finished(self, staging: Staging, wait: bool = True) -> Iterator[Finished]:
        while self._pending:
            ready, _ = self.ray.wait(list(self._pending), num_returns=1, timeout=None if wait else 0)
            if not ready:
                return
            job = self._pending.pop(ready[0])
            files, stats = ray_result(self.ray, ready[0])
            folder = staging()
            for name, data in files.items():
                (folder / name).write_bytes(data)
            yield job, folder, stats

    def cancel(self) -> None:
        for ref in self._pending:
            self.ray.cancel(ref)
        self._pending.clear()


def connect_ray(address: str | None = None):
    """The ray module, connected: None starts a local Ray (or reuses this process's), "auto" joins this machine's
    cluster, "ray://host:10001" connects through Ray Client."""
    try:
        import ray
    except ImportError:
        raise LoramemError("the Ray executor needs ray: pip install 'loramem[ray]'") from None
    if not ray.is_initialized():
        try:
            # A local Ray started for one job needs no dashboard (its processes cost a core's worth here).
            local = {"include_dashboard": False} if address is None else {}
            ray.init(address=address, log_to_driver=False, **local)
        except ConnectionError as err:
            raise LoramemError(f"cannot reach a Ray cluster at {address}: {str(err).splitlines()[0]}") from None
    return ray


def ray_task(ray, fn, num_cpus: int = 1):
    """`fn` as a Ray task: one GPU per call on a cluster with GPUs, else `num_cpus` CPUs."""
    uses_gpus = ray.cluster_resources().get("GPU", 0) >= 1
    return ray.remote(**({"num_gpus": 1} if uses_gpus else {"num_cpus": num_cpus}))(fn)


def ray_result(ray, ref):
    """A finished task's result; bad input in the worker raises its one-line LoramemError, not a traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, LoramemError):
            raise err.cause from None
        raise


def _train_to_files(job: TrainJob, threads: int | None = None) -> tuple[dict[str, bytes], TrainStats]:
    """A Ray task: train the job on this worker's copy of the base model, with `threads` torch threads (the
    driver's, so results are the in-process ones); the adapter comes back as bytes."""
    if threads is not None:
        torch.set_num_threads(threads)
    base = _worker_base(job.model)
    if not same_base(base.fingerprint, job.fingerprint):
        import socket

        raise LoramemError(f"model {job.model!r} on {socket.gethostname()} is not the driver's (other weights)")
    with tempfile.TemporaryDirectory(prefix="loramem-job-") as tmp:
        folder, stats = train_module(base, job, lambda: Path(tmp), progress=False)
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}, stats


@functools.lru_cache(maxsize=1)
def _worker_base(model: str) -> Base:
    """The base model, loaded once per worker process (Ray reuses CPU workers; GPU workers run one task)."""
    return load_base(model)


def check_executor(kind: str, address: str | None = None) -> None:
    """A clear error for an unknown executor, or a Ray address given without Ray."""
    if kind not in EXECUTORS:
        raise LoramemError(f"unknown executor {kind!r}: choose {' or '.join(EXECUTORS)}")
    if address and kind != "ray":
        raise LoramemError("--address needs --executor ray")


def make_executor(kind: str, address: str | None = None):
    """The executor named on the command line; None means the memory's own in-process one."""
    check_executor(kind, address)
    return None if kind == "inprocess" else RayExecutor(address)
