"""The demo's figure: observed losses and gaps against the law's predictions, on a log token axis.

Top: each run's validation loss during training (small markers), its final validation loss
(large marker: the run is annealed there, which is what the law predicts), the law's final loss
for the fixed format and for BF16 with their 5-95% bands, D_crit with its band, the
progressive run's switch points, and the experiment's separate runs (hollow squares, each its
own run annealed to its D). Bottom: the quantization gap measured during the runs, the law's
penalty with its band, and the experiment's observed penalty (quantized minus BF16 loss).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .predictions import curve, predictor_for
from .reference import ReferenceRun, arm, penalty
from .run import switch_text

COLORS = {"fixed": "tab:red", "progressive": "tab:blue", "bf16": "0.25"}


def _color(name: str) -> str:
    return COLORS.get(name.split("-")[0], "tab:green")


def plot_demo(cfg: Any, results: list, reference: list[ReferenceRun], path: Path) -> Path:
    from ..scaling.plots import pyplot, save_figure

    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9.5, 9), dpi=110, sharex=True, height_ratios=[3, 2])
    first = results[0]
    law, n = first.law, first.n_params
    block = str(cfg.block)
    fixed = next((r for r in results if r.name.startswith("fixed")), None)
    fmt = fixed.schedule[0] if fixed else next((r.schedule[0] for r in results if r.schedule[0] != "bf16"), None)
    far = max([r.tokens for r in results] + [d for run in reference for d in [run.tokens]] + [1])
    grid = np.geomspace(max(min(r.tokens for r in results) / 64, 1e4), far * 1.5, 60)

    # the law: final loss for the fixed format and for BF16, each with its band
    for name, run_fmt in (("fixed", fmt), ("bf16", "bf16")):
        if run_fmt is None:
            continue
        predictor = predictor_for(cfg, law, n, run_fmt)
        mid, low, high = curve(predictor.loss, grid)
        top.plot(grid, mid, color=_color(name), lw=1.2, ls="--", label=f"law: final loss, {run_fmt} (90% band)")
        top.fill_between(grid, low, high, color=_color(name), alpha=0.12, lw=0)
        if name == "fixed":
            d_crit = predictor.d_crit()
            if d_crit is not None:
                top.axvline(d_crit.mid, color="crimson", lw=1.3)
                top.axvspan(d_crit.low, d_crit.high, color="crimson", alpha=0.06, lw=0)
                top.text(
                    d_crit.mid,
                    0.02,
                    f" D_crit({run_fmt}) = {d_crit.mid:.2g}",
                    color="crimson",
                    transform=top.get_xaxis_transform(),
                    rotation=90,
                    va="bottom",
                    fontsize=8,
                )
            pmid, plow, phigh = curve(predictor.penalty, grid)
            bottom.plot(grid, pmid, color=_color(name), lw=1.2, ls="--", label=f"law: penalty of {run_fmt} (90% band)")
            bottom.fill_between(grid, plow, phigh, color=_color(name), alpha=0.12, lw=0)

    # the experiment's separate runs, each annealed to its D
    if fmt is not None:
        for name, (arm_fmt, arm_block) in (("fixed", (fmt, block)), ("bf16", ("bf16", "1"))):
            _hollow(
                top, arm(reference, arm_fmt, arm_block), name, f"experiment: {arm_fmt} runs, each annealed to its D"
            )
        _hollow(bottom, penalty(reference, fmt, block), "fixed", f"experiment: {fmt} loss - bf16 loss, same D")

    # this demo's runs
    for result in results:
        color = _color(result.name)
        if result.val:
            xs, ys = zip(*result.val)
            top.plot(xs, ys, ".-", color=color, lw=0.8, ms=4, alpha=0.7, label=f"{result.name}: validation loss")
            top.plot(xs[-1], ys[-1], "o", color=color, ms=9)
        if result.gap:
            xs, ys = zip(*result.gap)
            bottom.plot(xs, ys, ".-", color=color, lw=0.9, ms=4, label=f"{result.name}: measured gap")
        for switch in result.history:
            for ax in (top, bottom):
                ax.axvline(switch["tokens"], color=color, ls=":", lw=1.2)
            top.text(
                switch["tokens"],
                0.98,
                f" {switch_text(switch)}",
                color=color,
                transform=top.get_xaxis_transform(),
                rotation=90,
                va="top",
                fontsize=8,
            )

    top.set_xscale("log")
    top.set_xlim(grid[0], grid[-1])  # a wide D_crit band must not stretch the axis
    top.set_ylabel("validation loss (nats / byte)")
    losses = [y for r in results for _, y in r.val] + [r.loss for r in reference]
    if losses:
        top.set_ylim(min(losses) - 0.15, min(max(losses) + 0.15, min(losses) + 1.5))
    top.set_title(
        f"lightning-fpq demo: N = {n:,} non-embedding parameters; law: {_law_label(law)}\n"
        "large dots: final loss of each run (annealed there); hollow squares: the shipped experiment",
        fontsize=9,
    )
    bottom.set_xlabel("training tokens D (log scale)")
    bottom.set_ylabel("quantization gap / penalty (nats)")
    bottom.axhline(0, color="0.6", lw=0.6)
    for ax in (top, bottom):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left" if ax is bottom else "upper right")
    fig.tight_layout()
    return save_figure(fig, path)


def _hollow(ax: Any, points: list[tuple[int, float]], name: str, label: str) -> None:
    """The experiment's points: hollow squares in the color of the demo's matching run."""
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, "s", mfc="none", mec=_color(name), ms=7, mew=1.4, label=label)


def _law_label(law: Any) -> str:
    prov = law.provenance
    label = "the paper's constants (uncalibrated here)" if prov.source == "paper" else f"{prov.source}"
    if prov.rows:
        label += f", {prov.rows} rows"
    if prov.rmse is not None:
        label += f", RMSE {prov.rmse:.3f}"
    return label
