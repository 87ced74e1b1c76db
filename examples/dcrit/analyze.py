"""The analysis of the critical-data-size runs (docs/dcrit_experiment.md), part 1 or part 2.

Part 1 (the default) reads examples/dcrit/runs.csv (seed 0, weight decay 0.1), runs_seed1.csv
(seed 1, the same settings) and runs_wd0.csv (weight decay 0); part 2 (``--part 2``) reads
runs_part2.csv and runs_part2_seed1.csv (seeds 0 and 1, bf16 and E1M0 B=32, corpus
stdlib+torch). It prints, in this order:

1. the runs: validation loss per arm, D and seed, the training loss and the passes over the
   training split;
2. the paired quantization penalty (quantized minus bf16, same seed and weight decay), next
   to what the shipped calibration (as it was when part 1's protocol was written: PROTOCOL_LAW)
   predicts for it;
3. the decision rule fixed in the protocol, per quantized arm and doubling, and its verdict;
4. two laws fitted on the runs with D below the largest and judged on the largest-D runs
   held out: Capybara (lightning_fpq.scaling.fitting.fit; it has a minimum in D) and a law
   without a minimum (written here: a saturating penalty); then both refitted on every run,
   with a residual-bootstrap interval for Capybara's D_crit.

Run from the repository root (writes the plots to examples/dcrit/plots/, plots_part2/):

    .venv/bin/python examples/dcrit/analyze.py > examples/dcrit/analysis.txt
    .venv/bin/python examples/dcrit/analyze.py --part 2 > examples/dcrit/analysis_part2.txt

It works on whatever rows exist (a sweep still under way gives a partial analysis).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from lightning_fpq.scaling.capybara import CapybaraLaw  # noqa: E402
from lightning_fpq.scaling.fitting import fit  # noqa: E402

# What each part of the experiment reads: (csv, weight decay) sources (the CSVs of one weight
# decay share one settings hash), its quantized arms, its corpus, where its plots go.
PARTS = {
    1: dict(
        sources=(("runs.csv", 0.1), ("runs_seed1.csv", 0.1), ("runs_wd0.csv", 0.0)),
        arms=(("e1m0", "32"), ("e1m0", "tensor")),
        corpus="stdlib",
        plots="examples/dcrit/plots",
        command=".venv/bin/python examples/dcrit/analyze.py > examples/dcrit/analysis.txt",
    ),
    2: dict(
        sources=(("runs_part2.csv", 0.1), ("runs_part2_seed1.csv", 0.1)),
        arms=(("e1m0", "32"),),
        corpus="stdlib+torch",
        plots="examples/dcrit/plots_part2",
        command=".venv/bin/python examples/dcrit/analyze.py --part 2 > examples/dcrit/analysis_part2.txt",
    ),
}
SOURCES = PARTS[1]["sources"]  # main() sets these three from --part
QUANT_ARMS = PARTS[1]["arms"]
CORPUS = PARTS[1]["corpus"]
FLAT = 0.02  # nats per doubling: the protocol's "flat" and the floor of the rise threshold


def label(fmt: str, block: str, wd: float) -> str:
    name = "bf16" if fmt == "bf16" else f"E1M0 {'B=' + block if block != 'tensor' else 'tensor'}"
    return name + ("" if wd else " wd=0")


def load(folder: Path = HERE) -> list[dict]:
    rows, hashes = [], {}
    for name, wd in SOURCES:
        path = folder / name
        if not path.exists():
            continue
        latest: dict[str, dict] = {}
        with open(path, newline="") as fh:
            for r in csv.DictReader(fh):
                latest[r["run_id"]] = r  # a retried run: its last row counts
        for r in latest.values():
            if r["status"] != "ok":
                continue
            hashes.setdefault(wd, set()).add(r["settings"])
            rows.append(
                dict(
                    run_id=r["run_id"],
                    fmt=r["format"],
                    B=r["B"],
                    seed=int(r["seed"]),
                    wd=wd,
                    N=int(r["N"]),
                    D=int(r["D"]),
                    E=int(r["E"]),
                    M=int(r["M"]),
                    loss=float(r["loss"]),
                    train_loss=float(r["train_loss"]) if r["train_loss"] else float("nan"),
                    cpu_s=float(r["cpu_s"]),
                    wall_s=float(r["wall_s"]),
                )
            )
    for wd, h in hashes.items():
        if len(h) != 1:
            raise SystemExit(f"rows at weight decay {wd} carry {len(h)} settings hashes: {sorted(h)}")
    return rows


def table(rows: list[dict]) -> dict:
    """(fmt, B, wd) -> {D: {seed: row}}"""
    out: dict = {}
    for r in rows:
        out.setdefault((r["fmt"], r["B"], r["wd"]), {}).setdefault(r["D"], {})[r["seed"]] = r
    return out


def fmt_d(D: float) -> str:
    return f"{D / 1e6:.2f}M"


def train_bytes() -> int:
    from lightning_fpq.demo.data import split_corpus

    return int(split_corpus(None, 0.1, CORPUS)[0].numel())


# The shipped calibration as it was when part 1's protocol was written (the law file at commit
# f4af143); it was refitted afterwards (E0My read as E1M(y-1), docs/calibration.md). Both parts
# hold a, dl and nu at these values in their Capybara fits, as part 1's protocol fixed them, and
# show this law's penalty, so that every number of analysis.txt reproduces.
PROTOCOL_LAW = dict(
    n=4.855844353140247,
    a=0.0942381690765452,
    d=1040.8963825551289,
    b=0.5693160886639111,
    eps=5.260948640031045e-13,
    g=158332.44098461824,
    dl=0.597654960905024,
    nu=1.7165607291620617,
    channel_log2_block=13.1567,
)


def shipped_law() -> CapybaraLaw:
    """The shipped law of part 1's protocol (PROTOCOL_LAW)."""
    return CapybaraLaw(**PROTOCOL_LAW)


# ------------------------------------------------------------------ 1-2: runs and penalties
def print_runs(tab: dict, n_train: int) -> None:
    print("## 1. The runs (validation loss, nats/byte; train = mean training loss over the last 10% of steps)\n")
    print(
        f"Training split: {n_train:,} bytes (training split of corpus={CORPUS}, val_fraction 0.1); passes = D / {n_train:,}.\n"
    )
    print("| arm | D | passes | loss s0 | loss s1 | train s0 | train - val s0 | CPU-min s0 |")
    print("|---|---|---|---|---|---|---|---|")
    for key in sorted(tab, key=lambda k: (-k[2], k[0] != "bf16", k[1])):
        for D in sorted(tab[key]):
            s = tab[key][D]
            s0, s1 = s.get(0), s.get(1)
            cells = [
                label(*key),
                fmt_d(D),
                f"{D / n_train:.2f}",
                f"{s0['loss']:.4f}" if s0 else "-",
                f"{s1['loss']:.4f}" if s1 else "-",
                f"{s0['train_loss']:.4f}" if s0 else "-",
                f"{s0['train_loss'] - s0['loss']:+.4f}" if s0 else "-",
                f"{s0['cpu_s'] / 60:.1f}" if s0 else "-",
            ]
            print("| " + " | ".join(cells) + " |")
    total_cpu = sum(r["cpu_s"] for v in tab.values() for s in v.values() for r in s.values())
    total_wall = sum(r["wall_s"] for v in tab.values() for s in v.values() for r in s.values())
    n_runs = sum(len(s) for v in tab.values() for s in v.values())
    print(
        f"\n{n_runs} runs ok: {total_cpu / 60:.1f} CPU-minutes, {total_wall / 60:.1f} wall-minutes (summed over runs).\n"
    )


def print_penalties(tab: dict, law: CapybaraLaw, n_params: int) -> None:
    print("## 2. Quantization penalty: quantized minus bf16, same seed and weight decay (nats)\n")
    print(
        "shipped = the penalty term of the shipped calibration (fitted on the 2 MB demo corpus) as it was when\n"
        "part 1's protocol was written, at this N and D.\n"
    )
    print("| arm | D | seed 0 | seed 1 | shipped law |")
    print("|---|---|---|---|---|")
    for wd in (0.1, 0.0):
        for fmt, block in QUANT_ARMS:
            q, ref = tab.get((fmt, block, wd)), tab.get(("bf16", "1", wd))
            if not q or not ref:
                continue
            for D in sorted(q):
                diffs = []
                for seed in (0, 1):
                    if seed in q[D] and seed in ref.get(D, {}):
                        diffs.append(f"{q[D][seed]['loss'] - ref[D][seed]['loss']:+.4f}")
                    else:
                        diffs.append("-")
                pred = float(law.quantization_penalty(n_params, D, fmt, int(block) if block.isdigit() else block))
                print(f"| {label(fmt, block, wd)} | {fmt_d(D)} | {diffs[0]} | {diffs[1]} | {pred:+.4f} |")
    print()
    # (not part of the protocol) how fast the penalty grows: the slope of log penalty on log D, seed 0;
    # the Capybara law ties it to the exponent b of its data term
    print("Growth of the penalty (slope of log penalty against log D, seed 0, all D; Capybara: = b):\n")
    for wd in (0.1, 0.0):
        for fmt, block in QUANT_ARMS:
            q, ref = tab.get((fmt, block, wd)), tab.get(("bf16", "1", wd))
            if not q or not ref:
                continue
            pts = [(D, q[D][0]["loss"] - ref[D][0]["loss"]) for D in sorted(q) if 0 in q[D] and 0 in ref.get(D, {})]
            pts = [(D, p) for D, p in pts if p > 0]
            if len(pts) >= 3:
                slope = np.polyfit(np.log([d for d, _ in pts]), np.log([p for _, p in pts]), 1)[0]
                print(f"- {label(fmt, block, wd)}: {slope:.2f} over {fmt_d(pts[0][0])}..{fmt_d(pts[-1][0])}")
    print()


# ------------------------------------------------------------------ 3: the decision rule
def seed_spread(tab: dict, fmt: str, block: str, wd: float = 0.1) -> tuple[float, list]:
    """The largest |loss s0 - loss s1| of an arm over the D with both seeds (at weight decay 0.1)."""
    arm = tab.get((fmt, block, wd), {})
    pairs = [(D, abs(s[0]["loss"] - s[1]["loss"])) for D, s in sorted(arm.items()) if 0 in s and 1 in s]
    return (max(d for _, d in pairs) if pairs else float("nan")), pairs


def classify(dl: float, thr: float) -> str:
    if dl > thr:
        return "rise"
    if abs(dl) < FLAT:
        return "flat"
    if dl < -FLAT:
        return "fall"
    return "small"


def decision(tab: dict) -> list[tuple[str, str]]:
    print("## 3. The decision rule (protocol: docs/dcrit_experiment.md), seed 0\n")
    print("Seed spread = the largest |loss(seed 0) - loss(seed 1)| over the D with both seeds;")
    print("thr = max(0.02, 2 x spread). A doubling is a rise if dL > thr, flat if |dL| < 0.02,")
    print("a fall if dL < -0.02, small otherwise. Observed: two consecutive rises while bf16 falls")
    print("on both. Plateau: the last two doublings flat. Still falling: the last doubling a fall.\n")
    for key in (("bf16", "1"),) + QUANT_ARMS:
        spread, pairs = seed_spread(tab, *key)
        shown = ", ".join(f"{fmt_d(D)}: {d:.4f}" for D, d in pairs) or "none"
        print(f"seed spread {label(*key, 0.1)}: {spread:.4f} ({shown})")
    print()
    print("| arm | doubling | dL quantized | class | dL bf16 | bf16 falls |")
    print("|---|---|---|---|---|---|")
    verdicts, lines = [], []
    for wd in (0.1, 0.0):
        for fmt, block in QUANT_ARMS:
            q, ref = tab.get((fmt, block, wd)), tab.get(("bf16", "1", wd))
            if not q or not ref:
                continue
            spread, _ = seed_spread(tab, fmt, block, 0.1)
            thr = max(FLAT, 2 * spread) if math.isfinite(spread) else FLAT
            Ds = [D for D in sorted(q) if 0 in q[D] and 0 in ref.get(D, {})]
            steps = []
            for d1, d2 in zip(Ds, Ds[1:]):
                if d2 != 2 * d1:
                    continue
                dq = q[d2][0]["loss"] - q[d1][0]["loss"]
                db = ref[d2][0]["loss"] - ref[d1][0]["loss"]
                steps.append((d1, d2, dq, classify(dq, thr), db))
                print(
                    f"| {label(fmt, block, wd)} | {fmt_d(d1)} -> {fmt_d(d2)} | {dq:+.4f} | {classify(dq, thr)} "
                    f"| {db:+.4f} | {'yes' if db < 0 else 'no'} |"
                )
            observed = any(
                a[3] == "rise" and b[3] == "rise" and a[4] < 0 and b[4] < 0 and a[1] == b[0]
                for a, b in zip(steps, steps[1:])
            )
            if len(steps) < 2:
                verdict = "not enough doublings yet"
            elif observed:
                verdict = "observed"
            elif steps[-1][3] == "flat" and steps[-2][3] == "flat":
                verdict = "plateau"
            elif steps[-1][3] == "fall":
                verdict = "still falling"
            else:
                verdict = "inconclusive"
            top = fmt_d(steps[-1][1]) if steps else "-"
            lines.append(f"{label(fmt, block, wd)}: thr {thr:.3f} nats, D up to {top}: {verdict.upper()}")
            verdicts.append((label(fmt, block, wd), verdict))
    print()
    for line in lines:
        print("VERDICT " + line)
    print()
    return verdicts


# ------------------------------------------------------------------ 4: the fits
def capybara_fit(rows: list[dict], held: np.ndarray, fixed: dict, starts: int = 32):
    fit_rows = [dict(N=r["N"], D=r["D"], E=r["E"], M=r["M"], B=r["B"], loss=r["loss"]) for r in rows]
    return fit(fit_rows, fixed=fixed, holdout=held if held.any() else None, starts=starts, seed=0)


def _nomin_predict(theta: np.ndarray, D: np.ndarray, arm: np.ndarray, n_arms: int) -> np.ndarray:
    """L = E0 + A / D^alpha + P_q * (1 - exp(-(D / D_q)^gamma)); arm -1 = unquantized."""
    e0, log_a, alpha, gamma = theta[:4]
    out = e0 + np.exp(log_a - alpha * np.log(D))
    for q in range(n_arms):
        p, log_dq = theta[4 + 2 * q], theta[5 + 2 * q]
        m = arm == q
        out[m] += p * (1.0 - np.exp(-np.exp(gamma * (np.log(D[m]) - log_dq))))
    return out


def nomin_fit(rows: list[dict], held: np.ndarray, arms: list[tuple[str, str]], starts: int = 64, seed: int = 0):
    """The law without a minimum, fitted like the package fits Capybara: Huber (delta 1e-3) on
    log loss, multi-start trust-region least squares with bounds; the lowest cost wins."""
    from scipy.optimize import least_squares

    D = np.array([r["D"] for r in rows], dtype=float)
    loss = np.array([r["loss"] for r in rows])
    arm = np.array([arms.index((r["fmt"], r["B"])) if (r["fmt"], r["B"]) in arms else -1 for r in rows])
    tr = ~held
    lo = [0.0, -10.0, 0.01, 0.1] + [0.0, math.log(1e3)] * len(arms)
    hi = [float(loss[tr].min()) * (1 - 1e-9), 30.0, 2.0, 5.0] + [5.0, math.log(1e10)] * len(arms)
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(starts):
        x0 = np.array([rng.uniform(a, b) for a, b in zip(lo, hi)])
        x0[0] = rng.uniform(0.3, 0.95) * hi[0]
        try:
            res = least_squares(
                lambda x: np.log(_nomin_predict(x, D[tr], arm[tr], len(arms))) - np.log(loss[tr]),
                x0,
                bounds=(lo, hi),
                loss="huber",
                f_scale=1e-3,
                max_nfev=4000,
            )
        except ValueError:
            continue
        if best is None or res.cost < best.cost:
            best = res
    pred = _nomin_predict(best.x, D, arm, len(arms))
    rmse = float(np.sqrt(np.mean((pred[tr] - loss[tr]) ** 2)))
    held_rmse = float(np.sqrt(np.mean((pred[held] - loss[held]) ** 2))) if held.any() else None
    return best.x, pred, rmse, held_rmse


def fits(rows: list[dict], wd: float, law0: CapybaraLaw, n_params: int, boot: int, only=None) -> dict:
    sub = [r for r in rows if r["wd"] == wd and (only is None or r["fmt"] == "bf16" or (r["fmt"], r["B"]) in only)]
    arms = [a for a in QUANT_ARMS if any((r["fmt"], r["B"]) == a for r in sub)]
    Dmax = max(r["D"] for r in sub)
    held = np.array([r["D"] == Dmax for r in sub])
    fixed = {"n": 1e-9, "a": law0.a, "dl": law0.dl, "nu": law0.nu}
    tag = f"weight decay {wd}" + (
        "" if only is None else ", bf16 and " + ", ".join(label(*a, 0.1) for a in only) + " only"
    )
    print(f"### {tag}: {len(sub)} runs, held out: the {int(held.sum())} runs at D = {fmt_d(Dmax)}\n")
    print(f"Capybara: fixed {', '.join(f'{k}={v:.4g}' for k, v in fixed.items())}; free d, b, eps, g.")
    print("Without a minimum: L = E0 + A / D^alpha + P_q (1 - exp(-(D / D_q)^gamma)), per arm P_q, D_q.\n")
    out = {"rows": sub, "arms": arms}
    print("| law | fitted on | fit RMSE | held-out RMSE (largest D) | params |")
    print("|---|---|---|---|---|")
    cap_h = capybara_fit(sub, held, fixed)
    nm_h = nomin_fit(sub, held, arms)
    k_nm = 4 + 2 * len(arms)
    print(
        f"| Capybara | D < {fmt_d(Dmax)} ({int((~held).sum())} runs) | {cap_h.rmse:.4f} | {cap_h.heldout_rmse:.4f} | 4 |"
    )
    print(f"| no minimum | D < {fmt_d(Dmax)} ({int((~held).sum())} runs) | {nm_h[2]:.4f} | {nm_h[3]:.4f} | {k_nm} |")
    cap_a = capybara_fit(sub, np.zeros(len(sub), bool), fixed)
    nm_a = nomin_fit(sub, np.zeros(len(sub), bool), arms)
    print(f"| Capybara | all ({len(sub)} runs) | {cap_a.rmse:.4f} | - | 4 |")
    print(f"| no minimum | all ({len(sub)} runs) | {nm_a[2]:.4f} | - | {k_nm} |")
    print()
    print("Held-out predictions (largest D, seed 0 and 1 where present):\n")
    print("| arm | seed | observed | Capybara | no minimum |")
    print("|---|---|---|---|---|")
    for i, r in enumerate(sub):
        if held[i]:
            print(
                f"| {label(r['fmt'], r['B'], wd)} | {r['seed']} | {r['loss']:.4f} | {cap_h.predicted[i]:.4f} "
                f"| {nm_h[1][i]:.4f} |"
            )
    print()
    law = cap_a.law
    c = law
    print(
        f"Capybara on all runs: d={c.d:.4g}, b={c.b:.4f}, eps={c.eps:.4f}, g={c.g:.4g} "
        f"(at bounds: {', '.join(cap_a.at_bounds) or 'none'})"
    )
    x = nm_a[0]
    txt = ", ".join(
        f"{label(f, b, wd)}: P={x[4 + 2 * i]:.4f}, D_q={math.exp(x[5 + 2 * i]):.3g}" for i, (f, b) in enumerate(arms)
    )
    print(f"No minimum on all runs: E0={x[0]:.4f}, A={math.exp(x[1]):.4g}, alpha={x[2]:.4f}, gamma={x[3]:.3f}; {txt}")
    print()
    # D_crit: the held-out fit, the all-runs fit and a residual bootstrap of the latter
    rng = np.random.default_rng(1)
    log_pred = np.log(cap_a.predicted)
    log_res = np.log(cap_a.observed) - log_pred
    dcrits = {a: [] for a in arms}
    for _ in range(boot):
        fake = [dict(r, loss=float(np.exp(lp + rng.choice(log_res)))) for r, lp in zip(sub, log_pred)]
        try:
            f = capybara_fit(fake, np.zeros(len(sub), bool), fixed, starts=4)
        except (ValueError, RuntimeError):
            continue
        for a in arms:
            dcrits[a].append(float(f.law.critical_data_size(n_params, a[0], _block(a[1]))))
    print(
        "| arm | D_crit shipped law | D_crit fit D < max | D_crit fit all | 90% interval (bootstrap) | L_min fit all |"
    )
    print("|---|---|---|---|---|---|")
    out["dcrit"] = {}
    for a in arms:
        blk = _block(a[1])
        shipped = float(law0.critical_data_size(n_params, a[0], blk))
        dh = float(cap_h.law.critical_data_size(n_params, a[0], blk))
        da = float(law.critical_data_size(n_params, a[0], blk))
        lo, hi = np.percentile(dcrits[a], [5, 95]) if dcrits[a] else (float("nan"),) * 2
        lmin = float(law.min_loss(n_params, a[0], blk))
        out["dcrit"][a] = (da, lo, hi)
        print(
            f"| {label(*a, wd)} | {shipped:.3g} | {dh:.3g} | {da:.3g} | {lo:.3g} - {hi:.3g} ({len(dcrits[a])} refits) "
            f"| {lmin:.4f} |"
        )
    print()
    out.update(cap=cap_a, cap_h=cap_h, nomin=nm_a, nomin_h=nm_h, held=held)
    return out


def _block(b: str):
    return int(b) if b.isdigit() else b


# ------------------------------------------------------------------ plots
def plots(tab: dict, res: dict, n_params: int, law0: CapybaraLaw, out_dir: Path) -> None:
    import warnings

    import matplotlib

    warnings.filterwarnings("ignore", message=".*extrapolation")  # the fitted curves are drawn past the runs
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    colours = {("bf16", "1"): "k", ("e1m0", "32"): "tab:blue", ("e1m0", "tensor"): "tab:red"}
    wds = [wd for wd in (0.1, 0.0) if wd in res]
    fig, axes = plt.subplots(1, len(wds), figsize=(6.5 * len(wds), 4.8), squeeze=False)
    for ax, wd in zip(axes[0], wds):
        r = res[wd]
        Dgrid = np.geomspace(5e5, 6.7e7, 200)
        for key, col in colours.items():
            arm = tab.get((key[0], key[1], wd))
            if not arm:
                continue
            Ds = sorted(D for D in arm if 0 in arm[D])
            ax.plot(Ds, [arm[D][0]["loss"] for D in Ds], "o-", color=col, label=f"{label(*key, wd)} (seed 0)")
            s1 = sorted(D for D in arm if 1 in arm[D])
            if s1:
                ax.plot(s1, [arm[D][1]["loss"] for D in s1], "s", mfc="none", color=col, ms=8, label="seed 1")
            blk = _block(key[1])
            fmt = None if key[0] == "bf16" else key[0]
            cap = r["cap"].law.loss(n_params, Dgrid, fmt, blk if fmt else 32)
            ax.plot(Dgrid, cap, "--", color=col, lw=1, alpha=0.8)
            idx = r["arms"].index(key) if key in r["arms"] else -1
            nm = _nomin_predict(r["nomin"][0], Dgrid, np.full(Dgrid.shape, idx), len(r["arms"]))
            ax.plot(Dgrid, nm, ":", color=col, lw=1.5, alpha=0.8)
            if fmt and key in r["dcrit"]:
                da = r["dcrit"][key][0]
                if 5e5 < da < 6.7e7:
                    ax.axvline(da, color=col, lw=0.8, alpha=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("D (training tokens = bytes)")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title(
            f"w32 (N={n_params:,}), weight decay {wd}\n-- Capybara fit (vertical: its D_crit), : no-minimum fit"
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "loss_vs_tokens.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    Dgrid = np.geomspace(5e5, 6.7e7, 200)
    for wd, style in ((0.1, "o-"), (0.0, "^-")):
        for fmt, block in QUANT_ARMS:
            q, ref = tab.get((fmt, block, wd)), tab.get(("bf16", "1", wd))
            if not q or not ref:
                continue
            col = colours[(fmt, block)]
            for seed, mk in ((0, style), (1, "s")):
                Ds = sorted(D for D in q if seed in q[D] and seed in ref.get(D, {}))
                if Ds:
                    ax.plot(
                        Ds,
                        [q[D][seed]["loss"] - ref[D][seed]["loss"] for D in Ds],
                        mk,
                        color=col,
                        mfc="none" if seed else col,
                        alpha=1.0 if wd else 0.6,
                        label=f"{label(fmt, block, wd)} seed {seed}",
                    )
            if wd == 0.1:
                ax.plot(Dgrid, law0.quantization_penalty(n_params, Dgrid, fmt, _block(block)), "--", color=col, lw=1)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_xlabel("D (training tokens)")
    ax.set_ylabel("quantized - bf16 loss (nats)")
    ax.set_title("paired quantization penalty; -- shipped calibration's penalty term")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "penalty_vs_tokens.png", dpi=120)
    plt.close(fig)


def main() -> None:
    global SOURCES, QUANT_ARMS, CORPUS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", type=int, choices=sorted(PARTS), default=1, help="which part of the experiment")
    ap.add_argument("--boot", type=int, default=100, help="bootstrap refits for the D_crit interval")
    ap.add_argument(
        "--plots",
        default=None,
        help="folder for the plots, relative to the repository root ('' for none; default: the part's)",
    )
    ap.add_argument("--runs", default=str(HERE), help="folder of the part's CSVs")
    args = ap.parse_args()
    part = PARTS[args.part]
    SOURCES, QUANT_ARMS, CORPUS = part["sources"], part["arms"], part["corpus"]
    if args.plots is None:
        args.plots = part["plots"]
    rows = load(Path(args.runs))
    if not rows:
        raise SystemExit("no ok rows yet in examples/dcrit/*.csv")
    tab = table(rows)
    n_params = rows[0]["N"]
    law0 = shipped_law()
    n_train = train_bytes()
    print(f"# D_crit experiment, part {args.part}: analysis\n")
    print(f"Command: {part['command']}\n")
    print_runs(tab, n_train)
    print_penalties(tab, law0, n_params)
    decision(tab)
    print("## 4. Fits: Capybara (has a minimum) against a law without a minimum\n")
    res = {}
    for wd in (0.1, 0.0):
        sub = [r for r in rows if r["wd"] == wd]
        if len({r["D"] for r in sub}) >= 4 and any(r["fmt"] == "bf16" for r in sub):
            res[wd] = fits(rows, wd, law0, n_params, args.boot)
    if 0.1 in res and args.part == 1:
        print("## 4b. Not in the protocol (added after seeing the runs): the same fits without the tensor-wise arm\n")
        spread, _ = seed_spread(tab, "e1m0", "tensor")
        print(f"The tensor-wise arm's two seeds differ by up to {spread:.2f} nats; these fits ask what the")
        print("bf16 control and E1M0 B=32 alone say.\n")
        fits(rows, 0.1, law0, n_params, args.boot, only=(("e1m0", "32"),))
    if args.plots and res:
        out = Path(args.plots)
        plots(tab, res, n_params, law0, out if out.is_absolute() else ROOT / out)
        print(f"Plots: {args.plots}/loss_vs_tokens.png, penalty_vs_tokens.png")


if __name__ == "__main__":
    main()
