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

Why the runs share one process: the compiled quantizer (``fastquant.py``) compiles each kernel
once per process; a process per run would pay that again and again. A run that kills the
process (out of memory, a segfault) leaves the rows written so far; run the command again.

This module is the loop; the rest lives beside it: the config (``sweep_config``), the plan of
runs (``sweep_plan``), the CSV (``sweep_csv``), one run (``sweep_run``) and the progress
report (``sweep_progress``).
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .sweep_config import SweepConfig
from .sweep_csv import CsvWriter, read_rows
from .sweep_plan import estimated_params, plan_runs, settings_hash
from .sweep_progress import COST_OVERHEAD_PARAMS, Eta, ProgressBar, duration, quiet_lightning
from .sweep_run import run_row

__all__ = ["SweepResult", "run_sweep"]


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
    cpu_s: float
    failures: list[tuple[str, str]] = field(default_factory=list)  # (run_id, reason)

    def summary(self) -> str:
        text = (
            f"sweep: {self.planned} runs in the grid, {self.skipped} already in {self.csv}, ran {self.ran} "
            f"({self.ok} ok, {self.failed} failed) in {duration(self.wall_s)} wall, {duration(self.cpu_s)} CPU"
        )
        for run_id, reason in self.failures[:10]:
            text += f"\n  failed {run_id}: {reason}"
        if len(self.failures) > 10:
            text += f"\n  ... and {len(self.failures) - 10} more (see the CSV's reason column)"
        return text


def run_sweep(
    cfg: SweepConfig,
    *,
    retry_failed: bool = False,
    dry_run: bool = False,
    echo: Optional[Callable[[str], None]] = None,
) -> SweepResult:
    """Run every planned run not yet in ``cfg.out``; append one row per run as it finishes.

    ``retry_failed``: also run again the runs whose last row is ``failed``. ``dry_run``: plan
    and report, train nothing. ``echo``: where progress lines go (default: stdout; the live
    bar, when shown, goes to the terminal).
    """
    import torch

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
    result = SweepResult(csv=csv_path, planned=len(runs), skipped=skipped, ran=0, ok=0, failed=0, wall_s=0.0, cpu_s=0.0)
    not_retried = sum(1 for s in runs if s.run_id in failed_before and s.run_id not in done) if not retry_failed else 0
    if dry_run:
        echo(
            f"sweep (dry run): {len(runs)} runs in the grid, {len(runs) - skipped} to run, {skipped} already in {csv_path}"
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

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    writer = CsvWriter(csv_path)
    eta = Eta({s.run_id: s.tokens * (estimated_params(cfg, s) + COST_OVERHEAD_PARAMS) for s in todo})
    echo(
        f"sweep: {len(runs)} runs in the grid, {skipped} already in {csv_path}, {len(todo)} to run "
        f"(torch threads: {torch.get_num_threads()})"
    )
    bar = ProgressBar(len(todo), enabled=cfg.progress_bar and sys.stdout.isatty())
    undo = quiet_lightning()
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    try:
        with bar:
            for i, spec in enumerate(todo, 1):
                bar.update(i - 1, f"{spec.run_id}", eta.text())
                row = run_row(cfg, spec, hashes[spec.run_id])
                writer.write(row)
                eta.finished(spec.run_id, row["wall_s"])
                result.ran += 1
                if row["status"] == "ok":
                    result.ok += 1
                    what = f"loss {row['loss']:.4f}, N={row['N']:,}, D={row['D']:,}"
                else:
                    result.failed += 1
                    result.failures.append((spec.run_id, row["reason"]))
                    what = f"FAILED: {row['reason']}"
                bar.print(f"[{i}/{len(todo)}] {spec.run_id}: {what} ({row['wall_s']:.1f} s); {eta.text()}", echo)
                gc.collect()
            bar.update(len(todo), "done", "")
    finally:
        undo()
        result.wall_s = time.perf_counter() - start_wall
        result.cpu_s = time.process_time() - start_cpu
    return result
