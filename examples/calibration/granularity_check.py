"""A held-out check of the shipped calibration on channel- and tensor-wise scaling.

The shipped law (``demo-calibration``) was fitted on 32-, 8- and 4-element blocks only. Its
prediction for one scale per channel or per tensor rests on a rule, not on data: either the
paper's constant (log2 B = 13.16 for a channel, twice that for a tensor: ``block="channel"``)
or the elements that really share a scale in the layer and batch at hand (what
``CriticalDataMonitor`` uses for a fitted law: ``scale_group_sizes``). This script compares
both with runs made for the purpose (examples/calibration/sweep_granularity.yaml: the
calibration's settings, so that its bf16 rows in runs.csv pair with them), fitting nothing.

    .venv/bin/python examples/calibration/granularity_check.py > examples/calibration/granularity_check.txt
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from lightning_fpq.demo.model import GPT, GPTConfig  # noqa: E402
from lightning_fpq.lightning.critical import law_point, scale_group_sizes  # noqa: E402
from lightning_fpq.linear import convert_linears  # noqa: E402
from lightning_fpq.recipe import QuantRecipe  # noqa: E402
from lightning_fpq.scaling.law import resolve_named_law  # noqa: E402
from lightning_fpq.state import QuantState  # noqa: E402

MODELS = {"w32": (2, 1, 32), "w64": (2, 2, 64)}  # n_layer, n_head, n_embd (sweep_granularity.yaml)
TOKENS_PER_BATCH = 16 * 64
FIT_RMSE = 0.028  # the calibration's own fit (docs/calibration.md)


def rows(path: Path) -> list[dict]:
    latest: dict[str, dict] = {}
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            latest[r["run_id"]] = r
    return [r for r in latest.values() if r["status"] == "ok"]


def counted_groups(model: str, fmt: str, block: str) -> dict:
    """Elements per channel and per tensor scale, per operand, in this model's quantized layers."""
    n_layer, n_head, n_embd = MODELS[model]
    gpt = GPT(GPTConfig(block_size=64, n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    convert_linears(gpt, QuantState(QuantRecipe.from_name("paper", fmt=fmt, block_size=block)))
    return scale_group_sizes(gpt, TOKENS_PER_BATCH)


def main() -> None:
    law = resolve_named_law("demo-calibration")
    new = rows(HERE / "runs_granularity.csv")
    settings = {r["settings"] for r in new}
    bf16 = {
        (r["model"], int(r["D"])): float(r["loss"])
        for r in rows(HERE / "runs.csv")
        if r["format"] == "bf16" and r["seed"] == "0" and r["settings"] in settings
    }
    print("# The shipped calibration on channel- and tensor-wise scaling: a held-out check\n")
    print(
        "Command: .venv/bin/python examples/calibration/granularity_check.py > examples/calibration/granularity_check.txt\n"
    )
    print(f"Law: {law.short_str()}")
    print(f"Runs: {len(new)} rows of examples/calibration/runs_granularity.csv (settings {sorted(settings)}),")
    print("paired with the bf16 rows of runs.csv at the same model, D and seed.\n")
    print("constant = the paper's log2 B (channel 13.16, tensor 26.31); counted = log2 of the elements")
    print("that share one scale in these layers and batches of 1,024 tokens (what the monitor uses).\n")
    print("| model | format | scale | D | observed | law: constant | law: counted | penalty obs | constant | counted |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    errors: dict[tuple[str, str], list[float]] = {}
    cache: dict[tuple[str, str, str], dict] = {}
    for r in sorted(new, key=lambda r: (r["B"], r["format"], r["model"], int(r["D"]))):
        model, fmt, block, D, N = r["model"], r["format"], r["B"], int(r["D"]), int(r["N"])
        recipe = QuantRecipe.from_name("paper", fmt=fmt, block_size=block)
        key = (model, fmt, block)
        if key not in cache:
            cache[key] = counted_groups(model, fmt, block)
        const = law_point(recipe, law, N)  # no groups: the paper's constant
        counted = law_point(recipe, law, N, cache[key])
        observed = float(r["loss"])
        base = bf16.get((model, D))
        pred_c, pred_n = const.loss(law, N, D), counted.loss(law, N, D)
        errors.setdefault(("constant", block), []).append(pred_c - observed)
        errors.setdefault(("counted", block), []).append(pred_n - observed)
        pen = f"{observed - base:+.3f}" if base is not None else "-"
        print(
            f"| {model} | {fmt} | {block} | {D / 1e6:.2f}M | {observed:.4f} | {pred_c:.4f} | {pred_n:.4f} "
            f"| {pen} | {const.penalty(law, N, D):+.3f} | {counted.penalty(law, N, D):+.3f} |"
        )
    print("\nPrediction error (law - observed), nats:\n")
    print("| rule | scale | runs | RMSE | mean (bias) | max abs |")
    print("|---|---|---|---|---|---|")
    for (rule, block), errs in sorted(errors.items()):
        rmse = math.sqrt(sum(e * e for e in errs) / len(errs))
        print(
            f"| {rule} | {block} | {len(errs)} | {rmse:.3f} | {sum(errs) / len(errs):+.3f} "
            f"| {max(abs(e) for e in errs):.3f} |"
        )
    print(f"\nFor scale: the calibration's own fit has RMSE {FIT_RMSE} on the rows it was fitted on.")


if __name__ == "__main__":
    main()
