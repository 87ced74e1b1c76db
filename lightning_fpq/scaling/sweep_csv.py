"""The sweep's CSV: one row per run with the columns :data:`COLUMNS`, appended as each run
finishes (flushed and fsync'ed), read back to resume a sweep and to fit a law."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "CsvWriter", "ok_rows", "read_rows"]

COLUMNS: tuple[str, ...] = (
    "run_id",  # model_format_B<B>_D<target tokens>_s<seed>: the resume key
    "status",  # ok | failed
    "model",  # the size's name in the config
    "N",  # non-embedding parameters (lightning_fpq.scaling.params.count_params)
    "D",  # training tokens actually seen (counted per batch)
    "steps",  # optimizer steps (the schedule ends here)
    "format",  # the format name as planned ("bf16"/"fp32": unquantized)
    "E",
    "M",  # exponent and mantissa bits
    "B",  # block size (int, "channel" or "tensor"); 1 for an unquantized run (no penalty in the law)
    "loss",  # final validation loss (nats per token), the fitted quantity
    "train_loss",  # mean training loss over the last 10% of steps
    "wall_s",
    "cpu_s",  # seconds of wall clock and of process CPU time (all threads) for the run
    "seed",
    "recipe",
    "settings",  # hash of the training settings shared by the runs: rows with another hash are not resumed
    "finished",  # ISO time the row was written
    "reason",  # why a failed run failed (one line)
)
"""The CSV's columns, in order. ``lightning-fpq fit`` reads N, D, E, M, B, loss and skips
rows whose status is not ``ok``."""


def read_rows(path: Any) -> list[dict[str, str]]:
    """The CSV's rows as dicts ([] when the file does not exist or is empty)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in ("run_id", "status") if c not in header]
        if missing:
            raise ValueError(f"{path} is not a sweep CSV: its header lacks {', '.join(missing)} (it has {header})")
        return list(reader)


def ok_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows a fit may use: status ``ok`` and, when a run id occurs several times, its last row.

    Returns ``(rows, counts)`` with counts of ``total``, ``used``, ``failed`` (last status not
    ok) and ``superseded`` (earlier rows of a run id). Rows without a status column are all used.
    """
    counts = {"total": len(rows), "used": 0, "failed": 0, "superseded": 0}
    if not rows or "status" not in rows[0]:
        counts["used"] = len(rows)
        return list(rows), counts
    last: dict[Any, int] = {}
    for i, row in enumerate(rows):
        last[row.get("run_id") or f"#{i}"] = i
    keep = []
    for i, row in enumerate(rows):
        if last[row.get("run_id") or f"#{i}"] != i:
            counts["superseded"] += 1
        elif str(row.get("status", "")).strip().lower() != "ok":
            counts["failed"] += 1
        else:
            keep.append(row)
    counts["used"] = len(keep)
    return keep, counts


class CsvWriter:
    """Appends one row at a time, flushed and fsync'ed, so a killed sweep loses no finished run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size > 0:
            with open(path, newline="", encoding="utf-8") as fh:
                header = next(csv.reader(fh), [])
            if tuple(header) != COLUMNS:
                raise ValueError(
                    f"{path} has columns {header}, not a sweep CSV's {list(COLUMNS)}: write to another file (out=...)"
                )
        else:
            with open(path, "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow(COLUMNS)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, fieldnames=COLUMNS).writerow({k: _cell(row.get(k)) for k in COLUMNS})
            fh.flush()
            os.fsync(fh.fileno())


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.7g}"
    return value
