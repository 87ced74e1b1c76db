"""Every picture the package draws, and the one matplotlib set-up they share.

:func:`pyplot` selects the Agg backend (files only, no display) and turns a missing
matplotlib into one line; :func:`save_figure` writes a figure and closes it. The demo's
training curves (:func:`lightning_fpq.demo.plot.plot_demo`) use the same two.

:func:`plot_law` (``lightning-fpq plot``): a law's predicted loss against tokens per format,
with each format's critical data size marked.

:func:`plot_fit` (``lightning-fpq fit --plots``): a fitted Capybara law against the runs it
was fitted on, up to four PNG files, each answering one question about the fit:

- ``loss_vs_tokens.png``: per model size and block size (one panel each), the observed final
  loss of every run against its token budget D, one colour per format, with the fitted law's
  curve through them and its critical data size D_crit (a star at the curve's minimum) where
  it falls inside the plotted range. Does the law follow each format's curve, and does the
  observed loss turn up where the law says it does?
- ``fitted_vs_observed.png``: predicted against observed loss for every run, with the y = x
  line and the fit's RMSE, R^2 and held-out RMSE. Which runs does the law miss?
- ``residuals.png``: observed - predicted against D, against N and per format. Is the miss
  systematic (a trend in D or N, one format off) or noise?
- ``penalty_vs_tokens.png`` (when some rows are quantized): each quantized run's loss minus
  the unquantized run of the same N and D (the same seed, so the same initial weights and
  batches), against the law's penalty term. The penalty is what the formats and block sizes
  are fitted on; at this scale it is small next to the data term, and this is the picture
  where one can see whether it is there at all, and whether it grows with D.

Held-out rows (kept out of the fit) are drawn as open markers. Only the Capybara law is drawn
in the fit plots (the one with formats).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from lightning_fpq import _config
from lightning_fpq.formats import FPFormat

from .capybara import capybara_critical_data_size, capybara_loss

__all__ = [
    "format_label",
    "plot_fit",
    "plot_fitted_vs_observed",
    "plot_law",
    "plot_loss_vs_tokens",
    "plot_penalty_vs_tokens",
    "plot_residuals",
    "pyplot",
    "save_figure",
]

_UNQUANTIZED_COLOR = "black"
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


# ------------------------------------------------------------------ matplotlib set-up


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only: no display needed).

    ImportError, one line, when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("drawing plots needs matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Union[str, Path]) -> Path:
    """Write ``fig`` to ``path`` (its folder created), close it, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    pyplot().close(fig)
    return path


def _g(x: float, digits: int = 3) -> str:
    """Compact number for labels: 2.73e+13 -> '2.73e13'."""
    text = f"{x:.{digits}g}"
    return text.replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


# ------------------------------------------------------------------ a law's curves


def plot_law(
    law: Any,
    N: float,
    formats: list[FPFormat],
    block_size: Any,
    path: Union[str, Path],
    *,
    tokens: tuple[float, float],
    title: str,
) -> Path:
    """Predicted loss against training tokens D in ``tokens`` (lo, hi), one curve per format and one
    unquantized (dashed), each format's critical data size marked where it falls in the range."""
    plt = pyplot()
    from matplotlib.ticker import FormatStrFormatter

    lo, hi = tokens
    D = np.logspace(math.log10(lo), math.log10(hi), 400)
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=130)
    colors = plt.get_cmap("tab10").colors
    for i, fmt in enumerate(formats):
        d_crit = float(law.critical_data_size(N, fmt, block_size))
        color = colors[i % len(colors)]
        label = f"{fmt.name} ({fmt.bits} bits)" + (f", D_crit = {_g(d_crit, 2)}" if math.isfinite(d_crit) else "")
        ax.plot(D, law.loss(N, D, fmt, block_size), color=color, lw=2, label=label)
        if math.isfinite(d_crit) and lo <= d_crit <= hi:
            ax.axvline(d_crit, color=color, ls=":", lw=1.2)
            ax.plot([d_crit], [float(law.min_loss(N, fmt, block_size))], "o", color=color, ms=7, mec="black", zorder=5)
    ax.plot(D, law.loss(N, D, None, block_size), color="grey", ls="--", lw=1.2, label="no quantization", zorder=4)
    # y range: from just below the lowest minimum to the unquantized loss at the left edge, so
    # the minima stay visible; a format far past its D_crit leaves the top of the frame
    floor = min([float(law.min_loss(N, f, block_size)) for f in formats] + [float(law.loss(N, hi, None, block_size))])
    top = float(law.loss(N, lo, None, block_size))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(floor - 0.04 * (top - floor), top + 0.04 * (top - floor))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
    ax.tick_params(axis="y", which="minor", labelsize=8)
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("predicted loss (nats/token)")
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(loc="upper right", fontsize=9, framealpha=0.9)
    fig.tight_layout()
    return save_figure(fig, path)


# ------------------------------------------------------------------ a fit against its runs


def format_label(E: float, M: float, log2b: float) -> str:
    """'e2m1'; a row with no quantization penalty (log2 B = 0) is 'bf16 (unquantized)' for E8M7."""
    name = f"e{int(E)}m{int(M)}"
    if log2b == 0:
        return "bf16 (unquantized)" if (int(E), int(M)) == (8, 7) else f"{name}, B=1 (unquantized)"
    return name


def _block_label(b: Any) -> str:
    """'B = 128', 'channel-wise' or 'tensor-wise'."""
    text = _config.block_size_text(b)
    return f"{text}-wise" if isinstance(b, str) else f"B = {text}"


def _formats(data: dict[str, np.ndarray]) -> list[tuple[float, float, bool]]:
    """Distinct (E, M, quantized), lowest precision first, unquantized last."""
    keys = {(float(e), float(m), bool(lb > 0)) for e, m, lb in zip(data["E"], data["M"], data["log2b"])}
    return sorted(keys, key=lambda k: (not k[2], k[0] + k[1], k[0]))


def _colors(formats: list[tuple[float, float, bool]]) -> dict[tuple[float, float, bool], Any]:
    import matplotlib.pyplot as plt

    quantized = [f for f in formats if f[2]]
    cmap = plt.get_cmap("tab10") if len(quantized) <= 10 else plt.get_cmap("viridis")
    colors = {}
    for i, f in enumerate(quantized):
        colors[f] = cmap(i % 10) if len(quantized) <= 10 else cmap(i / max(1, len(quantized) - 1))
    for f in formats:
        colors.setdefault(f, _UNQUANTIZED_COLOR)
    return colors


def _blocks(data: dict[str, np.ndarray]) -> list[tuple[float, Any]]:
    """Distinct (log2 B, B) of the quantized rows, smallest first."""
    seen: dict[float, Any] = {}
    for lb, b in zip(data["log2b"], data["B"]):
        if lb > 0:
            seen.setdefault(round(float(lb), 9), b)
    return sorted(seen.items())


def _merged(data: dict[str, np.ndarray], excluded: Optional[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The fitted rows and the rows left out of the fit, as one set of columns (for ranges and styles)."""
    if not excluded:
        return data
    return {
        k: np.concatenate(
            [
                np.asarray(data[k], dtype=object if k == "B" else float),
                np.asarray(excluded[k], dtype=object if k == "B" else float),
            ]
        )
        for k in ("N", "D", "E", "M", "B", "log2b", "loss")
    }


def _panels(every: dict[str, np.ndarray]) -> list[tuple[float, float, Any]]:
    """(N, log2 B, B) of every panel: each model size once per block size it has quantized runs
    at; a size with none gets one panel for its unquantized runs (log2 B = 0)."""
    out = []
    N_all, lb_all = every["N"].astype(float), every["log2b"].astype(float)
    for N in sorted(set(N_all.tolist())):
        at_n = np.isclose(N_all, N)
        blocks = [(lb, b) for lb, b in _blocks(every) if (at_n & np.isclose(lb_all, lb)).any()]
        out += [(N, lb, b) for lb, b in blocks] or [(N, 0.0, 1)]
    return out


def _panel_grid(plt, count: int):
    """A figure with ``count`` panels, at most four a row; returns (fig, axes, ncols, nrows)."""
    ncols = min(4, count)
    nrows = math.ceil(count / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols + 1.0, 3.0 * nrows + 1.4), dpi=120, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count], ncols, nrows


def _panel_title(N: float, lb: float, b: Any) -> str:
    return f"N = {_g(N)}" + (f", {_block_label(b)}" if lb > 0 else ", unquantized runs only")


def _tokens_text(d: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if d >= scale:
            return f"{d / scale:.3g}{suffix}"
    return f"{d:.3g}"


def _token_ticks(ax, Ds: np.ndarray) -> None:
    """Ticks at the runs' token budgets when there are few of them (131k, 262k, ...), else log decades."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    values = sorted(set(float(d) for d in Ds))
    if len(values) <= 8:
        ax.xaxis.set_major_locator(FixedLocator(values))
        ax.set_xticklabels([_tokens_text(d) for d in values])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _finish_panels(
    fig,
    axes,
    ncols: int,
    nrows: int,
    handles: list,
    title: str,
    ylabel: str,
    xlim: tuple[float, float],
    ylim: tuple[float, float],
    per_row: int = 6,
    Ds: Optional[np.ndarray] = None,
) -> None:
    for i, ax in enumerate(axes):
        ax.set_xscale("log")
        if Ds is not None:
            _token_ticks(ax, Ds)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", alpha=0.1)
        ax.tick_params(labelsize=8)
        if i % ncols == 0:
            ax.set_ylabel(ylabel, fontsize=9)
        else:
            ax.tick_params(labelleft=False)
        if i + ncols >= len(axes):  # nothing below this panel
            ax.set_xlabel("training tokens D", fontsize=9)
    per_row = min(len(handles), per_row)
    fig.legend(handles=handles, loc="lower center", ncol=per_row, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    legend_rows = math.ceil(len(handles) / per_row)
    height = 3.0 * nrows + 1.4
    fig.tight_layout(rect=(0, (0.25 + 0.2 * legend_rows) / height, 1, 1 - 0.35 / height))


def _excluded_points(ax, excluded, N, lb, fmt, colors, y) -> None:
    E, M, quantized = fmt
    lb_match = np.isclose(excluded["log2b"], lb) if quantized else (excluded["log2b"] == 0)
    sel = np.isclose(excluded["N"], N) & lb_match & (excluded["E"] == E) & (excluded["M"] == M)
    if sel.any():
        ax.plot(excluded["D"][sel], y[sel], ls="none", marker="x", ms=6, mew=1.5, color=colors[fmt], zorder=3)


def _observed(ax, x: np.ndarray, y: np.ndarray, rows: np.ndarray, held: np.ndarray, color: Any) -> None:
    """The observed points of one group: filled where fitted, hollow where held out."""
    for mask, filled in ((rows & ~held, True), (rows & held, False)):
        if mask.any():
            ax.plot(
                x[mask],
                y[mask],
                ls="none",
                marker="o",
                ms=5,
                color=color,
                mfc=color if filled else "white",
                mec=color,
                mew=1.3,
                zorder=3,
            )


def plot_loss_vs_tokens(
    result: Any,
    data: dict[str, np.ndarray],
    path: Union[str, Path],
    *,
    title: str = "",
    excluded: Optional[dict[str, np.ndarray]] = None,
) -> Path:
    """Observed loss against D with the fitted curves: a panel per (model size, block size),
    the unquantized runs in every panel of their size.

    ``excluded``: rows left out of the fit (e.g. by ``fit --min-tokens``), drawn as crosses."""
    plt = pyplot()
    consts = result.law.constants()
    every = _merged(data, excluded)
    formats = _formats(every)
    colors = _colors(formats)
    held = np.asarray(result.heldout, dtype=bool)
    d_lo, d_hi = float(every["D"].min()) / 1.25, float(every["D"].max()) * 1.25
    grid = np.logspace(math.log10(d_lo), math.log10(d_hi), 200)
    panels = _panels(every)
    fig, axes, ncols, nrows = _panel_grid(plt, len(panels))
    y_obs = data["loss"]
    y_all = every["loss"].astype(float)
    pad = 0.06 * (y_all.max() - y_all.min() + 1e-9)
    for ax, (N, lb_panel, b_panel) in zip(axes, panels):
        at_n = np.isclose(data["N"], N)
        for fmt in formats:
            E, M, quantized = fmt
            if quantized and lb_panel == 0:
                continue
            if excluded:
                _excluded_points(ax, excluded, N, lb_panel, fmt, colors, excluded["loss"])
            lb_curve = lb_panel if quantized else 0.0
            lb_match = np.isclose(data["log2b"], lb_panel) if quantized else (data["log2b"] == 0)
            rows = at_n & lb_match & (data["E"] == E) & (data["M"] == M)
            if not rows.any():
                continue
            color = colors[fmt]
            ax.plot(
                grid,
                capybara_loss(N, grid, E, M, lb_curve, **consts),
                color=color,
                lw=1.4,
                ls="-" if quantized else "--",
                zorder=2,
            )
            _observed(ax, data["D"], y_obs, rows, held, color)
            if quantized and lb_curve > 0:
                d_crit = float(capybara_critical_data_size(N, E, M, lb_curve, **consts))
                if d_lo <= d_crit <= d_hi:
                    y = float(capybara_loss(N, d_crit, E, M, lb_curve, **consts))
                    ax.plot([d_crit], [y], marker="*", ms=13, color=color, mec="black", mew=0.7, zorder=4)
        ax.set_title(_panel_title(N, lb_panel, b_panel), fontsize=10)
    from matplotlib.lines import Line2D

    handles = [
        Line2D(
            [],
            [],
            color=colors[f],
            marker="o",
            ls="-" if f[2] else "--",
            lw=1.4,
            label=format_label(f[0], f[1], 1.0 if f[2] else 0.0),
        )
        for f in formats
    ]
    handles += [Line2D([], [], color="grey", marker="o", ls="none", label="observed run")]
    if held.any():
        handles.append(Line2D([], [], color="grey", marker="o", mfc="white", ls="none", label="held out of the fit"))
    if excluded:
        handles.append(
            Line2D([], [], color="grey", marker="x", mew=1.5, ls="none", label="left out of the fit (D too small)")
        )
    handles += [
        Line2D([], [], color="grey", ls="-", label="fitted law"),
        Line2D([], [], color="grey", marker="*", ms=11, mec="black", ls="none", label="fitted D_crit (loss minimum)"),
    ]
    _finish_panels(
        fig,
        axes,
        ncols,
        nrows,
        handles,
        title or "Final loss against training tokens: observed runs and the fitted law",
        "final val loss (nats)",
        (d_lo, d_hi),
        (y_all.min() - pad, y_all.max() + pad),
        Ds=every["D"],
    )
    return save_figure(fig, path)


def _paired_baseline(data: dict[str, np.ndarray], pool: Optional[dict[str, np.ndarray]] = None) -> np.ndarray:
    """Per row of ``data``, the observed loss of the unquantized run (in ``pool``, default
    ``data``) with the same N and D; nan where there is none."""
    pool = data if pool is None else pool
    base = np.full(len(data["loss"]), np.nan)
    unq = pool["log2b"].astype(float) == 0
    for i in range(len(base)):
        match = (
            unq & np.isclose(pool["N"].astype(float), data["N"][i]) & np.isclose(pool["D"].astype(float), data["D"][i])
        )
        if match.any():
            base[i] = float(pool["loss"][match].astype(float).mean())
    return base


def plot_penalty_vs_tokens(
    result: Any,
    data: dict[str, np.ndarray],
    path: Union[str, Path],
    *,
    title: str = "",
    excluded: Optional[dict[str, np.ndarray]] = None,
) -> Path:
    """The quantization penalty against D: each quantized run's loss minus the unquantized run of
    the same N and D (observed, paired: same seed, same batches), and the fitted law's penalty term
    (D^b/N^a) log2 B / (g (E+0.5)^dl (M+0.5)^nu). Without unquantized runs the fitted unquantized
    loss is subtracted instead."""
    plt = pyplot()
    consts = result.law.constants()
    every = _merged(data, excluded)
    if not _blocks(every):
        raise ValueError("no quantized rows: there is no quantization penalty to draw")
    formats = [f for f in _formats(every) if f[2]]
    colors = _colors(_formats(every))
    held = np.asarray(result.heldout, dtype=bool)

    def excess_of(rows: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        paired = _paired_baseline(rows, every)
        fitted_base = capybara_loss(rows["N"], rows["D"], rows["E"], rows["M"], 0.0, **consts)
        has = ~np.isnan(paired)
        return rows["loss"] - np.where(has, paired, fitted_base), has

    excess, has_pair = excess_of(data)
    ex_excess = excess_of(excluded)[0] if excluded else None
    d_lo, d_hi = float(every["D"].min()) / 1.25, float(every["D"].max()) * 1.25
    grid = np.logspace(math.log10(d_lo), math.log10(d_hi), 200)
    panels = [p for p in _panels(every) if p[1] > 0]
    fig, axes, ncols, nrows = _panel_grid(plt, len(panels))
    shown = [np.zeros(1)]
    for ax, (N, lb, b) in zip(axes, panels):
        ax.axhline(0, color="grey", lw=1)
        for fmt in formats:
            E, M, _ = fmt
            if excluded:
                _excluded_points(ax, excluded, N, lb, fmt, colors, ex_excess)
                sel = (
                    np.isclose(excluded["N"], N)
                    & np.isclose(excluded["log2b"], lb)
                    & (excluded["E"] == E)
                    & (excluded["M"] == M)
                )
                shown.append(ex_excess[sel])
            rows = np.isclose(data["N"], N) & np.isclose(data["log2b"], lb) & (data["E"] == E) & (data["M"] == M)
            if not rows.any():
                continue
            color = colors[fmt]
            penalty = capybara_loss(N, grid, E, M, lb, **consts) - capybara_loss(N, grid, E, M, 0.0, **consts)
            ax.plot(grid, penalty, color=color, lw=1.4, zorder=2)
            _observed(ax, data["D"], excess, rows, held, color)
            shown.append(excess[rows])
        ax.set_title(_panel_title(N, lb, b), fontsize=10)
    values = np.concatenate(shown)
    lo, hi = min(0.0, float(values.min())), max(0.0, float(values.max()))
    pad = 0.08 * (hi - lo + 1e-9)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=colors[f], marker="o", lw=1.4, label=format_label(f[0], f[1], 1.0)) for f in formats
    ]
    handles += [
        Line2D([], [], color="grey", marker="o", ls="none", label="observed: run - unquantized run (same N, D, seed)"),
        Line2D([], [], color="grey", ls="-", label="fitted penalty term"),
    ]
    if held.any():
        handles.append(Line2D([], [], color="grey", marker="o", mfc="white", ls="none", label="held out of the fit"))
    if excluded:
        handles.append(
            Line2D([], [], color="grey", marker="x", mew=1.5, ls="none", label="left out of the fit (D too small)")
        )
    if not has_pair[data["log2b"] > 0].all():
        handles.append(
            Line2D([], [], color="none", label="(runs without an unquantized twin: minus the fitted unquantized loss)")
        )
    _finish_panels(
        fig,
        axes,
        ncols,
        nrows,
        handles,
        title or "Quantization penalty against training tokens: observed excess loss and the fitted term",
        "loss - unquantized loss (nats)",
        (d_lo, d_hi),
        (lo - pad, hi + pad),
        per_row=5,
        Ds=every["D"],
    )
    return save_figure(fig, path)


def _style(data: dict[str, np.ndarray]):
    formats = _formats(data)
    colors = _colors(formats)
    blocks = _blocks(data)
    marker_of = {lb: _MARKERS[i % len(_MARKERS)] for i, (lb, _) in enumerate(blocks)}
    return formats, colors, blocks, marker_of


def _scatter_by_group(ax, data, x, y, held, formats, colors, marker_of, *, size=26):
    for fmt in formats:
        E, M, quantized = fmt
        base = (data["E"] == E) & (data["M"] == M) & ((data["log2b"] > 0) == quantized)
        groups = [(lb, base & np.isclose(data["log2b"], lb)) for lb in marker_of] if quantized else [(0.0, base)]
        for lb, rows in groups:
            marker = marker_of.get(lb, "D") if quantized else "D"
            for mask, filled in ((rows & ~held, True), (rows & held, False)):
                if mask.any():
                    ax.scatter(
                        x[mask],
                        y[mask],
                        s=size,
                        marker=marker,
                        color=colors[fmt] if filled else "white",
                        edgecolors=colors[fmt],
                        linewidths=1.1,
                        zorder=3,
                    )


def _group_legend(ax_or_fig, formats, colors, blocks, marker_of, *, held_any: bool, **kwargs):
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=colors[f], marker="o", ls="none", label=format_label(f[0], f[1], 1.0 if f[2] else 0.0))
        for f in formats
    ]
    handles += [
        Line2D([], [], color="grey", marker=marker_of[lb], ls="none", label=_block_label(b)) for lb, b in blocks
    ]
    if held_any:
        handles.append(Line2D([], [], color="grey", marker="o", mfc="white", ls="none", label="held out of the fit"))
    return ax_or_fig.legend(handles=handles, **kwargs)


def plot_fitted_vs_observed(
    result: Any, data: dict[str, np.ndarray], path: Union[str, Path], *, title: str = ""
) -> Path:
    """Predicted against observed loss, y = x for reference, with the fit's quality."""
    plt = pyplot()
    formats, colors, blocks, marker_of = _style(data)
    held = np.asarray(result.heldout, dtype=bool)
    obs, pred = np.asarray(result.observed), np.asarray(result.predicted)
    fig, ax = plt.subplots(figsize=(7.2, 6.4), dpi=120)
    lo, hi = min(obs.min(), pred.min()), max(obs.max(), pred.max())
    pad = 0.04 * (hi - lo + 1e-9)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=1, ls="--", zorder=1)
    _scatter_by_group(ax, data, obs, pred, held, formats, colors, marker_of)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")
    ax.set_xlabel("observed final validation loss (nats)")
    ax.set_ylabel("fitted law's loss (nats)")
    quality = f"fit: RMSE {result.rmse:.4f} nats, R$^2$ {result.r2:.4f} on {int((~held).sum())} runs"
    if result.heldout_rmse is not None:
        quality += f"\nheld out: RMSE {result.heldout_rmse:.4f} nats on {int(held.sum())} runs"
    ax.text(
        0.03,
        0.97,
        quality,
        transform=ax.transAxes,
        va="top",
        ha="left",
        fontsize=9,
        bbox=dict(facecolor="white", alpha=0.9, edgecolor="0.7"),
    )
    ax.grid(True, alpha=0.3)
    _group_legend(
        ax, formats, colors, blocks, marker_of, held_any=bool(held.any()), loc="lower right", fontsize=8, framealpha=0.9
    )
    ax.set_title(title or "Fitted against observed loss (dashed: y = x)", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_residuals(result: Any, data: dict[str, np.ndarray], path: Union[str, Path], *, title: str = "") -> Path:
    """Residuals (observed - predicted) against D, against N, and per format."""
    plt = pyplot()
    formats, colors, blocks, marker_of = _style(data)
    held = np.asarray(result.heldout, dtype=bool)
    res = np.asarray(result.residuals)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), dpi=110, sharey=True)
    rmse = result.rmse
    for ax in axes:
        ax.axhline(0, color="grey", lw=1)
        ax.axhspan(-rmse, rmse, color="grey", alpha=0.12, lw=0)
        ax.grid(True, alpha=0.3)
    _scatter_by_group(axes[0], data, data["D"], res, held, formats, colors, marker_of)
    axes[0].set_xscale("log")
    _token_ticks(axes[0], data["D"])
    axes[0].set_xlabel("training tokens D")
    axes[0].set_ylabel("observed - fitted loss (nats)")
    # N: spread the points of one N a little so they do not hide each other
    order = {f: i for i, f in enumerate(formats)}
    offsets = np.array(
        [
            (order[(float(e), float(m), bool(lb > 0))] - (len(formats) - 1) / 2) * 0.012
            for e, m, lb in zip(data["E"], data["M"], data["log2b"])
        ]
    )
    _scatter_by_group(axes[1], data, data["N"] * 10**offsets, res, held, formats, colors, marker_of)
    axes[1].set_xscale("log")
    from matplotlib.ticker import NullFormatter

    axes[1].xaxis.set_minor_formatter(NullFormatter())
    axes[1].set_xlabel("parameters N (points of one N spread by format)")
    x_fmt = np.array(
        [order[(float(e), float(m), bool(lb > 0))] for e, m, lb in zip(data["E"], data["M"], data["log2b"])],
        dtype=float,
    )
    jitter = np.zeros_like(x_fmt)
    for i, (lb, _) in enumerate(blocks):
        jitter[np.isclose(data["log2b"], lb)] = (i - (len(blocks) - 1) / 2) * 0.22
    _scatter_by_group(axes[2], data, x_fmt + jitter, res, held, formats, colors, marker_of)
    axes[2].set_xticks(range(len(formats)))
    axes[2].set_xticklabels(
        [format_label(f[0], f[1], 1.0 if f[2] else 0.0).replace(" (unquantized)", "\n(unquantized)") for f in formats],
        fontsize=8,
    )
    axes[2].set_xlabel("format (block sizes side by side)")
    _group_legend(
        fig,
        formats,
        colors,
        blocks,
        marker_of,
        held_any=bool(held.any()),
        loc="lower center",
        ncol=len(formats) + len(blocks) + int(held.any()),
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(title or f"Residuals of the fitted law (band: ±RMSE = {rmse:.4f} nats)", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    return save_figure(fig, path)


def plot_fit(
    result: Any,
    data: dict[str, np.ndarray],
    out_dir: Union[str, Path],
    *,
    title: Optional[str] = None,
    excluded: Optional[dict[str, np.ndarray]] = None,
) -> list[Path]:
    """The pictures of a Capybara fit, written into ``out_dir``; returns their paths.

    ``result`` is :func:`lightning_fpq.scaling.fitting.fit`'s result and ``data`` the rows it was given,
    as :func:`lightning_fpq.scaling.fitting.load_rows` returns them (same order). ``excluded``: rows
    left out before fitting (same format), drawn as crosses in the loss and penalty plots.
    """
    if getattr(result.law, "kind", None) != "capybara":
        raise ValueError(
            f"plots are drawn for a capybara fit only, not a {getattr(result.law, 'kind', type(result.law).__name__)} fit"
        )
    if len(data["loss"]) != len(result.observed):
        raise ValueError(
            f"data has {len(data['loss'])} rows but the fit has {len(result.observed)}: pass the rows the fit was given"
        )
    out = Path(out_dir)
    suffix = f" ({title})" if title else ""
    return [
        plot_loss_vs_tokens(
            result,
            data,
            out / "loss_vs_tokens.png",
            excluded=excluded,
            title=f"Final loss against training tokens: observed runs and the fitted law{suffix}",
        ),
        plot_fitted_vs_observed(
            result, data, out / "fitted_vs_observed.png", title=f"Fitted against observed loss (dashed: y = x){suffix}"
        ),
        plot_residuals(
            result,
            data,
            out / "residuals.png",
            title=f"Residuals of the fitted law (band: ±RMSE = {result.rmse:.4f} nats){suffix}",
        ),
    ] + (
        [
            plot_penalty_vs_tokens(
                result,
                data,
                out / "penalty_vs_tokens.png",
                excluded=excluded,
                title=f"Quantization penalty against training tokens: observed excess loss and the fitted term{suffix}",
            )
        ]
        if (data["log2b"] > 0).any()
        else []
    )
