"""The shipped D_crit experiment's runs, drawn by the demo beside what it trains itself.

Five minutes of CPU train three runs to about 4M tokens; the experiment (docs/dcrit_experiment.md,
``examples/dcrit/``) trained the same model, data and settings as separate runs, each with its
own cosine schedule ending at its D, up to 16.8M tokens. Its final validation losses are the
observations the law's prediction for "a run annealed to D" is about.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ReferenceRun:
    """One finished run of the experiment: its arm (format and block), seed, D and final loss."""

    fmt: str  # "bf16" or a format name, e.g. "e1m0"
    block: str  # "32", "tensor"; "1" for bf16
    seed: int
    tokens: int
    loss: float  # final validation loss, nats/byte


def load_reference(paths: list[str]) -> list[ReferenceRun]:
    """The successful runs of the sweep CSVs at ``paths`` (missing files are skipped: the
    experiment ships with the repository, not with the installed package)."""
    runs = []
    for path in paths:
        if not Path(path).is_file():
            continue
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("status") != "ok" or not row.get("loss"):
                    continue
                loss = float(row["loss"])
                if math.isfinite(loss):
                    runs.append(ReferenceRun(row["format"], row["B"], int(row["seed"]), int(float(row["D"])), loss))
    return runs


def arm(runs: list[ReferenceRun], fmt: str, block: str, seed: int = 0) -> list[tuple[int, float]]:
    """(tokens, loss) of one arm and seed, by tokens."""
    return sorted((r.tokens, r.loss) for r in runs if r.fmt == fmt and r.block == block and r.seed == seed)


def penalty(runs: list[ReferenceRun], fmt: str, block: str, seed: int = 0) -> list[tuple[int, float]]:
    """(tokens, quantized loss - bf16 loss) at every D where both runs of ``seed`` exist: the
    observed counterpart of the law's penalty term."""
    bf16 = dict(arm(runs, "bf16", "1", seed))
    return [(d, loss - bf16[d]) for d, loss in arm(runs, fmt, block, seed) if d in bf16]
