"""The demo: a small GPT trained on the Python standard library's source, FP4 -> FP8 -> BF16.

``lightning-fpq demo`` runs :func:`run_demo` with the settings of :class:`DemoConfig`
(from ``examples/configs/demo.yaml``-style YAML and command-line overrides), then writes a
plot of loss against tokens with the precision stages shaded and the law's D_crit marked,
CSV logs, and a summary table.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import _config
from ..formats import FPFormat


@dataclass
class DemoConfig:
    """Everything the demo does; every field can be set in YAML or as ``key=value``."""

    model: str = "demo"  # a GPT_CONFIGS name: tiny, demo, small
    steps: int = 400  # optimizer steps of each run (about 2 minutes on an idle 2-core CPU)
    batch_size: int = 16
    block_size: int = 128  # tokens per sample (bytes)
    lr: float = 3e-3
    warmup_steps: int = 50
    recipe: str = "paper"  # the recipe each stage's format is put into
    block: Any = 32  # block size of the quantized operands (int, "channel" or "tensor")
    schedule: list = field(default_factory=lambda: ["e2m1", "e4m3", "bf16"])
    switch_at: Any = field(default_factory=lambda: [0.4, 0.75])  # or "auto"
    unit: str = "budget"  # "budget" fractions, "tokens", or "dcrit" fractions
    law: Optional[str] = "demo-calibration"  # fitted to this project's CPU sweep; "paper", or a law YAML
    baseline: bool = False  # also train a BF16-only run for comparison
    val_every: int = 100  # steps between validations
    val_samples: int = 64  # validation windows
    max_bytes: int = 2_000_000  # corpus size
    seed: int = 0
    accelerator: str = "auto"
    threads: int = 0  # torch CPU threads; 0 keeps torch's default (use 1 on a busy machine)
    out: str = "runs/demo"
    progress_bar: bool = True

    def validate(self) -> DemoConfig:
        """Check every value; raise ``ValueError`` naming the key, the value and what is valid."""
        for name, low in (
            ("steps", 1),
            ("batch_size", 1),
            ("block_size", 1),
            ("val_every", 1),
            ("val_samples", 1),
            ("warmup_steps", 0),
            ("max_bytes", 2),
            ("seed", 0),
            ("threads", 0),
        ):
            _config.integer(getattr(self, name), what=f"demo {name}", low=low)
        _config.number(self.lr, what="demo lr", low=0.0, low_open=True)
        if self.block is not None:  # None: the recipe's own block size
            self.block = _config.block_size_yaml(_config.block_size(self.block, what="demo block"))
        for entry in self.schedule:
            FPFormat.parse(entry)
        return self


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] = ()) -> DemoConfig:
    """Defaults, then the YAML file, then ``key=value`` overrides; unknown keys are errors."""
    return _config.load_structured(DemoConfig, path, overrides, what="demo config").validate()


@dataclass
class RunResult:
    name: str
    metrics_csv: Path
    wall_s: float
    final_train_loss: float
    final_val_loss: float
    history: list[dict[str, Any]]
    stage_d_crit: list[tuple[str, float]]  # (format, D_crit tokens) per stage
    tokens: int
    n_params: int
    law: str
    backends: list[str] = field(default_factory=list)  # per stage: "backend (n layers)"


def _trainer_for(cfg: DemoConfig, name: str, schedule: list[str], law: Any):
    """One run's model, data, plugin, callbacks and trainer."""
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import CSVLogger

    from ..lightning.monitor import CriticalDataMonitor
    from ..lightning.precision import FPQuantPrecision
    from ..lightning.progressive import ProgressivePrecision
    from ..recipe import QuantRecipe
    from .data import ByteCorpusDataModule
    from .model import GPTConfig, GPTLightning

    seed_everything(cfg.seed, verbose=False)
    # the model sees windows of cfg.block_size bytes: its position table must be that long
    # (a mapping, not the frozen config: the CSV logger writes the hyperparameters as YAML)
    config = dataclasses.asdict(dataclasses.replace(GPTConfig.from_name(cfg.model), block_size=cfg.block_size))
    model = GPTLightning(config, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.steps)
    data = ByteCorpusDataModule(
        block_size=cfg.block_size,
        batch_size=cfg.batch_size,
        max_bytes=cfg.max_bytes,
        seed=cfg.seed,
        samples_per_epoch=cfg.steps * cfg.batch_size,
        val_samples=cfg.val_samples,
    )
    # with_format, like every later stage: "bf16" means unquantized, not "quantize to the bf16 grid"
    initial = QuantRecipe.from_name(cfg.recipe, block_size=cfg.block).with_format(schedule[0], block_size=cfg.block)
    plugin = FPQuantPrecision(recipe=initial)
    callbacks: list = [CriticalDataMonitor(law=law, plateau_window=0)]
    if len(schedule) > 1:
        callbacks.append(ProgressivePrecision(schedule, cfg.switch_at, unit=cfg.unit, law=law, block_size=cfg.block))
    trainer = Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        max_steps=cfg.steps,
        max_epochs=1,  # one epoch holds every step (samples_per_epoch); the bar reads "Epoch 0/0", not "0/-2"
        plugins=[plugin],
        callbacks=callbacks,
        logger=CSVLogger(cfg.out, name=name, version=""),
        val_check_interval=min(cfg.val_every, cfg.steps),  # a short run still validates and logs
        check_val_every_n_epoch=None,
        log_every_n_steps=min(5, cfg.steps),
        enable_checkpointing=False,
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return trainer, model, data, callbacks


def run_one(cfg: DemoConfig, name: str, schedule: list[str], law: Any) -> RunResult:
    trainer, model, data, callbacks = _trainer_for(cfg, name, schedule, law)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - start
    monitor = callbacks[0]
    progressive = callbacks[1] if len(callbacks) > 1 else None
    from ..lightning.critical import critical_tokens

    stages = progressive.stages if progressive else [trainer.precision_plugin.recipe]
    stage_d_crit = []
    for recipe in stages:
        d_crit, point = critical_tokens(recipe, monitor.law, monitor.n_params)
        stage_d_crit.append((point.fmt.name if point.fmt else "bf16", d_crit))
    csv_path = Path(trainer.logger.log_dir) / "metrics.csv"
    rows = read_metrics(csv_path)
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    return RunResult(
        name=name,
        metrics_csv=csv_path,
        wall_s=wall,
        final_train_loss=sum(train[-10:]) / max(len(train[-10:]), 1) if train else math.nan,
        final_val_loss=val[-1] if val else math.nan,
        history=list(progressive.history) if progressive else [],
        stage_d_crit=stage_d_crit,
        tokens=monitor.tokens_seen,
        n_params=monitor.n_params,
        law=f"{type(monitor.law).__name__}, {monitor.law.provenance.short_str()}",
        backends=[
            ", ".join(f"{b} ({n} layers)" for b, n in h["backends"].items())
            for h in trainer.precision_plugin.backend_history
        ],
    )


def read_metrics(path: Path) -> list[dict[str, float]]:
    """CSVLogger rows as dicts of the columns that have a value in that row."""
    rows: list[dict[str, float]] = []
    if not path.is_file():  # nothing was logged
        return rows
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle):
            rows.append({k: float(v) for k, v in raw.items() if v not in ("", None)})
    return rows


def run_demo(cfg: DemoConfig) -> list[RunResult]:
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)
    runs = [("progressive", [FPFormat.parse(f).name for f in cfg.schedule])]
    if cfg.baseline:
        runs.append(("baseline-bf16", ["bf16"]))
    results = [run_one(cfg, name, schedule, cfg.law) for name, schedule in runs]
    plot_path = Path(cfg.out) / "demo.png"
    plot_runs(results, plot_path)
    print(summary_text(results, plot_path))
    return results


# ------------------------------------------------------------------------- outputs
def plot_runs(results: list[RunResult], path: Path) -> Path:
    """Loss against tokens per run; stages of the first run shaded; D_crit marked or noted."""
    from ..scaling.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.2), dpi=110)
    colors = ["tab:blue", "tab:gray", "tab:green"]
    max_tokens = 1.0
    for color, result in zip(colors, results):
        rows = read_metrics(result.metrics_csv)
        train = [(r["fpq/tokens_seen"], r["train/loss"]) for r in rows if "train/loss" in r and "fpq/tokens_seen" in r]
        val = [
            (r["fpq/tokens_seen"] if "fpq/tokens_seen" in r else math.nan, r["val/loss"])
            for r in rows
            if "val/loss" in r
        ]
        if train:
            xs, ys = zip(*train)
            ax.plot(xs, ys, color=color, lw=0.6, alpha=0.35)
            ax.plot(xs, _smooth(ys), color=color, lw=1.8, label=f"{result.name}: train (moving average)")
            max_tokens = max(max_tokens, max(xs))
        val = [(x, y) for x, y in val if math.isfinite(x)] or _val_by_step(rows, result)
        if val:
            xs, ys = zip(*val)
            ax.plot(xs, ys, "o--", color=color, ms=4, lw=1, label=f"{result.name}: validation")
    first = results[0]
    edges = [0.0] + [h["tokens"] for h in first.history] + [max_tokens]
    shades = ["#fde0dd", "#fff7bc", "#e5f5e0", "#deebf7"]
    for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
        label = first.stage_d_crit[i][0] if i < len(first.stage_d_crit) else "?"
        ax.axvspan(lo, hi, color=shades[i % len(shades)], alpha=0.8, lw=0)
        ax.text(
            (lo + hi) / 2,
            0.98,
            label,
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize=10,
            weight="bold",
        )
    notes = []
    for fmt, d_crit in first.stage_d_crit:
        if not math.isfinite(d_crit):
            continue
        if d_crit <= max_tokens * 1.05:
            ax.axvline(d_crit, color="crimson", ls=":", lw=1.5)
            ax.text(d_crit, 0.5, f" D_crit({fmt})", color="crimson", transform=ax.get_xaxis_transform(), rotation=90)
        else:
            notes.append(f"D_crit({fmt}) = {d_crit:.2g} tokens = {d_crit / max_tokens:,.0f}x this run")
    if notes:
        ax.text(
            0.01,
            0.03,
            "\n".join(["predicted critical data sizes, beyond this plot:"] + notes),
            transform=ax.transAxes,
            ha="left",
            va="bottom",
            fontsize=8,
            color="crimson",
            bbox=dict(facecolor="white", alpha=0.85, edgecolor="crimson"),
        )
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(
        f"lightning-fpq demo: {' -> '.join(f for f, _ in first.stage_d_crit)}, N = {first.n_params:,} "
        f"non-embedding parameters; law: {first.law}",
        fontsize=9,
    )
    ax.set_xlim(0, max_tokens)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", bbox_to_anchor=(0.995, 0.93), fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _smooth(values, fraction: float = 0.04) -> list[float]:
    """Centred moving average over about ``fraction`` of the points (no lag, unlike an EMA)."""
    half = max(1, int(len(values) * fraction) // 2)
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half) : i + half + 1]
        out.append(sum(window) / len(window))
    return out


def _val_by_step(rows, result: RunResult) -> list[tuple[float, float]]:
    """Validation points placed by step when a row carries no token count."""
    tokens_per_step = result.tokens / max(max((r.get("step", 0) for r in rows), default=1), 1)
    return [(r.get("step", 0) * tokens_per_step, r["val/loss"]) for r in rows if "val/loss" in r]


def summary_text(results: list[RunResult], plot_path: Path) -> str:
    """The table printed at the end of the demo (plain text, readable anywhere)."""
    lines = ["", "lightning-fpq demo summary", "=" * 26]
    header = f"{'run':<16}{'train loss':>11}{'val loss':>10}{'tokens':>12}{'wall':>9}   switches"
    lines += [header, "-" * len(header)]
    for r in results:
        switches = (
            "; ".join(
                f"{h['from'].split()[1]}->{h['to'].split()[1]} @ step {h['step']} ({h['tokens']:,} tok)"
                for h in r.history
            )
            or "-"
        )
        lines.append(
            f"{r.name:<16}{r.final_train_loss:>11.4f}{r.final_val_loss:>10.4f}{r.tokens:>12,}{r.wall_s:>8.1f}s   {switches}"
        )
    first = results[0]
    lines += ["", f"Critical data size per stage (N = {first.n_params:,} non-embedding parameters; law: {first.law}):"]
    far = False
    for i, (fmt, d_crit) in enumerate(first.stage_d_crit):
        ran_on = (
            f"; ran on {first.backends[i]}"
            if i < len(first.backends) and "unquantized" not in first.backends[i]
            else ""
        )
        if not math.isfinite(d_crit):
            lines.append(f"  {fmt:<8} unquantized: no critical data size{ran_on}")
            continue
        fraction = first.tokens / d_crit
        far |= fraction < 0.01
        lines.append(f"  {fmt:<8} D_crit = {d_crit:.3g} tokens; this run reached {fraction:.2%} of it{ran_on}")
    if far and "paper" in first.law:
        lines.append(
            "  D_crit lies far beyond this run's budget: with these constants the precision does not yet hurt at "
            "this scale. The paper's constants belong to LLaMA on Dolma; calibrate a law for your own setup "
            "(lightning-fpq sweep / fit) to get D_crit figures that mean something here."
        )
    elif far:
        lines.append(
            "  D_crit lies beyond this run's budget for every stage: by this law the precision does not yet hurt "
            "at this token count (more steps, or a smaller model, bring D_crit within reach)."
        )
    lines += ["", f"plot: {plot_path}", f"logs: {', '.join(str(r.metrics_csv) for r in results)}"]
    return "\n".join(lines)
