"""Tensor-wise E1M0 in the D_crit experiment: the law's penalty with the paper's constant for
log2 B against the elements that really share one scale (counted in the model and a batch).

    .venv/bin/python examples/dcrit/scale_groups.py

Prints, per D, the observed penalty (E1M0 tensor-wise minus bf16 final loss, seed 0) and the
shipped calibration's penalty both ways; the RMS of each against the observation.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

from lightning_fpq.demo.model import GPTConfig, GPTLightning
from lightning_fpq.demo.reference import load_reference, penalty
from lightning_fpq.lightning.critical import law_point, scale_group_sizes
from lightning_fpq.lightning.precision import FPQuantPrecision
from lightning_fpq.recipe import QuantRecipe
from lightning_fpq.scaling.law import resolve_named_law

HERE = Path(__file__).resolve().parent
TOKENS_PER_BATCH = 16 * 64  # the experiment's batches (sweep.yaml)


def main() -> None:
    warnings.simplefilter("ignore")
    law = resolve_named_law("demo-calibration")
    model = GPTLightning(dataclasses.asdict(GPTConfig(block_size=64, n_layer=2, n_head=1, n_embd=32)))
    recipe = QuantRecipe.from_name("paper", block_size="tensor").with_format("e1m0", block_size="tensor")
    FPQuantPrecision(recipe=recipe).convert_module(model)
    groups = scale_group_sizes(model, TOKENS_PER_BATCH)
    n = 33_664
    constant, counted = law_point(recipe, law, n), law_point(recipe, law, n, groups)
    print(
        "log2 of the elements per tensor scale, counted:",
        {r: round(math.log2(g["tensor"]), 2) for r, g in groups.items()},
    )
    print(f"paper's constant: log2 B = {2 * law.channel_log2_block:.2f} for every operand")
    observed = penalty(load_reference([str(HERE / "runs.csv")]), "e1m0", "tensor")
    print(f"\n{'D':>10}{'observed':>10}{'constant':>10}{'counted':>10}")
    errors: dict[str, list[float]] = {"constant": [], "counted": []}
    for d, obs in observed:
        c, k = constant.penalty(law, n, d), counted.penalty(law, n, d)
        errors["constant"].append(c - obs)
        errors["counted"].append(k - obs)
        print(f"{d:>10,}{obs:>10.3f}{c:>10.3f}{k:>10.3f}")
    for name, errs in errors.items():
        print(f"RMS error, {name}: {math.sqrt(sum(e * e for e in errs) / len(errs)):.3f} nats")
    print(
        f"D_crit: constant {constant.critical_data_size(law, n):.3g}, counted {counted.critical_data_size(law, n):.3g}"
    )


if __name__ == "__main__":
    main()
