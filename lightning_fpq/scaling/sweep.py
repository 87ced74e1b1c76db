"""The sweep runner: a grid of small training runs, one CSV row per run, for fitting a law.

The paper's constants (docs/science.md section 4) belong to LLaMA on Dolma with a 2M-token batch;
they do not transfer to another model family, tokenizer, data or scale. A law is calibrated
the way the paper made it (docs/science.md section 8): many small runs, each with its own token
budget D and its own learning-rate schedule ending at D, one fit, then extrapolation::

    lightning-fpq sweep sweep.yaml            # this module: the runs -> runs.csv
    lightning-fpq fit runs.csv --plots plots --out law.yaml

A run is one (model size, token budget D, format, block size B, seed) point of the grid. It
is trained with the ``paper`` recipe by default (P2, P4, P6 quantized, the setup the law was
fitted on), validated once at its last step on a validation set that is the same for every
run, and appended to the CSV as soon as it finishes (flushed and fsync'ed), with columns
:data:`~lightning_fpq.scaling.sweep_csv.COLUMNS`. Rerunning the command resumes: runs already in the CSV with status ``ok``
(same run id, same training settings) are skipped; a run that raises is recorded with
status ``failed`` and its reason, and the sweep goes on (``--retry-failed`` runs those again).

Data and model default to the embedded corpus (:class:`~lightning_fpq.demo.data.ByteCorpusDataModule`)
and the demo GPT (:class:`~lightning_fpq.demo.model.GPTLightning`); either can be replaced by an
import path (``datamodule: mypkg.data.MyDataModule`` with ``datamodule_args: {...}``; ``model:
mypkg.models.MyModule`` with ``model_args`` and per-size ``args``).

Where the runs train is the executor's business (``sweep_executor``): one after another in this
process (``executor: sequential``, the default), on ``workers`` processes here (``local``) or on a
Ray cluster (``ray``, ``sweep_executor_ray``). Workers are long-lived, because the compiled
quantizer (``fastquant.py``) compiles each kernel once per process: a process per run would pay
that again and again. Whatever the executor, this driver alone writes the CSV, a row as each run
finishes, so resuming, the settings hash and the failed rows work the same. Ctrl-C leaves every
finished row on disk (the driver raises :class:`SweepInterrupted`); a run that kills a worker
process is retried on a fresh one (``max_retries``), and one that kills this process (sequential)
leaves the rows written so far: run the command again.

This module is the loop; the rest lives beside it: the config (``sweep_config``), the plan of
runs (``sweep_plan``), the CSV (``sweep_csv``), one run (``sweep_run``), the executors
(``sweep_executor``) and the progress report (``sweep_progress``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .sweep_config import SweepConfig
from .sweep_csv import CsvWriter, read_rows
from .sweep_executor import Executor, Job, make_executor
from .sweep_plan import check_runs, estimated_params, plan_runs, settings_hash
from .sweep_progress import COST_OVERHEAD_PARAMS, Eta, ProgressBar, duration

__all__ = ["SweepInterrupted", "SweepResult", "run_sweep"]


@dataclass
class SweepResult:
    """What one invocation of :func:`run_sweep` did."""

    csv: Path
    planned: int
    skipped: int  # already in the CSV
    ran: int
    ok: int
    failed: int
    wall_s: float
    cpu_s: float  # the runs' own CPU seconds, summed (wherever they ran)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (run_id, reason)
    executor: str = "sequential"
    where: set[tuple[str, int]] = field(default_factory=set)  # (node, process id) of the workers that ran runs
    interrupted: bool = False

    def summary(self) -> str:
        text = (
            f"sweep: {self.planned} runs in the grid, {self.skipped} already in {self.csv}, ran {self.ran} "
            f"({self.ok} ok, {self.failed} failed) in {duration(self.wall_s)} wall, {duration(self.cpu_s)} CPU"
        )
        if self.executor != "sequential" and self.where:
            nodes = {node for node, _ in self.where}
            text += f", on {len(self.where)} worker process(es) on {len(nodes)} node(s)"
        for run_id, reason in self.failures[:10]:
            text += f"\n  failed {run_id}: {reason}"
        if len(self.failures) > 10:
            text += f"\n  ... and {len(self.failures) - 10} more (see the CSV's reason column)"
        return text


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep, raised after the workers were stopped; every finished run's row is in
    the CSV. ``result`` says what was done."""

    def __init__(self, result: SweepResult) -> None:
        super().__init__("sweep interrupted")
        self.result = result


def run_sweep(
    cfg: SweepConfig,
    *,
    retry_failed: bool = False,
    dry_run: bool = False,
    echo: Optional[Callable[[str], None]] = None,
    executor: Optional[Executor] = None,
) -> SweepResult:
    """Run every planned run not yet in ``cfg.out``; append one row per run as it finishes.

    ``retry_failed``: also run again the runs whose last row is ``failed``. ``dry_run``: plan,
    check and report, train nothing. ``echo``: where progress lines go (default: stdout; the live
    bar, when shown, goes to the terminal). ``executor``: where the runs train (default: the one
    ``cfg.executor`` names). Raises ``ValueError`` for runs that must fail before they train
    (:func:`~lightning_fpq.scaling.sweep_plan.check_runs`), dry run or not, and
    :class:`SweepInterrupted` on Ctrl-C.
    """
    echo = echo or (lambda line: print(line, flush=True))
    csv_path = Path(cfg.out)
    runs = plan_runs(cfg)
    existing = read_rows(csv_path)
    hashes = {spec.run_id: settings_hash(cfg, spec) for spec in runs}
    stale = [
        r["run_id"]
        for r in existing
        if r.get("run_id") in hashes and r.get("settings") not in ("", None, hashes[r["run_id"]])
    ]
    if stale:
        raise ValueError(
            f"{csv_path} holds {len(stale)} row(s) made with other training settings or model sizes (e.g. {stale[0]}): "
            "rows of two setups must not be fitted together; write to a new CSV (out=...) or remove those rows"
        )
    last_status = {r["run_id"]: str(r.get("status", "")).strip().lower() for r in existing}
    done = {rid for rid, status in last_status.items() if status == "ok"}
    failed_before = {rid for rid, status in last_status.items() if status != "ok"}
    todo = [s for s in runs if s.run_id not in done and (retry_failed or s.run_id not in failed_before)]
    skipped = len(runs) - len(todo)
    result = SweepResult(
        csv=csv_path,
        planned=len(runs),
        skipped=skipped,
        ran=0,
        ok=0,
        failed=0,
        wall_s=0.0,
        cpu_s=0.0,
        executor=cfg.executor,
    )
    not_retried = sum(1 for s in runs if s.run_id in failed_before and s.run_id not in done) if not retry_failed else 0
    if todo:
        check_runs(cfg, todo)
    runner = executor or make_executor(cfg, len(todo))  # ray missing: ImportError naming the extra, dry run too
    if dry_run:
        echo(
            f"sweep (dry run): {len(runs)} runs in the grid, {len(runs) - skipped} to run, {skipped} already in "
            f"{csv_path}; executor {cfg.executor}"
        )
        for spec in todo:
            echo(f"  {spec.run_id}")
        return result
    if not todo:
        echo(
            f"sweep: all {len(runs)} runs are in {csv_path}"
            + (f" ({not_retried} failed; --retry-failed runs them again)" if not_retried else "")
        )
        return result
    if not_retried:
        echo(f"sweep: {not_retried} run(s) failed before and are skipped (--retry-failed runs them again)")

    writer = CsvWriter(csv_path)
    eta = Eta({s.run_id: s.tokens * (estimated_params(cfg, s) + COST_OVERHEAD_PARAMS) for s in todo})
    jobs = [Job(spec, hashes[spec.run_id]) for spec in todo]
    start_wall = time.perf_counter()
    try:
        with runner:
            eta.workers = runner.parallelism
            echo(
                f"sweep: {len(runs)} runs in the grid, {skipped} already in {csv_path}, {len(todo)} to run "
                f"{runner.describe()}"
            )
            sequential = runner.parallelism == 1 and cfg.executor == "sequential"
            running: dict[str, None] = {}
            with ProgressBar(len(todo), enabled=cfg.progress_bar and sys.stdout.isatty()) as bar:
                for event in runner.run(jobs):
                    run_id = event.job.spec.run_id
                    if event.kind == "started":
                        running[run_id] = None
                        bar.update(result.ran, _running_text(running), eta.text())
                        continue
                    if event.kind == "retry":
                        bar.print(f"  {run_id}: its worker died ({event.reason}); trying it on a fresh worker", echo)
                        continue
                    row = event.row or {}
                    writer.write(row)
                    running.pop(run_id, None)
                    eta.finished(run_id, float(row.get("wall_s") or 0.0))
                    result.ran += 1
                    result.cpu_s += float(row.get("cpu_s") or 0.0)
                    if event.where[1]:
                        result.where.add(event.where)
                    if row.get("status") == "ok":
                        result.ok += 1
                        what = f"loss {row['loss']:.4f}, N={row['N']:,}, D={row['D']:,}"
                    else:
                        result.failed += 1
                        result.failures.append((run_id, str(row.get("reason", ""))))
                        what = f"FAILED: {row.get('reason', '')}"
                    on = "" if sequential or not event.where[1] else f" on {event.where[0]}:{event.where[1]}"
                    bar.print(
                        f"[{result.ran}/{len(todo)}] {run_id}: {what} ({float(row.get('wall_s') or 0.0):.1f} s{on}); "
                        f"{eta.text()}",
                        echo,
                    )
                    bar.update(result.ran, _running_text(running), eta.text())
                bar.update(len(todo), "done", "")
    except KeyboardInterrupt:
        result.interrupted = True
        result.wall_s = time.perf_counter() - start_wall
        raise SweepInterrupted(result) from None
    result.wall_s = time.perf_counter() - start_wall
    return result


def _running_text(running: dict[str, None]) -> str:
    names = list(running)
    if not names:
        return ""
    return names[0] + (f" (+{len(names) - 1} running)" if len(names) > 1 else "")
