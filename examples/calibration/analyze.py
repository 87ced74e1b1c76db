"""The numbers docs/calibration.md quotes, computed from the sweep's CSV (nothing hard-coded).

    python examples/calibration/analyze.py [examples/calibration/runs.csv] [--min-tokens 2e5]

Prints markdown tables. E0My is read as E1M(y-1), as the law reads it
(``lightning_fpq.scaling.capybara.canonical_em``): in this quantizer the two are the same grid,
and the script first checks that the sweep's E0M2 and E1M1 runs are bit-identical (the
evidence for the merge), then shows each such pair once, as "e1m1 (= e0m2)".
1. each quantized run's loss minus the unquantized run of the same N and D (paired: same
   seed, same initial weights, same batches), the observed quantization penalty;
2. that penalty divided by log2 B, for the formats run at several block sizes (a penalty
   linear in log2 B through B = 1 gives the same number for every B);
3. where a format's loss stops falling with D (an observed turn-up) and the fitted D_crit
   with its 5-95% interval over 40 bootstrap refits (as ``lightning-fpq fit --bootstrap 40``);
4. fits with some constants held, against the free fit (is a simpler or the paper's
   precision term as good?), on the rows with D >= --min-tokens (as the shipped law), the
   held-out fit, and the free fit's residuals by model and D;
5. the penalty term alone fitted to the paired excess losses of section 1 (least squares in
   nats, with standard errors): a direct estimate of dl against nu, with E0M2 read as E1M1,
   without the E0M2 rows, and (for comparison) read as E = 0, M = 2 as the law did before.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from lightning_fpq.scaling.capybara import CapybaraLaw, canonical_em
from lightning_fpq.scaling.fitting import fit, load_rows
from lightning_fpq.scaling.sweep_csv import ok_rows, read_rows

BOOTSTRAP = 40  # refits for the D_crit intervals of section 3 (the shipped law's --bootstrap 40)


def canonical_name(fmt: str, E: int, M: int) -> str:
    """The name the analysis uses for a row's format: E0My -> e1m(y-1), the law's representative."""
    if fmt == "bf16":
        return fmt
    e, m = canonical_em(E, M)
    return f"e{e}m{m}"


def main(path: str, min_tokens: float) -> None:
    rows, counts = ok_rows(read_rows(path))
    print(f"{os.path.relpath(path)}: {counts['used']} ok rows of {counts['total']}\n")
    raw = {(r["model"], r["format"], r["B"], int(r["D"])): float(r["loss"]) for r in rows}

    # E0My and E1M(y-1) are the same grid: check the runs agree, then keep one of each pair
    twins = defaultdict(list)  # canonical key -> [(format as run, loss)]
    for r in rows:
        name = canonical_name(r["format"], int(r["E"]), int(r["M"]))
        twins[(r["model"], name, r["B"], int(r["D"]))].append((r["format"], float(r["loss"])))
    pairs = {k: v for k, v in twins.items() if len(v) > 1}
    if pairs:
        diffs = [max(x for _, x in v) - min(x for _, x in v) for v in pairs.values()]
        names = sorted({" = ".join(sorted({f for f, _ in v})) for v in pairs.values()})
        print(
            f"Same grid, same runs: {', '.join(names)} ({len(pairs)} pairs at the same model, B and D): "
            f"largest |loss difference| {max(diffs):.2e} nats. The analysis reads E0My as E1M(y-1), "
            "as the law does, and shows each pair once.\n"
        )
    runs = {k: v[0][1] for k, v in twins.items()}
    alias = {}  # (model, canonical format, B) -> label naming the formats run
    for (model, name, b, _), v in twins.items():
        run_as = sorted({f for f, _ in v}, key=lambda f: (f != name, f))
        alias[(model, name, b)] = name if run_as == [name] else f"{name} (= {', '.join(run_as[1:])})"
    n_of = {r["model"]: int(r["N"]) for r in rows}
    Ds = sorted({int(r["D"]) for r in rows})
    combos = sorted(
        {(m, f, b) for (m, f, b, _) in runs if f != "bf16"},
        key=lambda k: (n_of[k[0]], k[1], int(k[2])),
    )

    print("## 1. Observed penalty: loss - unquantized loss at the same N and D (nats)\n")
    print("| model | N | format | B | " + " | ".join(f"D={d:,}" for d in Ds) + " |")
    print("|---|---|---|---|" + "---|" * len(Ds))
    for model, fmt, b in combos:
        cells = []
        for d in Ds:
            q, base = runs.get((model, fmt, b, d)), runs.get((model, "bf16", "1", d))
            cells.append("" if q is None or base is None else f"{q - base:+.4f}")
        print(f"| {model} | {n_of[model]:,} | {alias[(model, fmt, b)]} | {b} | " + " | ".join(cells) + " |")

    print("\n## 2. Penalty / log2 B for formats run at several block sizes (nats per bit of log2 B)\n")
    by_fmt = defaultdict(list)
    for model, fmt, b in combos:
        by_fmt[(model, fmt)].append(b)
    print("| model | format | B | log2 B | " + " | ".join(f"D={d:,}" for d in Ds) + " |")
    print("|---|---|---|---|" + "---|" * len(Ds))
    for (model, fmt), blocks in by_fmt.items():
        if len(blocks) < 2:
            continue
        for b in sorted(blocks, key=int):
            cells = []
            for d in Ds:
                q, base = runs.get((model, fmt, b, d)), runs.get((model, "bf16", "1", d))
                cells.append("" if q is None or base is None else f"{(q - base) / math.log2(int(b)):+.4f}")
            print(f"| {model} | {alias[(model, fmt, b)]} | {b} | {math.log2(int(b)):g} | " + " | ".join(cells) + " |")

    fit_rows = [r for r in rows if int(r["D"]) >= min_tokens]
    print(
        f"\n## 3. Does the loss turn up with D? (observed) and the fitted D_crit (fit on the {len(fit_rows)} rows with D >= {min_tokens:g})\n"
    )
    result = fit(fit_rows, starts=32, seed=0, bootstrap=BOOTSTRAP)
    law = result.law
    refits = law.resampled()
    print(
        f"D_crit at each model's N; 5-95%: over {len(refits)} of {BOOTSTRAP} bootstrap refits (rows resampled, seed 0)\n"
    )
    print("| model | format | B | losses over D | turns up? | fitted D_crit (tokens) | 5-95% | largest D / D_crit |")
    print("|---|---|---|---|---|---|---|---|")
    for model, fmt, b in combos:
        losses = [runs.get((model, fmt, b, d)) for d in Ds]
        seq = [(d, loss) for d, loss in zip(Ds, losses) if loss is not None]
        up = [f"{d1:,}->{d2:,} (+{y2 - y1:.4f})" for (d1, y1), (d2, y2) in zip(seq, seq[1:]) if y2 > y1]
        d_crit = float(law.critical_data_size(n_of[model], fmt, int(b)))
        lo, hi = np.percentile([float(x.critical_data_size(n_of[model], fmt, int(b))) for x in refits], (5, 95))
        text = ", ".join(f"{loss:.3f}" for _, loss in seq)
        print(
            f"| {model} | {alias[(model, fmt, b)]} | {b} | {text} | {'; '.join(up) or 'no'} | {d_crit:.3g} | "
            f"{lo:.2g}..{hi:.2g} | {seq[-1][0] / d_crit:.3g} |"
        )

    print(f"\n## 4. Fits with constants held (the {len(fit_rows)} rows with D >= {min_tokens:g}; RMSE in nats)\n")
    paper = CapybaraLaw.paper()
    variants = [
        ("all 8 free", {}),
        ("dl, nu held at the paper's", {"dl": paper.dl, "nu": paper.nu}),
        ("dl = 0 (exponent bits do not matter)", {"dl": 0.0}),
        ("nu = 0 (mantissa bits do not matter)", {"nu": 0.0}),
    ]
    print("| fit | RMSE | R^2 | n | a | d | b | eps | g | dl | nu | at bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, fixed in variants:
        res = fit(fit_rows, fixed=fixed, starts=32, seed=0)
        c = res.law.constants()
        print(
            f"| {name} | {res.rmse:.4f} | {res.r2:.4f} | "
            + " | ".join(f"{c[k]:.4g}" for k in ("n", "a", "d", "b", "eps", "g", "dl", "nu"))
            + f" | {', '.join(res.at_bounds) or '-'} |"
        )
    held = fit(fit_rows, starts=32, seed=0, holdout="largest_N")
    data = load_rows(fit_rows)
    big = data["N"] == data["N"].max()
    print(
        f"\nheld out (the largest model, N = {int(data['N'].max()):,}, {int(big.sum())} runs, fitted on the rest): "
        f"held-out RMSE {held.heldout_rmse:.4f} nats; fit RMSE {held.rmse:.4f}; dl {held.law.dl:.3g}, nu {held.law.nu:.3g}"
    )
    worst = np.argsort(-np.abs(result.residuals))[:5]
    print(
        "\nlargest residuals of the free fit: "
        + "; ".join(
            f"N={int(data['N'][i]):,} D={int(data['D'][i]):,} e{int(data['E'][i])}m{int(data['M'][i])} B={data['B'][i]}: "
            f"{result.residuals[i]:+.4f}"
            for i in worst
        )
    )
    resid = result.residuals
    unq = data["B"] == 1
    print(
        f"\nresiduals of the free fit (observed - fitted, nats) by model and D: mean, min..max over the runs; "
        f"the unquantized runs alone: {resid[unq].min():+.4f}..{resid[unq].max():+.4f}\n"
    )
    fit_Ds = sorted({int(d) for d in data["D"]})
    print("| N | " + " | ".join(f"D={d:,}" for d in fit_Ds) + " |")
    print("|---|" + "---|" * len(fit_Ds))
    for n in sorted({int(x) for x in data["N"]}):
        cells = []
        for d in fit_Ds:
            r = resid[(data["N"] == n) & (data["D"] == d)]
            cells.append(f"{r.mean():+.4f} ({r.min():+.4f}..{r.max():+.4f}, {r.size} runs)" if r.size else "")
        print(f"| {n:,} | " + " | ".join(cells) + " |")

    penalty_fit(raw, rows, min_tokens)


def penalty_fit(runs: dict, rows: list, min_tokens: float) -> None:
    """Least squares of the paired excess loss against (D^b/N^a) log2 B / (g (E+.5)^dl (M+.5)^nu).

    ``runs``: every row's loss by (model, format as run, B, D)."""
    from scipy.optimize import least_squares

    pts = []
    for r in rows:
        if r["format"] == "bf16" or int(r["D"]) < min_tokens:
            continue
        base = runs.get((r["model"], "bf16", "1", int(r["D"])))
        if base is not None:
            pts.append(
                (
                    int(r["N"]),
                    int(r["D"]),
                    int(r["E"]),
                    int(r["M"]),
                    math.log2(int(r["B"])),
                    float(r["loss"]) - base,
                    r["format"],
                )
            )
    N, D, E_run, M_run, lb, y = (np.array([p[i] for p in pts], dtype=float) for i in range(6))
    canon = np.array([canonical_em(int(e), int(m)) for e, m in zip(E_run, M_run)], dtype=float)
    E, M = canon[:, 0], canon[:, 1]
    print(
        f"\n## 5. The penalty term alone, fitted to the {len(pts)} paired excess losses with D >= {min_tokens:g} "
        "(least squares in nats; +- one standard error)\n"
    )
    print("| fit | log10 g | a | b | dl | nu | RMSE (nats) |")
    print("|---|---|---|---|---|---|---|")

    def run(name: str, free_ab: bool, keep: np.ndarray, E: np.ndarray = E, M: np.ndarray = M) -> None:
        def model(x):
            lg, a, b, dl, nu = x if free_ab else (x[0], 0.0, 0.5, x[1], x[2])
            return D[keep] ** b / N[keep] ** a * lb[keep] / (10**lg * (E[keep] + 0.5) ** dl * (M[keep] + 0.5) ** nu)

        x0 = [3.0, 0.1, 0.5, 1.0, 1.0] if free_ab else [3.0, 1.0, 1.0]
        lo = [-3, -1.0, 0.01, 0.0, 0.0] if free_ab else [-3, 0.0, 0.0]
        hi = [12, 1.5, 1.5, 10.0, 10.0] if free_ab else [12, 10.0, 10.0]
        res = least_squares(lambda x: model(x) - y[keep], x0, bounds=(lo, hi))
        dof = max(1, keep.sum() - len(x0))
        sigma2 = float(np.sum(res.fun**2)) / dof
        try:
            cov = np.linalg.inv(res.jac.T @ res.jac) * sigma2
            se = np.sqrt(np.diag(cov))
        except np.linalg.LinAlgError:
            se = np.full(len(x0), np.nan)
        vals = list(res.x) if free_ab else [res.x[0], 0.0, 0.5, res.x[1], res.x[2]]
        errs = list(se) if free_ab else [se[0], np.nan, np.nan, se[1], se[2]]
        cells = [f"{v:.3g} +- {e:.2g}" if np.isfinite(e) else f"{v:.3g} (held)" for v, e in zip(vals, errs)]
        print(f"| {name} | " + " | ".join(cells) + f" | {math.sqrt(float(np.mean(res.fun**2))):.4f} |")

    every = np.ones(len(y), dtype=bool)
    no_e0m2 = np.array([p[6] != "e0m2" for p in pts])
    run("a, b free (E0M2 read as E1M1, as the law)", True, every)
    run("a, b free, without the E0M2 rows (each repeats an E1M1 run)", True, no_e0m2)
    run("a, b free, E0M2 read as E = 0, M = 2 (the law before issue 12)", True, every, E_run, M_run)
    run("a = 0, b = 0.5 held (E0M2 read as E1M1)", False, every)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", default=str(Path(__file__).with_name("runs.csv")))
    parser.add_argument(
        "--min-tokens", type=float, default=2e5, help="rows fitted: D >= this (default 2e5, as the shipped law)"
    )
    args = parser.parse_args()
    main(args.csv, args.min_tokens)
