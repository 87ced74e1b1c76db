"""How a sweep reports itself: a live bar over the runs on a terminal, the time left, durations
in words, and Lightning kept quiet while the runs train."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any, Optional

__all__ = ["COST_OVERHEAD_PARAMS", "Eta", "ProgressBar", "duration", "quiet_lightning"]

COST_OVERHEAD_PARAMS = 150_000
"""For the time-left estimate only: a run's cost is taken as D * (N + this), the second term
standing for the per-token work that does not grow with N (the quantizer on small tensors,
the embeddings, the optimizer's Python). A rough figure for tiny CPU GPTs: it shapes only the
progress bar's time-left estimate, never a run or a result."""


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


class Eta:
    """Time left = the cost of the runs left, at the seconds per cost unit measured so far, shared
    by the ``workers`` that train runs at once (fewer when fewer runs are left).

    A run's cost is D * (N + :data:`COST_OVERHEAD_PARAMS`); runs of unknown N cost D * that
    constant. Its seconds are its own wall time, wherever it ran. The first run of each worker
    also pays for compiling the quantizer, so early estimates run high.
    """

    def __init__(self, costs: dict[str, float], workers: int = 1) -> None:
        self.costs = costs
        self.workers = workers
        self.left = sum(costs.values())
        self.runs_left = len(costs)
        self.done_cost = 0.0
        self.done_s = 0.0

    def finished(self, run_id: str, seconds: float) -> None:
        cost = self.costs.get(run_id, 0.0)
        self.left -= cost
        self.runs_left -= 1
        self.done_cost += cost
        self.done_s += seconds

    def seconds_left(self) -> Optional[float]:
        if self.done_cost <= 0:
            return None
        at_once = max(1, min(self.workers, self.runs_left))
        return max(0.0, self.left) * self.done_s / self.done_cost / at_once

    def text(self) -> str:
        s = self.seconds_left()
        return "time left: estimating" if s is None else f"time left ~{duration(s)}"


def quiet_lightning() -> Callable[[], None]:
    """Silence Lightning's per-run banners and the warnings a tiny run triggers; returns the undo."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero", "lightning_fpq")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    catcher = warnings.catch_warnings()
    catcher.__enter__()
    for pattern in (
        ".*does not have many workers.*",
        ".*smaller than the logging interval.*",
        ".*is an nn.Linear subclass.*",
        ".*LeafSpec.*",
        ".*treespec.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)

    def undo() -> None:
        catcher.__exit__(None, None, None)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)

    return undo


class ProgressBar:
    """A rich progress bar over the runs on a terminal; nothing otherwise (lines are echoed)."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self._progress = None
        self._task = None

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("sweep"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[eta]}"),
                TextColumn("{task.description}"),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("", total=self.total, eta="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def update(self, completed: int, description: str, eta: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, description=description, eta=eta)

    def print(self, line: str, echo: Callable[[str], None]) -> None:
        if self._progress is not None:
            self._progress.console.print(line, highlight=False, markup=False)
        else:
            echo(line)
