"""The demo's summary: what the law predicted and what the runs observed, in numbers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..lightning.gap import gap_slope
from .predictions import predictor_for
from .reference import ReferenceRun, arm, penalty
from .run import switch_text


def summary_text(cfg: Any, results: list, reference: list[ReferenceRun], plot_path: Path) -> str:
    by_name = {r.name: r for r in results}
    lines = _header(cfg, results) + _table(cfg, results, reference)
    fixed = next((r for r in results if r.name.startswith("fixed")), None)
    if fixed is not None:
        lines += _fixed_run(cfg, fixed, by_name.get("bf16"), reference)
    if "progressive" in by_name:
        lines += _progressive_run(cfg, by_name)
    lines += [f"{r.name}: quantized stages ran on {'; '.join(r.backends)}" for r in results if r.backends]
    lines += ["", f"plot: {plot_path}", f"logs: {', '.join(str(r.metrics_csv) for r in results)}"]
    if any(not math.isfinite(r.final_val_loss) for r in results):
        lines.append("note: a run logged no validation loss (fewer steps than val_every?)")
    return "\n".join(lines)


def _header(cfg: Any, results: list) -> list[str]:
    first = results[0]
    law, prov = first.law, first.law.provenance
    fitted = prov.source + (f", {prov.rows} rows, RMSE {prov.rmse:.3f}" if prov.rmse is not None else "")
    lines = [
        "",
        "lightning-fpq demo: what the law predicted, what the runs observed",
        "=" * 66,
        f"model {cfg.model}: N = {first.n_params:,} non-embedding parameters; {first.tokens:,} tokens per run "
        f"({cfg.steps} steps x {cfg.tokens_per_step:,}); law: {fitted}",
    ]
    lines += [f"  {w.line()}" for w in law.extrapolation(N=first.n_params, D=[r.tokens for r in results])]
    if prov.source == "paper":
        lines.append("  note: the paper's constants belong to LLaMA on Dolma: uncalibrated at this scale")
    return lines


def _table(cfg: Any, results: list, reference: list[ReferenceRun]) -> list[str]:
    """Each run's final validation loss beside the law's (fixed-format runs only) and the experiment's."""
    header = f"{'run':<14}{'final val loss':>15}   {'law: final loss (90%)':<28}{'obs - law':>10}{'wall':>8}"
    lines = ["", header, "-" * len(header)]
    same_d = []
    for r in results:
        if len(r.schedule) == 1:
            band = predictor_for(cfg, r.law, r.n_params, r.schedule[0]).loss(r.tokens)
            spread = f"({band.low:.3f}-{band.high:.3f})" if band.low != band.high else "(no refits)"
            predicted, off = f"{band.mid:.3f} {spread}", f"{r.final_val_loss - band.mid:+.3f}"
            observed = dict(arm(reference, r.schedule[0], _block(cfg, r.schedule[0]), cfg.seed)).get(r.tokens)
            if observed is not None:  # the experiment has fixed-format runs only
                same_d.append(f"{r.name} {observed:.4f}")
        else:
            predicted, off = "- (no law for a schedule)", "-"
        lines.append(f"{r.name:<14}{r.final_val_loss:>15.4f}   {predicted:<28}{off:>10}{r.wall_s:>7.0f}s")
    if same_d:
        lines.append(f"  the shipped experiment's runs at this D and seed: {', '.join(same_d)}")
    return lines


def _fixed_run(cfg: Any, fixed: Any, bf16: Any, reference: list[ReferenceRun]) -> list[str]:
    """D_crit, the measured gap, the penalty against the law's, and the experiment's longer runs."""
    fmt, law = fixed.schedule[0], fixed.law
    predictor = predictor_for(cfg, law, fixed.n_params, fmt)
    lines = [""]
    d_crit = predictor.d_crit()
    if d_crit is not None:
        lines.append(
            f"D_crit({fmt}, B={cfg.block}) = {d_crit.text('.3g')} tokens; the runs reached "
            f"{fixed.tokens / d_crit.mid:.0%} of it."
        )
    if fixed.gap:
        slope = gap_slope(fixed.gap)
        (d0, g0), (d1, g1) = fixed.gap[0], fixed.gap[-1]
        lines.append(
            f"Quantization gap of {fixed.name} (held-out batch, quantized - unquantized forward, same weights): "
            f"{g0:+.4f} nats at {d0:,} tokens, {g1:+.4f} at {d1:,}; d log|gap| / d log D = "
            + (f"{slope:.2f}" if slope is not None else "- (needs 3 points of one sign)")
            + f" (the law's penalty: b = {law.b:.3f})."
            + (
                " Negative: the weights have adapted to the grid, and their unquantized values are the worse "
                "model; the gap measures that reliance, not the law's penalty (the line below)."
                if g1 < 0
                else ""
            )
        )
    if bf16 is not None:
        observed = fixed.final_val_loss - bf16.final_val_loss
        lines.append(
            f"Penalty at {fixed.tokens:,} tokens: observed {fmt} - bf16 final loss {observed:+.4f} nats; "
            f"the law: {predictor.penalty(fixed.tokens).text('.4f')}."
        )
    points, paired = arm(reference, fmt, str(cfg.block)), penalty(reference, fmt, str(cfg.block))
    if points:
        lowest = min(points, key=lambda p: p[1])
        later = [f"{loss - lowest[1]:+.3f} at {d / 1e6:.2f}M" for d, loss in points if d > lowest[0]]
        lines.append(
            f"The shipped experiment (separate runs annealed to each D, examples/dcrit): {fmt} B={cfg.block} "
            f"is lowest at D = {lowest[0] / 1e6:.2f}M ({lowest[1]:.4f})"
            + (f", then {', '.join(later)}" if later else ", still falling at its largest D")
            + f"; its penalty {', '.join(f'{p:+.3f}' for _, p in paired)} nats at "
            + ", ".join(f"{d / 1e6:.2f}M" for d, _ in paired)
            + " (verdict by the rule fixed in advance: docs/dcrit_experiment.md)."
        )
    return lines


def _progressive_run(cfg: Any, by_name: dict) -> list[str]:
    progressive = by_name["progressive"]
    switches = "; ".join(f"{switch_text(h)} at step {h['step']} ({h['tokens']:,} tokens)" for h in progressive.history)
    others = [f"{name} {r.final_val_loss:.4f}" for name, r in by_name.items() if name != "progressive"]
    return [
        f"Progressive run ({' -> '.join(progressive.schedule)}, switch_at={cfg.switch_at}): "
        f"{switches or 'no switch within the budget'}.",
        f"  final val loss {progressive.final_val_loss:.4f}" + (f" against {', '.join(others)}" if others else ""),
    ]


def _block(cfg: Any, fmt: str) -> str:
    """The experiment CSV's block column for a run of ``fmt`` ("1" for BF16)."""
    return "1" if fmt == "bf16" else str(cfg.block)
