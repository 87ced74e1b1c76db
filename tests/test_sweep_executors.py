"""The sweep's executors: local worker processes and a real two-node Ray cluster write the rows the
sequential executor writes; a worker that dies is retried a bounded number of times and then
recorded as failed; Ctrl-C leaves every finished row on disk; the time left covers all workers."""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from lightning_fpq.scaling.sweep import run_sweep
from lightning_fpq.scaling.sweep_config import load_config
from lightning_fpq.scaling.sweep_executor import Job, PoolExecutor, WorkerLost
from lightning_fpq.scaling.sweep_plan import plan_runs, settings_hash
from lightning_fpq.scaling.sweep_progress import Eta
from test_sweep import tiny_config

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TIMING = ("wall_s", "cpu_s", "finished")  # the only columns allowed to differ between executors
GPT = {"block_size": 16, "n_layer": 1, "n_head": 1, "n_embd": 16}
GPT_B = {"block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 32}


def gpt_or_crash(config: dict, lr: float, warmup_steps: int, max_steps: int, crash: str = "", marker: str = ""):
    """The demo GPT from a config dict, or a worker's death: ``crash="always"`` kills the process
    that builds it, ``"once"`` only the first time (``marker`` remembers), ``"hang"`` never returns."""
    from lightning_fpq.demo.model import GPTConfig, GPTLightning

    if crash == "always" or (crash == "once" and not os.path.exists(marker)):
        if marker:
            Path(marker).touch()
        os._exit(3)  # what an out-of-memory kill or a segfault looks like to the driver
    if crash == "hang":
        time.sleep(3600)
    return GPTLightning(GPTConfig(**config), lr=lr, warmup_steps=warmup_steps, max_steps=max_steps)


def crash_config(out: Path, models: dict, **overrides: Any) -> dict:
    return tiny_config(
        out, model=f"{__name__}.gpt_or_crash", models={k: {"args": v} for k, v in models.items()}, **overrides
    )


def rows_by_id(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_id = {r["run_id"]: {k: v for k, v in r.items() if k not in TIMING} for r in rows}
    assert len(by_id) == len(rows), "a run has two rows"
    return by_id


# ------------------------------------------------------------------------------ no processes


def test_time_left_is_shared_by_the_workers():
    one, two = Eta(dict.fromkeys("abcd", 1.0), workers=1), Eta(dict.fromkeys("abcd", 1.0), workers=2)
    for eta in (one, two):
        assert eta.seconds_left() is None and eta.text() == "time left: estimating"
        eta.finished("a", 10.0)
    assert (one.seconds_left(), two.seconds_left()) == (30.0, 15.0)  # 3 runs of 10 s, on 1 or 2 workers
    for eta in (one, two):
        eta.finished("b", 10.0)
        eta.finished("c", 10.0)
    assert one.seconds_left() == two.seconds_left() == 10.0  # one run left: one worker trains it


class ScriptedPool(PoolExecutor):
    """A pool whose workers' outcomes are scripted per run id: to check the scheduling and retries alone."""

    name = "scripted"

    def __init__(self, cfg, n_jobs, script: dict[str, list[str]], workers: int = 2):
        super().__init__(cfg, n_jobs)
        self.script, self.n, self.started = script, workers, 0
        self.queue: list[tuple[int, Job]] = []

    def _count(self):
        return self.n

    def describe(self):
        return "scripted"

    def _start_worker(self, index):
        self.started += 1
        return self.started

    def _submit(self, worker, job):
        self.queue.append((worker, job))
        return (worker, job.spec.run_id)

    def _wait(self, tokens):
        worker, job = self.queue.pop(0)
        outcome = self.script[job.spec.run_id].pop(0)
        if outcome == "dies":
            return [((worker, job.spec.run_id), WorkerLost("its process exited with status 3", ("n", worker)))]
        return [((worker, job.spec.run_id), ({"run_id": job.spec.run_id, "status": outcome}, ("n", worker)))]

    def _stop_worker(self, worker, graceful):
        pass


def test_the_pool_retries_a_run_whose_worker_died_at_most_max_retries_times(tmp_path):
    cfg = load_config(tiny_config(tmp_path, models={"a": {"n_layer": 1, "n_head": 1, "n_embd": 16}}, max_retries=2))
    specs = plan_runs(cfg)[:3]
    jobs = [Job(s, settings_hash(cfg, s)) for s in specs]
    ok, flaky, doomed = (s.run_id for s in specs)
    script = {ok: ["ok"], flaky: ["dies", "ok"], doomed: ["dies", "dies", "dies"]}
    with ScriptedPool(cfg, len(jobs), script) as pool:
        events = list(pool.run(jobs))
    finished = {e.job.spec.run_id: e.row for e in events if e.kind == "finished"}
    assert [e.job.spec.run_id for e in events if e.kind == "retry"] == [flaky, doomed, doomed]
    assert finished[ok]["status"] == finished[flaky]["status"] == "ok"
    assert finished[doomed]["status"] == "failed" and finished[doomed]["run_id"] == doomed
    assert "its worker died 3 time(s)" in finished[doomed]["reason"] and "max_retries=2" in finished[doomed]["reason"]
    assert pool.started == 2 + 4  # every death replaced its worker with a fresh one
    assert all(script[r] == [] for r in script)  # nothing was run more often than scripted


# ------------------------------------------------------------------------------ local processes


@pytest.mark.slow
def test_local_workers_write_the_rows_of_the_sequential_executor(tmp_path):
    seq = run_sweep(load_config(tiny_config(tmp_path / "seq")), echo=lambda _: None)
    lines: list[str] = []
    local = run_sweep(load_config(tiny_config(tmp_path / "local", executor="local", workers=2)), echo=lines.append)
    assert (seq.ok, local.ok, local.ran) == (8, 8, 8)
    assert rows_by_id(tmp_path / "seq" / "runs.csv") == rows_by_id(tmp_path / "local" / "runs.csv")
    assert len(local.where) == 2  # two worker processes, each trained runs
    assert "on 2 worker processes on this machine" in lines[0] and any("time left ~" in line for line in lines)
    assert "on 2 worker process(es) on 1 node(s)" in local.summary()
    # the CSV is the same file whoever wrote it: the sequential executor resumes it
    again = run_sweep(load_config(tiny_config(tmp_path / "local")), echo=lambda _: None)
    assert (again.skipped, again.ran) == (8, 0)


@pytest.mark.slow
def test_a_worker_that_dies_is_retried_then_recorded_as_failed(tmp_path):
    marker = str(tmp_path / "crashed-once")
    models = {"fine": {"config": GPT}, "once": {"config": GPT, "crash": "once", "marker": marker}}
    models["always"] = {"config": GPT, "crash": "always"}
    cfg = load_config(
        crash_config(tmp_path, models, tokens=[128], formats=["bf16"], executor="local", workers=2, max_retries=1)
    )
    lines: list[str] = []
    result = run_sweep(cfg, echo=lines.append)
    rows = rows_by_id(tmp_path / "runs.csv")
    assert (result.ran, result.ok, result.failed) == (3, 2, 1) and len(rows) == 3
    assert rows["fine_bf16_B1_D128_s0"]["status"] == rows["once_bf16_B1_D128_s0"]["status"] == "ok"
    doomed = rows["always_bf16_B1_D128_s0"]
    assert doomed["status"] == "failed" and doomed["loss"] == ""
    assert "its worker died 2 time(s)" in doomed["reason"] and "exited with status 3" in doomed["reason"]
    assert "max_retries=1" in doomed["reason"]
    retries = [line for line in lines if "trying it on a fresh worker" in line]
    assert len(retries) == 2 and any("once_bf16" in line for line in retries)


def _session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``: what a test started in a new session."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _kill_session(sid: int) -> list[int]:
    """SIGKILL every process of session ``sid`` (only what this test started); returns any left after 20 s."""
    for _ in range(40):
        pids = _session_pids(sid)
        if not pids:
            return []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    return _session_pids(sid)


def _wait_for(predicate, what: str, limit_s: float = 600.0) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` if it never does (a guard, not a timing check)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.5)


@pytest.mark.slow
def test_ctrl_c_leaves_every_finished_row_on_disk(tmp_path):
    from omegaconf import OmegaConf

    models = {"a": {"config": GPT}, "b": {"config": GPT_B}, "stuck": {"config": GPT, "crash": "hang"}}
    OmegaConf.save(OmegaConf.create(crash_config(tmp_path, models, formats=["bf16"])), tmp_path / "sweep.yaml")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "lightning_fpq.cli", "sweep", str(tmp_path / "sweep.yaml")]
    proc = subprocess.Popen(
        [*cmd, "--executor", "local", "--workers", "2"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: Ctrl-C in a terminal goes to the whole group
    )
    csv_path = tmp_path / "runs.csv"
    try:
        # the 4 runs of a and b finish; stuck's 2 runs never do, so the sweep is still going when interrupted
        _wait_for(lambda: csv_path.exists() and len(csv_path.read_text().splitlines()) == 1 + 4, "4 finished rows")
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        left = _kill_session(proc.pid)
    assert proc.returncode == 130, err
    assert not left, f"processes left running after Ctrl-C: {left}"
    lines = err.strip().splitlines()
    assert "Traceback" not in out + err and "interrupted: the 4 run(s) finished are in" in lines[-1], err
    rows = rows_by_id(csv_path)
    assert sorted(rows) == ["a_bf16_B1_D128_s0", "a_bf16_B1_D256_s0", "b_bf16_B1_D128_s0", "b_bf16_B1_D256_s0"]
    assert all(r["status"] == "ok" and float(r["loss"]) > 0 for r in rows.values())
    resumed = subprocess.run([*cmd, "--dry-run"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "6 runs in the grid, 2 to run, 4 already in" in resumed.stdout, resumed.stderr


# ---------------------------------------------------------------------------------- Ray cluster


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A real two-node Ray cluster on this machine: a head started with ``ray start --head`` and a
    second node joined to it with ``ray start --address``, one CPU each, no dashboard, every port
    and temp dir its own (parallel test runs do not collide). Stopped, and its processes killed by
    their session, even when a test fails.

    The nodes sit on the loopback addresses 127.0.0.2 and 127.0.0.3, not 127.0.0.1: Ray rewrites
    "127.0.0.1" and "localhost" into the machine's outward-facing address, so only another
    loopback address keeps the cluster's traffic on the loopback interface."""
    ray_cli = Path(sys.executable).with_name("ray")
    assert ray_cli.exists(), f"no {ray_cli}: ray is in the dev extra (pip install -e '.[dev]')"
    tmp = Path(tempfile.mkdtemp(prefix="fpqray", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),  # gpt_or_crash on the workers
    }
    head_ip, node_ip = "127.0.0.2", "127.0.0.3"
    port = _free_port(head_ip)
    nodes: list[subprocess.Popen] = []

    def start(name: str, ip: str, *args: str) -> None:
        ports = {
            "--node-manager-port": _free_port(ip),
            "--object-manager-port": _free_port(ip),
            "--dashboard-agent-grpc-port": _free_port(ip),
            "--dashboard-agent-listen-port": _free_port(ip),
            "--metrics-export-port": _free_port(ip),
            "--runtime-env-agent-port": _free_port(ip),
        }
        cmd = [str(ray_cli), "start", *args, f"--node-ip-address={ip}", f"--temp-dir={tmp / name}", "--block"]
        cmd += ["--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats"]
        cmd += [f"{option}={value}" for option, value in ports.items()]
        with open(tmp / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
            nodes.append(
                subprocess.Popen(
                    cmd,
                    env={**env, "PYTHONUNBUFFERED": "1"},  # its "Ray runtime started" line reaches the log at once
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

        def started() -> bool:
            text = (tmp / f"{name}.log").read_text()
            if nodes[-1].poll() is not None:
                raise AssertionError(f"ray start ({name}) exited with status {nodes[-1].returncode}:\n{text[-3000:]}")
            return "Ray runtime started" in text

        _wait_for(started, f"the Ray {name} node", 180)

    try:
        start("head", head_ip, "--head", f"--port={port}", "--include-dashboard=false")
        start("node", node_ip, f"--address={head_ip}:{port}")
        yield {"address": f"{head_ip}:{port}", "env": env}
    finally:
        left = [pid for node in nodes for pid in _kill_session(node.pid)]
        for node in nodes:
            node.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray processes left running: {left}"


def test_an_unreachable_ray_address_is_one_line(tmp_path, capsys):
    from lightning_fpq.cli import main

    (tmp_path / "sweep.yaml").write_text(
        f"out: {tmp_path / 'runs.csv'}\nmodels: {{a: {{n_layer: 1, n_head: 1, n_embd: 16}}}}\ntokens: [65536]\n"
    )
    address = f"127.0.0.9:{_free_port('127.0.0.9')}"  # a loopback port nothing listens on
    code = main(["sweep", str(tmp_path / "sweep.yaml"), "--executor", "ray", "--address", address])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert f"cannot reach the Ray cluster at {address}" in lines[0] and "ray start --head" in lines[0]
    assert not (tmp_path / "runs.csv").exists() or len((tmp_path / "runs.csv").read_text().splitlines()) == 1  # no row


@pytest.mark.slow
def test_a_ray_cluster_writes_the_rows_of_the_sequential_executor(tmp_path, ray_cluster):
    from omegaconf import OmegaConf

    models = {"a": {"config": GPT}, "b": {"config": GPT_B}}
    seq = run_sweep(load_config(crash_config(tmp_path / "seq", models)), echo=lambda _: None)
    assert seq.ok == 8

    models["always"] = {"config": GPT, "crash": "always"}
    cfg = crash_config(tmp_path / "ray", models, max_retries=1)
    cfg["grid"] = [{"models": ["a", "b"]}, {"models": ["always"], "tokens": [128], "formats": ["bf16"]}]
    OmegaConf.save(OmegaConf.create(cfg), tmp_path / "sweep.yaml")
    done = subprocess.run(
        [sys.executable, "-m", "lightning_fpq.cli", "sweep", str(tmp_path / "sweep.yaml")]
        + ["--executor", "ray", "--address", ray_cluster["address"], "--workers", "2"],
        env=ray_cluster["env"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # 1: a run failed (the crashing one)
    rows = rows_by_id(tmp_path / "ray" / "runs.csv")
    doomed = rows.pop("always_bf16_B1_D128_s0")
    assert rows == rows_by_id(tmp_path / "seq" / "runs.csv")
    assert doomed["status"] == "failed" and "its worker died 2 time(s)" in doomed["reason"], doomed["reason"]
    assert "on 2 Ray workers (1 CPU, 0 GPU and 1 torch threads per run; the cluster: 2 node(s)" in done.stdout
    assert re.search(r"ran 9 \(8 ok, 1 failed\) .* on \d+ worker process\(es\) on 2 node\(s\)", done.stdout), (
        done.stdout
    )
