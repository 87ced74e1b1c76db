"""Fit a scaling law to your own runs (docs/science.md section 8).

The published constants belong to the paper's setup (model family, tokenizer, data). On a
grid of small runs of your own, each row (N, D, E, M, B, final loss), :func:`fit` finds the
constants the way Chinchilla-style fits do: a robust Huber loss on the residuals of
log-loss, minimised within bounds from several seeded starting points, keeping the best.
It reports how well the law fits (RMSE, R^2, per-row residuals) and, when asked, its error
on rows kept out of the fit: the number to trust before extrapolating D_crit or the
optimal precision to a large run.

Rows come from a CSV file, a DataFrame-like object (anything with ``.columns`` and
``obj[column]``, e.g. pandas or polars), a mapping of column -> values, or a list of dicts.
Column names are case-insensitive; the format can be given as ``E`` and ``M`` columns or
as one ``format`` column ("e4m3"); ``B`` holds an int, ``"channel"`` or ``"tensor"``.

``scipy`` (a dev extra) is imported when :func:`fit` runs, not at import time.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from lightning_fpq import _config
from lightning_fpq.formats import FPFormat
from lightning_fpq.scaling.capybara import (
    CapybaraLaw,
    CeilingLaw,
    canonical_em,
    capybara_critical_data_size,
    capybara_loss,
    ceiling_loss,
)
from lightning_fpq.scaling.chinchilla import ChinchillaLaw
from lightning_fpq.scaling.kumar import KumarLaw, kumar_factor
from lightning_fpq.scaling.law import CHANNEL_LOG2_BLOCK, Provenance, log2_block_size
from lightning_fpq.scaling.sweep_plan import UNQUANTIZED

__all__ = ["FitResult", "fit", "load_rows", "MIN_ROWS_PER_CONSTANT", "HUBER_DELTA"]

HUBER_DELTA = 1e-3
"""Huber threshold on log-loss residuals (dimensionless), as in Chinchilla's fits (arXiv 2203.15556, appendix D.2)."""

MIN_ROWS_PER_CONSTANT = 2
"""A fit needs at least this many rows per fitted constant: fewer rows can be matched by many constant sets."""

BOOTSTRAP_PERCENTILES = (5.0, 95.0)
"""The bootstrap interval a fit reports: the 5th and 95th percentiles of the refitted values."""

MIN_DISTINCT = 3
"""A power law with an offset (c / x^p + const) needs x at three or more values to be determined."""

# canonical column -> accepted spellings (compared case-insensitively)
_ALIASES = {
    "N": ("n", "params", "parameters", "num_params"),
    "D": ("d", "tokens", "num_tokens"),
    "E": ("e", "ebits", "exponent_bits"),
    "M": ("m", "mbits", "mantissa_bits"),
    "B": ("b", "block", "block_size"),
    "loss": ("loss", "final_loss", "val_loss"),
    "format": ("format", "fmt"),
    "bits": ("bits", "p", "precision"),
}
_LAWS = {"capybara": CapybaraLaw, "kumar": KumarLaw, "chinchilla": ChinchillaLaw, "ceiling": CeilingLaw}
_FLOAT_LAWS = ("capybara", "ceiling")  # rows with E, M, B
# which columns each law needs ("E/M" = E and M columns, or a format column; "bits" may also come from E/M)
_NEEDS = {
    "capybara": ("N", "D", "E/M", "B", "loss"),
    "ceiling": ("N", "D", "E/M", "B", "loss"),
    "kumar": ("N", "D", "bits", "loss"),
    "chinchilla": ("N", "D", "loss"),
}
# constants fitted in log space (scales spanning decades) and each constant's bounds
_LOG_SPACE = {"n", "d", "g", "A", "B"}
_BOUNDS = {
    "capybara": {
        "n": (1e-2, 1e7),
        "a": (0.01, 1.5),
        "d": (1e-2, 1e12),
        "b": (0.01, 1.5),
        "eps": (0.0, None),
        "g": (1e-4, 1e12),
        "dl": (0.0, 10.0),
        "nu": (0.0, 10.0),
    },
    "kumar": {
        "A": (1e-2, 1e9),
        "alpha": (0.01, 1.5),
        "B": (1e-2, 1e12),
        "beta": (0.01, 1.5),
        "E": (0.0, None),
        "g_w": (0.05, 16.0),
        "g_a": (0.05, 16.0),
        "g_kv": (0.05, 16.0),
    },
    "chinchilla": {"A": (1e-2, 1e9), "alpha": (0.01, 1.5), "B": (1e-2, 1e12), "beta": (0.01, 1.5), "E": (0.0, None)},
}
_BOUNDS["ceiling"] = {**_BOUNDS["capybara"], "g": (1e-8, 1e4)}
# where random starting points are drawn (inside the bounds, where fitted values usually land)
_START_RANGES = {
    "a": (0.1, 0.8),
    "b": (0.1, 0.8),
    "alpha": (0.1, 0.8),
    "beta": (0.1, 0.8),
    "dl": (0.5, 5.0),
    "nu": (0.5, 5.0),
    "g_w": (0.5, 6.0),
    "g_a": (0.5, 6.0),
    "g_kv": (0.3, 4.0),
}


# ------------------------------------------------------------------------- rows


def read_csv_rows(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """The rows of a CSV file as dicts; ValueError naming the file when unreadable or empty."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"cannot read CSV {os.fspath(path)!r}: {err}") from None
    if not rows:
        raise ValueError(f"CSV {os.fspath(path)!r} has no data rows")
    return rows


def _columns_of(rows: Any) -> tuple[dict[str, list], str]:
    """Any accepted row source -> ({column name: values}, a description for messages)."""
    if isinstance(rows, (str, os.PathLike)):
        records, where = read_csv_rows(rows), f"CSV {os.fspath(rows)!r}"
    elif isinstance(rows, Mapping):
        return {str(k): list(np.atleast_1d(np.asarray(v, dtype=object))) for k, v in rows.items()}, "the columns"
    elif hasattr(rows, "columns") and hasattr(rows, "__getitem__"):
        return {str(c): list(np.asarray(rows[c], dtype=object)) for c in rows.columns}, "the data frame"
    elif isinstance(rows, Iterable):
        records, where = list(rows), "the rows"
        if not all(isinstance(r, Mapping) for r in records):
            raise ValueError(
                "rows must be a CSV path, a DataFrame-like object, a mapping of columns or a list of dicts"
            )
    else:
        raise ValueError(
            f"rows={type(rows).__name__} is not accepted: expected a CSV path, a DataFrame-like object, a mapping of columns or a list of dicts"
        )
    if not records:
        raise ValueError(f"{where} holds no rows")
    names = list(records[0])
    cols = {str(k): [r.get(k) for r in records] for k in names}
    return cols, where


def _canonical(cols: dict[str, list], where: str) -> dict[str, list]:
    out: dict[str, list] = {}
    lookup = {alias: canon for canon, aliases in _ALIASES.items() for alias in aliases}
    for name, values in cols.items():
        canon = lookup.get(name.strip().lower())
        if canon is None:
            continue  # extra columns (run ids, notes) are fine
        if canon in out:
            raise ValueError(f"{where}: two columns mean {canon!r} (accepted spellings: {_ALIASES[canon]}); keep one")
        out[canon] = values
    return out


def _numbers(name: str, values: list, where: str, *, integer: bool = False, positive: bool = True) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in values], dtype=float)
    except (TypeError, ValueError):
        bad = next(v for v in values if not _is_float(v))
        raise ValueError(f"{where}: column {name} holds {bad!r}, not a number") from None
    ok = np.isfinite(arr) & ((arr > 0) if positive else (arr >= 0))
    if integer:
        ok &= arr == np.round(arr)
    if not np.all(ok):
        bad_row = int(np.argmin(ok))
        need = "an integer >= 0" if integer else "a finite number > 0"
        raise ValueError(f"{where}: column {name}, row {bad_row + 1} is {values[bad_row]!r}: expected {need}")
    return arr


def _is_float(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def load_rows(
    rows: Any, *, kind: str = "capybara", channel_log2_block: float = CHANNEL_LOG2_BLOCK
) -> dict[str, np.ndarray]:
    """Rows -> arrays ``N``, ``D``, ``loss`` and, as the law needs them, ``E``, ``M``, ``B``
    (as given), ``log2b`` and ``bits``. ValueError names any missing column or bad cell.
    For the Capybara law an E0My row becomes E1M(y-1), the same grid (``canonical_em``)."""
    if kind not in _LAWS:
        raise ValueError(f"kind={kind!r} is not one of {sorted(_LAWS)}")
    raw, where = _columns_of(rows)
    cols = _canonical(raw, where)
    missing = []
    for need in _NEEDS[kind]:
        if need == "E/M":
            if not ("format" in cols or ("E" in cols and "M" in cols)):
                missing.append("E and M (or format)")
        elif need == "bits":
            if not ("bits" in cols or "format" in cols or ("E" in cols and "M" in cols)):
                missing.append("bits (or E and M, or format)")
        elif need not in cols:
            missing.append(need)
    if missing:
        expected = ", ".join(n.replace("E/M", "E, M (or format)") for n in _NEEDS[kind])
        raise ValueError(f"{where}: missing column(s) {', '.join(missing)}; a {kind} fit expects {expected}")
    out = {name: _numbers(name, cols[name], where) for name in ("N", "D", "loss")}
    if kind == "chinchilla":
        return out
    if "E" in cols and "M" in cols:
        out["E"] = _numbers("E", cols["E"], where, integer=True, positive=False)
        out["M"] = _numbers("M", cols["M"], where, integer=True, positive=False)
    elif "format" in cols:
        try:
            fmts = [FPFormat.parse(str(f)) for f in cols["format"]]
        except ValueError as err:
            raise ValueError(f"{where}: column format: {err}") from None
        out["E"] = np.array([f.ebits for f in fmts], dtype=float)
        out["M"] = np.array([f.mbits for f in fmts], dtype=float)
    if kind == "kumar":
        out["bits"] = _numbers("bits", cols["bits"], where) if "bits" in cols else 1.0 + out["E"] + out["M"]
        return out
    # E0My is the same grid as E1M(y-1): the law sees one representative (capybara.canonical_em)
    em = [canonical_em(int(e), int(m)) for e, m in zip(out["E"], out["M"])]
    out["E"] = np.array([e for e, _ in em], dtype=float)
    out["M"] = np.array([m for _, m in em], dtype=float)
    try:  # a cell is an int ('128' or 128.0 from CSV files and data frames), 'channel' or 'tensor'
        blocks = [_config.block_size(v, allow_none=False) for v in cols["B"]]
        out["log2b"] = np.array([log2_block_size(b, channel_log2=channel_log2_block) for b in blocks], dtype=float)
    except ValueError as err:
        raise ValueError(f"{where}: column B: {err}") from None
    out["B"] = np.array(blocks, dtype=object)
    return out


def _quantized_block_sizes(rows: Mapping[str, np.ndarray]) -> Optional[tuple]:
    """The block sizes of the quantized rows (not bf16/fp32), or None where the law has no B."""
    if "B" not in rows:
        return None
    plain = {(FPFormat.parse(name).ebits, FPFormat.parse(name).mbits) for name in UNQUANTIZED}
    blocks = [b for b, e, m in zip(rows["B"], rows["E"], rows["M"]) if (int(e), int(m)) not in plain]
    return tuple(blocks) or None


# ---------------------------------------------------------------- identifiability


def _distinct(x: np.ndarray) -> np.ndarray:
    return np.unique(np.round(x, 12))


def _check_identifiable(kind: str, data: dict[str, np.ndarray], free: Sequence[str]) -> None:
    """Refuse, in one message, a fit whose rows cannot determine the free constants."""
    n_rows = len(data["loss"])
    problems = []
    need_rows = MIN_ROWS_PER_CONSTANT * len(free)
    if n_rows < need_rows:
        problems.append(
            f"{n_rows} rows cannot determine {len(free)} constants ({', '.join(free)}): "
            f"need at least {need_rows} ({MIN_ROWS_PER_CONSTANT} per constant)"
        )
    groups = {
        "capybara": [("N", ("n", "a")), ("D", ("d", "b"))],
        "ceiling": [("N", ("n", "a")), ("D", ("d", "b"))],
        "kumar": [("N", ("A", "alpha")), ("D", ("B", "beta"))],
        "chinchilla": [("N", ("A", "alpha")), ("D", ("B", "beta"))],
    }[kind]
    for var, consts in groups:
        hit = [c for c in consts if c in free]
        values = _distinct(data[var])
        if hit and len(values) < MIN_DISTINCT:
            shown = ", ".join(f"{v:.3g}" for v in values)
            problems.append(
                f"{var} takes {len(values)} distinct value(s) ({shown}) but fitting {', '.join(hit)} needs "
                f"at least {MIN_DISTINCT}: vary {var} or fix {', '.join(hit)}"
            )
    if kind in _FLOAT_LAWS:
        prec = [c for c in ("g", "dl", "nu") if c in free]
        if prec:
            quantized = data["log2b"] > 0
            if not np.any(quantized):
                problems.append(
                    f"every row has B = 1 (no quantization penalty), so {', '.join(prec)} cannot be fitted: fix them"
                )
            else:
                pairs = np.unique(np.stack([data["E"][quantized], data["M"][quantized]], axis=1), axis=0)
                design = np.column_stack([np.ones(len(pairs)), np.log(pairs[:, 0] + 0.5), np.log(pairs[:, 1] + 0.5)])
                cols = [0] * ("g" in free) + [1] * ("dl" in free) + [2] * ("nu" in free)
                rank = np.linalg.matrix_rank(design[:, cols]) if len(pairs) else 0
                if rank < len(cols):
                    shown = ", ".join(f"e{int(e)}m{int(m)}" for e, m in pairs)
                    problems.append(
                        f"the rows use {len(pairs)} format(s) ({shown}), which cannot separate {', '.join(prec)}: "
                        f"use at least {len(cols)} formats that differ in both E and M, or fix {', '.join(prec)}"
                    )
    if kind == "kumar":
        gam = [c for c in ("g_w", "g_a", "g_kv") if c in free]
        widths = _distinct(data["bits"])
        if gam and len(widths) < len(gam) + 1:
            problems.append(
                f"bits takes {len(widths)} distinct value(s) but fitting {', '.join(gam)} needs at least {len(gam) + 1}: "
                f"vary the precision or fix {', '.join(gam)}"
            )
    if problems:
        raise ValueError("cannot fit: " + "; ".join(problems))


# -------------------------------------------------------------------------- fit


@dataclass(frozen=True)
class FitResult:
    """A fitted law and how well it fits.

    ``rmse`` (nats) and ``r2`` are computed on the loss of the fitted rows; ``residuals``
    (observed - predicted, nats) and ``predicted`` cover every row in input order;
    ``heldout`` marks rows kept out of the fit, and ``heldout_rmse`` is the RMSE on them
    (None when none were held out). ``at_bounds`` names constants that ended on a bound (a
    sign that the rows do not pin them down, or that the bounds are too tight).
    """

    law: Any
    rmse: float
    r2: float
    residuals: np.ndarray
    predicted: np.ndarray
    observed: np.ndarray
    heldout: np.ndarray
    heldout_rmse: Optional[float]
    cost: float
    starts: int
    at_bounds: tuple[str, ...]
    fixed: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    d_crit: dict[str, dict[str, Any]] = field(default_factory=dict)
    baseline: Optional[dict[str, Any]] = None

    def summary(self) -> str:
        n_fit = int((~self.heldout).sum())
        text = f"{type(self.law).__name__} fitted on {n_fit} rows: RMSE {self.rmse:.4g} nats, R^2 {self.r2:.4f}"
        if self.heldout_rmse is not None:
            text += f", held-out RMSE {self.heldout_rmse:.4g} nats on {int(self.heldout.sum())} rows"
        return text

    def baseline_summary(self) -> Optional[str]:
        """One line comparing the fit with the precision-unaware Chinchilla fit of the same rows."""
        if self.baseline is None:
            return None
        if "rmse" not in self.baseline:
            return f"precision-unaware baseline (Chinchilla): not fitted ({self.baseline.get('reason', '')})"
        base, ours = self.baseline["rmse"], self.rmse
        text = f"precision-unaware baseline (Chinchilla, same rows): RMSE {base:.4g} nats against {ours:.4g}"
        if self.baseline.get("heldout_rmse") is not None and self.heldout_rmse is not None:
            text += f"; held-out {self.baseline['heldout_rmse']:.4g} against {self.heldout_rmse:.4g}"
        gain = 1.0 - ours / base if base > 0 else float("nan")
        text += (
            f": the precision term removes {gain:.0%} of the baseline's RMSE"
            if gain >= 0
            else (": the precision term does not improve on the baseline")
        )
        return text


def _holdout_mask(holdout: Any, data: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    n_rows = len(data["loss"])
    mask = np.zeros(n_rows, dtype=bool)
    if holdout is None:
        return mask
    if isinstance(holdout, str):
        if holdout not in ("largest_N", "largest_D"):
            raise ValueError(
                f"holdout={holdout!r} is not valid: expected None, a fraction in (0, 1), row indices, a boolean mask, "
                "'largest_N' or 'largest_D'"
            )
        key = holdout[-1]
        return data[key] == data[key].max()
    if isinstance(holdout, (float, np.floating)):
        if not 0.0 < holdout < 1.0:
            raise ValueError(f"holdout={holdout!r} is not valid: a fraction must lie in (0, 1)")
        count = max(1, int(round(holdout * n_rows)))
        mask[rng.choice(n_rows, size=count, replace=False)] = True
        return mask
    arr = np.asarray(holdout)
    if arr.dtype == bool:
        if arr.shape != (n_rows,):
            raise ValueError(f"holdout mask has shape {arr.shape}, expected ({n_rows},)")
        return arr.copy()
    if arr.ndim == 1 and np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < -n_rows or arr.max() >= n_rows):
            raise ValueError(f"holdout indices must lie in 0..{n_rows - 1}")
        mask[arr] = True
        return mask
    raise ValueError(
        f"holdout={holdout!r} is not valid: expected None, a fraction in (0, 1), row indices, a boolean mask or 'largest_N'"
    )


def _predict(kind: str, c: dict[str, float], data: dict[str, np.ndarray], channel_log2_block: float) -> np.ndarray:
    """The law's loss for every row, straight from the formulas (called thousands of times per fit)."""
    N, D = data["N"], data["D"]
    if kind == "capybara":
        return capybara_loss(N, D, data["E"], data["M"], data["log2b"], **c)
    if kind == "ceiling":
        return ceiling_loss(N, D, data["E"], data["M"], data["log2b"], **c)
    if kind == "kumar":
        bits = data["bits"]
        factor = kumar_factor(bits, bits, bits, **c)
        return c["A"] * (N * factor) ** (-c["alpha"]) + c["B"] * D ** (-c["beta"]) + c["E"]
    return c["E"] + c["A"] / N ** c["alpha"] + c["B"] / D ** c["beta"]


def _gradients(kind: str, c: dict[str, float], data: dict[str, np.ndarray]) -> Optional[dict[str, np.ndarray]]:
    """d(predicted loss)/d(fitted coordinate) per row; log-space constants differentiate by log.

    Analytic for the Capybara and Chinchilla laws (a fit then needs one evaluation per
    step instead of one per constant); None for Kumar (finite differences).
    """
    N, D = data["N"], data["D"]
    if kind == "capybara":
        t1 = c["n"] * N ** -c["a"]
        t2 = c["d"] * D ** -c["b"]
        le, lm = np.log(data["E"] + 0.5), np.log(data["M"] + 0.5)
        t4 = D ** c["b"] * N ** -c["a"] * data["log2b"] / (c["g"] * np.exp(c["dl"] * le + c["nu"] * lm))
        return {
            "n": t1,
            "a": -np.log(N) * (t1 + t4),
            "d": t2,
            "b": np.log(D) * (t4 - t2),
            "eps": np.ones_like(N),
            "g": -t4,
            "dl": -le * t4,
            "nu": -lm * t4,
        }
    if kind == "chinchilla":
        t1, t2 = c["A"] * N ** -c["alpha"], c["B"] * D ** -c["beta"]
        return {"A": t1, "alpha": -np.log(N) * t1, "B": t2, "beta": -np.log(D) * t2, "E": np.ones_like(N)}
    return None


def fit(
    rows: Any,
    *,
    kind: str = "capybara",
    fixed: Optional[Mapping[str, float]] = None,
    holdout: Any = None,
    starts: int = 16,
    seed: int = 0,
    huber_delta: float = HUBER_DELTA,
    channel_log2_block: float = CHANNEL_LOG2_BLOCK,
    bootstrap: int = 0,
    baseline: bool = False,
) -> FitResult:
    """Fit the constants of a scaling law to rows of runs; returns the law and its fit quality.

    ``kind``: "capybara" (rows N, D, E, M, B, loss), "ceiling" (the same rows; a law without
    a loss minimum in D, :class:`~lightning_fpq.scaling.capybara.CeilingLaw`), "kumar" (N, D,
    bits, loss) or "chinchilla" (N, D, loss). ``fixed``: constants to hold, e.g. ``{"dl": 3.1926,
    "nu": 2.9543}`` when your runs use one format. ``holdout``: rows kept out of the fit
    and scored after it: a fraction (random, seeded), row indices, a boolean mask, or
    ``"largest_N"`` (extrapolation to the largest model, the honest test of a law) or
    ``"largest_D"`` (the longest runs: where a loss minimum in D would show).

    Objective: the sum of Huber(log predicted - log observed) with threshold
    ``huber_delta``, minimised by ``scipy.optimize.least_squares`` (trust region, bounded)
    from ``starts`` starting points: the published constants plus random points drawn with
    ``seed``; the lowest cost wins. Scale constants (n, d, g; A, B) are fitted in log
    space. For the Capybara law ``channel_log2_block`` is not fitted: it is the log2(B)
    given to "channel" rows. Refuses (ValueError) rows that cannot determine the free
    constants: too few rows, or N, D or the formats taking too few distinct values.

    ``bootstrap``: that many refits on rows resampled with replacement (each started from the
    fit), giving 5-95% intervals for every fitted constant (``intervals``) and, for the Capybara
    law, for D_crit of every quantized (format, B) in the rows at their largest N (``d_crit``).
    ``baseline``: also fit the precision-unaware Chinchilla law to the same rows (same hold-out)
    and report its RMSE (``baseline``). Both are stored in the law's ``provenance.extra``, and
    the range of the fitted N and D in ``provenance.n_range``/``d_range``.

    Kumar rows carry one precision for weights, activations and KV cache; the offsets
    n_w, n_a, n_kv (Appendix K of arXiv 2411.04330) are held at the paper's values, and only
    they tell g_w, g_a, g_kv apart, so those three are weakly determined by such rows.
    """
    try:
        from scipy.optimize import least_squares
    except ImportError:  # scipy is a dev extra
        raise ImportError("fit needs scipy: pip install 'lightning-fpq[dev]' or pip install scipy") from None
    if kind not in _LAWS:
        raise ValueError(f"kind={kind!r} is not one of {sorted(_LAWS)}")
    _config.integer(starts, what="starts", low=1)
    _config.integer(bootstrap, what="bootstrap", low=0)
    _config.number(huber_delta, what="huber_delta", low=0.0, low_open=True)
    law_cls = _LAWS[kind]
    names = law_cls.FITTED
    fixed = dict(fixed or {})
    unknown = [k for k in fixed if k not in names]
    if unknown:
        raise ValueError(f"fixed={unknown} are not constants of the {kind} law: expected some of {list(names)}")
    free = [c for c in names if c not in fixed]
    if not free:
        raise ValueError("every constant is fixed: nothing to fit")

    data = load_rows(rows, kind=kind, channel_log2_block=channel_log2_block)
    rng = np.random.default_rng(seed)
    held = _holdout_mask(holdout, data, rng)
    train = {k: v[~held] for k, v in data.items()}
    if held.all():
        raise ValueError("holdout leaves no rows to fit")
    _check_identifiable(kind, train, free)

    # bounds in the fitted (partly log) space; eps/E must stay below the smallest loss
    bounds = dict(_BOUNDS[kind])
    floor_name = "eps" if kind in _FLOAT_LAWS else "E"
    bounds[floor_name] = (0.0, float(train["loss"].min()) * (1 - 1e-9))
    lo = np.array([math.log(bounds[c][0]) if c in _LOG_SPACE else bounds[c][0] for c in free])
    hi = np.array([math.log(bounds[c][1]) if c in _LOG_SPACE else bounds[c][1] for c in free])

    # Kumar's offsets stay at the paper's (the Capybara law's channel_log2_block is an argument)
    not_fitted = {k: v for k, v in law_cls.PAPER.items() if k not in names and k != "channel_log2_block"}

    def constants(x: np.ndarray) -> dict[str, float]:
        out = {**not_fitted, **fixed}
        for c, v in zip(free, x):
            out[c] = math.exp(v) if c in _LOG_SPACE else float(v)
        return out

    def objective(rows_: dict[str, np.ndarray]):
        """(residuals, jacobian) of log-loss on ``rows_`` as functions of the fitted coordinates."""
        log_obs = np.log(rows_["loss"])

        def residuals(x: np.ndarray) -> np.ndarray:
            with np.errstate(all="ignore"):
                pred = _predict(kind, constants(x), rows_, channel_log2_block)
                r = np.log(pred) - log_obs
            return np.where(np.isfinite(r), r, 1e3)  # a constant set that breaks the law scores badly

        def jacobian(x: np.ndarray) -> np.ndarray:
            c = constants(x)
            with np.errstate(all="ignore"):
                pred = _predict(kind, c, rows_, channel_log2_block)
                grads = _gradients(kind, c, rows_)
                jac = np.column_stack([grads[name] / pred for name in free])  # d log(pred) / d x
            return np.where(np.isfinite(jac), jac, 0.0)

        return residuals, (jacobian if kind in ("capybara", "chinchilla") else "2-point")

    def solve(rows_: dict[str, np.ndarray], x0: np.ndarray):
        residuals, jac_arg = objective(rows_)
        return least_squares(
            residuals,
            x0,
            jac=jac_arg,
            bounds=(lo, hi),
            loss="huber",
            f_scale=huber_delta,
            method="trf",
            x_scale="jac",
            max_nfev=2000,
        )

    paper = law_cls.paper().constants()
    first = np.array([math.log(paper[c]) if c in _LOG_SPACE else paper[c] for c in free])
    if floor_name in free:  # the paper's eps may exceed the user's losses
        first[free.index(floor_name)] = 0.5 * hi[free.index(floor_name)]
    starts_x = [np.clip(first, lo, hi)]
    for _ in range(starts - 1):
        x = []
        for c, low, high in zip(free, lo, hi):
            a, b = _START_RANGES.get(c, (low, high))
            if c == floor_name:
                a, b = 0.3 * high, 0.95 * high
            x.append(rng.uniform(a, b))
        starts_x.append(np.array(x))

    best = None
    for x0 in starts_x:
        try:
            res = solve(train, x0)
        except (ValueError, np.linalg.LinAlgError):
            continue  # a start the solver cannot use; the others decide
        if best is None or res.cost < best.cost:
            best = res
    if best is None:
        raise ValueError(
            "no starting point converged: check the rows (units: N in parameters, D in tokens, loss in nats)"
        )

    consts = constants(best.x)
    span = hi - lo
    at_bounds = tuple(
        c for c, v, low, high, s in zip(free, best.x, lo, hi, span) if (v - low) < 1e-6 * s or (high - v) < 1e-6 * s
    )

    predicted = _predict(kind, consts, data, channel_log2_block)
    observed = data["loss"]
    resid = observed - predicted
    r_train = resid[~held]
    rmse = float(np.sqrt(np.mean(r_train**2)))
    ss_tot = float(np.sum((observed[~held] - observed[~held].mean()) ** 2))
    r2 = 1.0 - float(np.sum(r_train**2)) / ss_tot if ss_tot > 0 else float("nan")
    heldout_rmse = float(np.sqrt(np.mean(resid[held] ** 2))) if held.any() else None

    # bootstrap: refit on resampled rows, from the fit
    samples = []
    boot_rng = np.random.default_rng([seed, 1])
    n_train = len(train["loss"])
    for _ in range(bootstrap):
        pick = boot_rng.integers(0, n_train, size=n_train)
        try:
            res = solve({k: v[pick] for k, v in train.items()}, best.x)
        except (ValueError, np.linalg.LinAlgError):
            continue
        samples.append(constants(res.x))
    intervals: dict[str, tuple[float, float]] = {}
    d_crit: dict[str, dict[str, Any]] = {}
    if len(samples) >= 2:
        for c in free:
            lo_q, hi_q = np.percentile([smp[c] for smp in samples], BOOTSTRAP_PERCENTILES)
            intervals[c] = (float(lo_q), float(hi_q))
    if kind == "capybara":
        n_top = float(train["N"].max())
        for key, (e, m, lb) in _quantized_settings(train).items():
            value = float(capybara_critical_data_size(n_top, e, m, lb, **consts))
            entry: dict[str, Any] = {"N": n_top, "value": value}
            if len(samples) >= 2:
                draws = [float(capybara_critical_data_size(n_top, e, m, lb, **smp)) for smp in samples]
                entry["interval"] = [float(q) for q in np.percentile(draws, BOOTSTRAP_PERCENTILES)]
            d_crit[key] = entry

    base_info: Optional[dict[str, Any]] = None
    if baseline and kind != "chinchilla":
        try:
            base = fit(
                {"N": data["N"], "D": data["D"], "loss": data["loss"]},
                kind="chinchilla",
                holdout=held,
                starts=4,
                seed=seed,
                huber_delta=huber_delta,
            )
            base_info = {"kind": "chinchilla", "rmse": base.rmse, "heldout_rmse": base.heldout_rmse}
            base_info["constants"] = base.law.constants()
        except ValueError as err:
            base_info = {"kind": "chinchilla", "reason": str(err)}

    extra_info: dict[str, Any] = {}
    if bootstrap:
        extra_info["bootstrap"] = {
            "resamples": bootstrap,
            "converged": len(samples),
            "percentiles": list(BOOTSTRAP_PERCENTILES),
            "constants": {c: list(v) for c, v in intervals.items()},
            "d_crit": d_crit,
            "samples": [{c: float(v) for c, v in smp.items()} for smp in samples],
        }
    if base_info is not None:
        extra_info["baseline"] = base_info

    extra = {"channel_log2_block": channel_log2_block} if kind in _FLOAT_LAWS else {}
    fixed_note = f"; fixed {fixed}" if fixed else ""
    law = law_cls(
        **consts,
        **extra,
        provenance=Provenance(
            source="fit",
            citation="lightning_fpq.scaling.fitting.fit",
            rows=int((~held).sum()),
            rmse=rmse,
            r2=r2,
            heldout_rmse=heldout_rmse,
            note=f"Huber (delta {huber_delta:g}) on log loss, {len(starts_x)} starts, seed {seed}{fixed_note}",
            n_range=(float(train["N"].min()), float(train["N"].max())),
            d_range=(float(train["D"].min()), float(train["D"].max())),
            block_sizes=_quantized_block_sizes(train),
            extra=extra_info or None,
        ),
    )
    return FitResult(
        law=law,
        rmse=rmse,
        r2=r2,
        residuals=resid,
        predicted=predicted,
        observed=observed,
        heldout=held,
        heldout_rmse=heldout_rmse,
        cost=float(best.cost),
        starts=len(starts_x),
        at_bounds=at_bounds,
        fixed=fixed,
        intervals=intervals,
        d_crit=d_crit,
        baseline=base_info,
    )


def _quantized_settings(data: dict[str, np.ndarray]) -> dict[str, tuple[float, float, float]]:
    """'e2m1 B=32' -> (E, M, log2 B) for every quantized (format, block) in Capybara rows."""
    out = {}
    for e, m, lb, b in zip(data["E"], data["M"], data["log2b"], data["B"]):
        if lb > 0:
            out[f"e{int(e)}m{int(m)} B={b}"] = (float(e), float(m), float(lb))
    return dict(sorted(out.items(), key=lambda kv: (kv[1][2], kv[1][0] + kv[1][1], kv[1][0])))
