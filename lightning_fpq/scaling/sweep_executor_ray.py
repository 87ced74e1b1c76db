"""The ``ray`` executor: a sweep's runs on a Ray cluster (``pip install 'lightning-fpq[ray]'``).

``lightning-fpq sweep sweep.yaml --executor ray --address HOST:PORT`` connects to a running
cluster (``ray start --head`` on one machine, ``ray start --address HOST:PORT`` on the others, or
Ray's launchers for SLURM and Kubernetes); without an address, Ray starts on this machine (and
gives each run its GPUs there). Each worker is a Ray actor holding ``cpus_per_run`` CPUs and
``gpus_per_run`` GPUs, started once and fed run after run (the compiled quantizer is built once
per actor); ``ray.wait`` hands each row to the driver as its run finishes, and the driver alone
writes the CSV. An actor that dies is replaced by a fresh one and its run tried again
(``max_retries``, in :class:`~lightning_fpq.scaling.sweep_executor.PoolExecutor`).

Every node needs the same environment: lightning-fpq, and the packages of a custom datamodule
or model, installed where the actors run.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any

from .sweep_config import SweepConfig
from .sweep_executor import Job, PoolExecutor, RunError, SweepWorker, Where, WorkerLost, threads_per_run
from .sweep_run import one_line

__all__ = ["RAY_MISSING", "RayExecutor", "RayWorker", "check_reachable", "import_ray"]

RAY_MISSING = "executor 'ray' needs Ray, which is not installed: pip install 'lightning-fpq[ray]'"


def import_ray() -> Any:
    """The ``ray`` module; ImportError (one line, naming the extra to install) without it."""
    try:
        import ray
    except ImportError:
        raise ImportError(RAY_MISSING, name="ray") from None
    return ray


class RayWorker(SweepWorker):
    """The sweep worker as a Ray actor: it reports its node as where a run trained."""

    def where(self) -> Where:
        import ray

        return ray.get_runtime_context().get_node_id()[:8], os.getpid()


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A ``HOST:PORT`` address must accept a connection: Ray itself would retry for minutes.
    ``auto`` and ``ray://`` addresses are left to Ray. ConnectionError, one line, if it does not."""
    match = re.fullmatch(r"\s*([\w.\-]+):(\d+)\s*", address)
    if match is None:
        return
    try:
        socket.create_connection((match[1], int(match[2])), timeout=timeout_s).close()
    except OSError as err:
        raise ConnectionError(
            f"cannot reach the Ray cluster at {address.strip()} ({err.strerror or type(err).__name__}): "
            "is `ray start --head` running there, and is that its address?"
        ) from None


def _ray_reason(err: BaseException) -> str:
    """A Ray error as one line: its type, its first line, and the worker's exit detail if given."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    detail = next((line for line in lines if "exit detail" in line.lower()), "")
    return one_line(f"{text} {detail}" if detail else text)


class RayExecutor(PoolExecutor):
    """``workers`` Ray actors (0: as many as the cluster's CPUs and GPUs hold), each with
    ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs."""

    name = "ray"

    def __init__(self, cfg: SweepConfig, n_jobs: int) -> None:
        super().__init__(cfg, n_jobs)
        self.ray = import_ray()
        self._started_ray = False
        self._actor_class: Any = None

    def __enter__(self) -> RayExecutor:
        ray = self.ray
        if not ray.is_initialized():
            if self.cfg.address is None:
                ray.init(include_dashboard=False)
            else:
                check_reachable(self.cfg.address)
                ray.init(address=self.cfg.address)
            self._started_ray = True
        self._actor_class = ray.remote(RayWorker).options(
            num_cpus=self.cfg.cpus_per_run,
            num_gpus=self.cfg.gpus_per_run,
            max_restarts=0,  # a dead actor is replaced by a fresh one, and its run retried, by PoolExecutor
            max_task_retries=0,
        )
        super().__enter__()
        return self

    def close(self, graceful: bool = True) -> None:
        super().close(graceful)
        if self._started_ray:
            self.ray.shutdown()
            self._started_ray = False

    def _resources(self) -> tuple[float, float, int]:
        resources = self.ray.cluster_resources()
        nodes = sum(1 for node in self.ray.nodes() if node.get("Alive"))
        return float(resources.get("CPU", 0)), float(resources.get("GPU", 0)), nodes

    def _count(self) -> int:
        if self.cfg.workers:
            return self.cfg.workers
        cpus, gpus, _ = self._resources()
        fit = int(cpus // self.cfg.cpus_per_run)
        if self.cfg.gpus_per_run:
            fit = min(fit, int(gpus // self.cfg.gpus_per_run))
        if fit < 1:
            raise ValueError(
                f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs: not enough for one run with "
                f"cpus_per_run={self.cfg.cpus_per_run:g} and gpus_per_run={self.cfg.gpus_per_run:g}"
            )
        return fit

    def describe(self) -> str:
        cpus, gpus, nodes = self._resources()
        return (
            f"on {len(self._workers)} Ray workers ({self.cfg.cpus_per_run:g} CPU, {self.cfg.gpus_per_run:g} GPU "
            f"and {threads_per_run(self.cfg)} torch threads per run; the cluster: {nodes} node(s), "
            f"{cpus:g} CPUs, {gpus:g} GPUs)"
        )

    def _start_worker(self, index: int) -> Any:
        return self._actor_class.remote(self.cfg, threads_per_run(self.cfg))

    def _submit(self, worker: Any, job: Job) -> Any:
        return worker.run.remote(job)

    def _wait(self, tokens: list[Any]) -> list[tuple[Any, Any]]:
        ray = self.ray
        ready, _ = ray.wait(tokens, num_returns=1)
        done = []
        for ref in ready:
            try:
                done.append((ref, ray.get(ref)))
            except ray.exceptions.RayTaskError as err:  # run() raised past run_row: the actor lives on
                done.append((ref, RunError(_ray_reason(err))))
            except ray.exceptions.RayError as err:  # the actor, its process or its node is gone
                done.append((ref, WorkerLost(_ray_reason(err))))
        return done

    def _stop_worker(self, worker: Any, graceful: bool) -> None:
        try:
            self.ray.kill(worker, no_restart=True)
        except Exception:  # already gone, or Ray is shutting down: nothing left to stop
            pass
