"""Where a sweep's runs train: one interface, three executors.

An executor takes the runs still to do (:class:`Job`: a run spec and its settings hash) and yields
an :class:`Event` as each run starts and finishes. The driver
(:func:`~lightning_fpq.scaling.sweep.run_sweep`) alone writes the CSV, one row per finished run,
and keeps the progress bar, so the resumable CSV, its settings hash, the failed rows and the
time-left estimate are the same whatever trains the runs:

- ``sequential``: the runs one after another in this process (the default);
- ``local``: ``workers`` processes on this machine (:class:`LocalExecutor`);
- ``ray``: ``workers`` Ray actors on a cluster (``lightning_fpq.scaling.sweep_executor_ray``).

Workers are long-lived: one process (or actor) trains run after run, so the compiled quantizer
(``fastquant.py``) is built once per worker, not once per run. A run that raises is a ``failed``
row with its reason, made in the worker. A worker that dies (out of memory, a segfault, a lost
node) is replaced by a fresh one and its run tried again, at most ``max_retries`` times; then the
run is a ``failed`` row that says so, and the sweep goes on.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import socket
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

from .sweep_config import SweepConfig
from .sweep_plan import RunSpec
from .sweep_progress import quiet_lightning
from .sweep_run import failed_row, run_row

__all__ = [
    "Event",
    "Executor",
    "Job",
    "LocalExecutor",
    "PoolExecutor",
    "RunError",
    "SequentialExecutor",
    "SweepWorker",
    "WorkerLost",
    "make_executor",
    "threads_per_run",
]

Where = tuple[str, int]  # (node, process id) of the worker that trained a run


@dataclass(frozen=True)
class Job:
    """One run to train: its spec and the settings hash its row carries."""

    spec: RunSpec
    settings: str


@dataclass(frozen=True)
class Event:
    """What an executor reports. ``started``: a run went to a worker. ``retry``: its worker died
    (``reason`` says how) and the run goes to a fresh worker. ``finished``: ``row`` is its CSV row."""

    kind: str
    job: Job
    row: Optional[dict[str, Any]] = None
    reason: str = ""
    where: Where = ("", 0)


@dataclass(frozen=True)
class WorkerLost:
    """A worker died before it returned its run's row: the run is tried again on a fresh worker."""

    reason: str
    where: Where = ("", 0)


@dataclass(frozen=True)
class RunError:
    """The worker is alive but could not return a row (the executor failed, not the run's training):
    the run is recorded as failed, not tried again."""

    reason: str
    where: Where = ("", 0)


def threads_per_run(cfg: SweepConfig) -> int:
    """torch threads in a worker: ``threads``, or else the CPUs a run gets (``cpus_per_run``, at least 1)."""
    return cfg.threads or max(1, int(cfg.cpus_per_run))


class SweepWorker:
    """Trains runs one after another in one process: this one (sequential), a local worker process
    or a Ray actor. Long-lived, so the compiled quantizer is built once per worker."""

    def __init__(self, cfg: SweepConfig, threads: int) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.unquiet = quiet_lightning()

    def run(self, job: Job) -> tuple[dict[str, Any], Where]:
        """``job``'s CSV row (status ``ok``, or ``failed`` with the reason) and where it ran."""
        row = run_row(self.cfg, job.spec, job.settings)
        gc.collect()
        return row, self.where()

    def where(self) -> Where:
        return socket.gethostname(), os.getpid()


class Executor(ABC):
    """Trains jobs and reports them as :class:`Event` s. Use as a context manager: entering starts
    the workers, leaving stops them (at once when an exception, such as Ctrl-C, is on its way)."""

    name = ""

    def __init__(self, cfg: SweepConfig, n_jobs: int) -> None:
        self.cfg = cfg
        self.n_jobs = n_jobs

    @property
    def parallelism(self) -> int:
        """Runs trained at once (for the time-left estimate)."""
        return 1

    @abstractmethod
    def describe(self) -> str:
        """Where the runs train, for the sweep's first line (after entering)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(graceful=exc_type is None)

    @abstractmethod
    def close(self, graceful: bool = True) -> None:
        """Stop the workers (``graceful``: let them finish what they hold; else at once)."""

    @abstractmethod
    def run(self, jobs: Sequence[Job]) -> Iterator[Event]:
        """Train ``jobs``; yield ``started``, ``retry`` and ``finished`` events as they happen."""


class SequentialExecutor(Executor):
    """The runs one after another in this process (what ``lightning-fpq sweep`` does by default)."""

    name = "sequential"

    def __init__(self, cfg: SweepConfig, n_jobs: int) -> None:
        super().__init__(cfg, n_jobs)
        self._worker: Optional[SweepWorker] = None
        self._threads = 0

    def __enter__(self) -> SequentialExecutor:
        import torch

        self._threads = torch.get_num_threads()
        self._worker = SweepWorker(self.cfg, self.cfg.threads)
        return self

    def close(self, graceful: bool = True) -> None:
        if self._worker is not None:
            import torch

            self._worker.unquiet()
            torch.set_num_threads(self._threads)
            self._worker = None

    def describe(self) -> str:
        import torch

        return f"one after another in this process (torch threads: {torch.get_num_threads()})"

    def run(self, jobs: Sequence[Job]) -> Iterator[Event]:
        assert self._worker is not None, "enter the executor first (with executor: ...)"
        for job in jobs:
            yield Event("started", job)
            row, where = self._worker.run(job)
            yield Event("finished", job, row=row, where=where)


class PoolExecutor(Executor):
    """Executors whose long-lived workers train one run at a time each: the scheduling, the results
    as they finish, and the bounded retries of runs whose worker died live here, once. A subclass
    says how many workers there are and how to start, feed, wait on and stop one."""

    def __init__(self, cfg: SweepConfig, n_jobs: int) -> None:
        super().__init__(cfg, n_jobs)
        self._workers: list[Any] = []

    @property
    def parallelism(self) -> int:
        return max(1, len(self._workers))

    # --------------------------------------------------------------- what a subclass provides
    @abstractmethod
    def _count(self) -> int:
        """How many workers to start (at most ``n_jobs``)."""

    @abstractmethod
    def _start_worker(self, index: int) -> Any: ...

    @abstractmethod
    def _submit(self, worker: Any, job: Job) -> Any:
        """Give ``job`` to the idle ``worker``; returns a token that :meth:`_wait` reports."""

    @abstractmethod
    def _wait(self, tokens: list[Any]) -> list[tuple[Any, Any]]:
        """Block until at least one token is done; ``(token, outcome)`` for each done one, the
        outcome being ``(row, where)``, a :class:`WorkerLost` or a :class:`RunError`."""

    @abstractmethod
    def _stop_worker(self, worker: Any, graceful: bool) -> None: ...

    # --------------------------------------------------------------- the shared part
    def __enter__(self) -> PoolExecutor:
        try:
            for index in range(max(1, min(self._count(), self.n_jobs))):
                self._workers.append(self._start_worker(index))
        except BaseException:
            self.close(graceful=False)
            raise
        return self

    def close(self, graceful: bool = True) -> None:
        workers, self._workers = self._workers, []
        for worker in workers:
            self._stop_worker(worker, graceful)

    def _replace(self, worker: Any) -> Any:
        index = next(i for i, w in enumerate(self._workers) if w is worker)
        self._stop_worker(worker, graceful=False)
        self._workers[index] = self._start_worker(index)
        return self._workers[index]

    def run(self, jobs: Sequence[Job]) -> Iterator[Event]:
        pending = deque(jobs)
        idle = list(self._workers)
        busy: dict[Any, tuple[Any, Job]] = {}
        deaths: dict[str, int] = {}
        first_start: dict[str, float] = {}
        while pending or busy:
            while idle and pending:
                worker, job = idle.pop(0), pending.popleft()
                first_start.setdefault(job.spec.run_id, time.perf_counter())
                busy[self._submit(worker, job)] = (worker, job)
                yield Event("started", job)
            for token, outcome in self._wait(list(busy)):
                worker, job = busy.pop(token)
                run_id = job.spec.run_id
                if isinstance(outcome, WorkerLost):
                    deaths[run_id] = deaths.get(run_id, 0) + 1
                    worker = self._replace(worker)
                    if deaths[run_id] <= self.cfg.max_retries:
                        pending.appendleft(job)
                        yield Event("retry", job, reason=outcome.reason, where=outcome.where)
                    else:
                        reason = (
                            f"its worker died {deaths[run_id]} time(s), the last time: {outcome.reason} "
                            f"(max_retries={self.cfg.max_retries})"
                        )
                        row = failed_row(
                            self.cfg, job.spec, job.settings, reason, time.perf_counter() - first_start[run_id]
                        )
                        yield Event("finished", job, row=row, where=outcome.where)
                elif isinstance(outcome, RunError):
                    row = failed_row(
                        self.cfg, job.spec, job.settings, outcome.reason, time.perf_counter() - first_start[run_id]
                    )
                    yield Event("finished", job, row=row, where=outcome.where)
                else:
                    row, where = outcome
                    yield Event("finished", job, row=row, where=tuple(where))
                idle.append(worker)


# ----------------------------------------------------------------------------- local processes


@dataclass(eq=False)
class _Process:
    proc: Any  # multiprocessing.Process (spawn)
    conn: Any  # the driver's end of its pipe


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while worker processes start: they inherit that (Python keeps an inherited
    SIG_IGN), so Ctrl-C in a terminal reaches the driver alone, which then stops them."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are not ours to set
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def local_worker_main(conn: Any, cfg: SweepConfig, threads: int) -> None:
    """A local worker process: train each job the driver sends, send back its row, until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = SweepWorker(cfg, threads)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the driver went away
            return
        if job is None:
            return
        conn.send(worker.run(job))


def _exit_text(exitcode: Optional[int]) -> str:
    if exitcode is None:
        return "its process stopped answering"
    if exitcode < 0:
        try:
            return f"its process was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"its process was killed by signal {-exitcode}"
    return f"its process exited with status {exitcode}"


class LocalExecutor(PoolExecutor):
    """``workers`` processes on this machine (spawned, so no state leaks from the driver), each
    with ``threads`` (or ``cpus_per_run``) torch threads. Workers ignore SIGINT; the driver stops them."""

    name = "local"

    def _count(self) -> int:
        if self.cfg.workers:
            return self.cfg.workers
        return max(1, (os.cpu_count() or 1) // max(1, math.ceil(self.cfg.cpus_per_run)))

    def describe(self) -> str:
        return (
            f"on {len(self._workers)} worker processes on this machine "
            f"(torch threads per run: {threads_per_run(self.cfg)})"
        )

    def _start_worker(self, index: int) -> _Process:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=local_worker_main,
            args=(child, self.cfg, threads_per_run(self.cfg)),
            name=f"lightning-fpq-sweep-worker-{index}",
        )
        with _sigint_ignored():
            proc.start()
        child.close()
        return _Process(proc, parent)

    def _submit(self, worker: _Process, job: Job) -> _Process:
        try:
            worker.conn.send(job)
        except OSError:  # it died while idle: _wait sees its sentinel
            pass
        return worker

    def _wait(self, tokens: list[Any]) -> list[tuple[Any, Any]]:
        from multiprocessing.connection import wait

        owner: dict[Any, _Process] = {}
        for worker in tokens:
            owner[worker.conn] = worker
            owner[worker.proc.sentinel] = worker
        ready = wait(list(owner))
        done = []
        for worker in dict.fromkeys(owner[r] for r in ready):
            outcome: Any = None
            try:
                if worker.conn.poll():
                    outcome = worker.conn.recv()
            except (EOFError, OSError):  # the pipe closed: the process is gone
                outcome = None
            if outcome is None:
                worker.proc.join(timeout=10)
                outcome = WorkerLost(_exit_text(worker.proc.exitcode), (socket.gethostname(), worker.proc.pid or 0))
            done.append((worker, outcome))
        return done

    def _stop_worker(self, worker: _Process, graceful: bool) -> None:
        proc = worker.proc
        if graceful and proc.is_alive():
            try:
                worker.conn.send(None)
            except OSError:
                pass
            proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)
        worker.conn.close()


def make_executor(cfg: SweepConfig, n_jobs: int) -> Executor:
    """The executor ``cfg.executor`` names, for ``n_jobs`` runs; not started (enter it to start).
    ``ray`` without Ray installed: ImportError naming ``pip install 'lightning-fpq[ray]'``."""
    if cfg.executor == "local":
        return LocalExecutor(cfg, n_jobs)
    if cfg.executor == "ray":
        from .sweep_executor_ray import RayExecutor

        return RayExecutor(cfg, n_jobs)
    return SequentialExecutor(cfg, n_jobs)
