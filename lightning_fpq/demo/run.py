"""The demo: prediction against observation for a tiny GPT on the Python standard library's source.

``lightning-fpq demo`` runs :func:`run_demo` with the settings of :class:`DemoConfig` (YAML
and ``key=value`` overrides). By default it trains, with the model, data and settings of the
shipped D_crit experiment (docs/dcrit_experiment.md), three runs of 4.2M tokens each: a fixed
low-precision run (E1M0, 32-element blocks: the one format whose D_crit lies within a few
minutes of CPU), a progressive run that raises the precision where the law says it pays, and a
BF16 baseline. It then draws the observed losses and quantization gaps against the law's
predictions with their intervals (:mod:`~lightning_fpq.demo.plot`), beside the experiment's
longer runs, and prints in numbers how far the law was off (:mod:`~lightning_fpq.demo.summary`).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import _config
from ..formats import FPFormat
from .data import CORPORA


@dataclass
class DemoConfig:
    """Everything the demo does; every field can be set in YAML or as ``key=value``."""

    model: str = "micro"  # a GPT_CONFIGS name; micro = the experiment's 2-layer, 32-wide GPT (N = 33,664)
    steps: int = 4096  # optimizer steps of each run: 4096 x 16 x 64 = 4.19M tokens
    batch_size: int = 16
    block_size: int = 64  # tokens (bytes) per sample
    lr: float = 1e-3
    warmup_steps: int = 16
    min_lr_ratio: float = 0.1  # the cosine ends at lr x this, at the last step
    weight_decay: float = 0.1
    recipe: str = "paper"  # the recipe each format is put into (P2, P4, P6: what the law was fitted on)
    block: Any = 32  # block size of the quantized operands (int, "channel" or "tensor")
    fixed: Optional[str] = "e1m0"  # the fixed low-precision run's format; null: no such run
    schedule: list = field(default_factory=lambda: ["e1m0", "e2m1", "e4m3"])  # the progressive run's stages
    switch_at: Any = "auto"  # "auto" (from the law) or switch points in `unit`
    unit: str = "budget"  # "budget" fractions, "tokens", or "dcrit" fractions
    law: Optional[str] = "demo-calibration"  # the shipped calibration; "paper"; or a law YAML
    baseline: bool = True  # train the BF16 run
    val_every: int = 512  # steps between validations (and one at the end)
    val_samples: int = 512  # validation windows
    gap_every: int = 256  # steps between quantization-gap measurements
    corpus: str = "stdlib"  # "stdlib": every non-test module (~12 MB); "demo": a fixed list (~3 MB)
    max_bytes: Optional[int] = None  # None: all of the corpus
    seed: int = 0
    accelerator: str = "auto"
    workers: int = 0  # runs trained at once, in separate processes of one torch thread each; 0: one per CPU core
    threads: int = 0  # torch CPU threads of a run trained in this process (workers=1); 0: torch's default
    out: str = "runs/demo"
    progress_bar: bool = True
    #: the experiment's sweep CSVs, drawn as such (missing files are skipped)
    reference: list = field(default_factory=lambda: ["examples/dcrit/runs.csv", "examples/dcrit/runs_seed1.csv"])

    def validate(self) -> DemoConfig:
        """Check every value; raise ``ValueError`` naming the key, the value and what is valid."""
        for name, low in (
            ("steps", 1),
            ("batch_size", 1),
            ("block_size", 1),
            ("val_every", 1),
            ("val_samples", 1),
            ("gap_every", 1),
            ("warmup_steps", 0),
            ("seed", 0),
            ("threads", 0),
            ("workers", 0),
        ):
            _config.integer(getattr(self, name), what=f"demo {name}", low=low)
        _config.integer(self.max_bytes, what="demo max_bytes", low=2, optional=True)
        _config.number(self.lr, what="demo lr", low=0.0, low_open=True)
        _config.number(self.min_lr_ratio, what="demo min_lr_ratio", low=0.0, high=1.0)
        _config.number(self.weight_decay, what="demo weight_decay", low=0.0)
        _config.choice(self.corpus, CORPORA, what="demo corpus")
        if self.block is not None:  # None: the recipe's own block size
            self.block = _config.block_size_yaml(_config.block_size(self.block, what="demo block"))
        for entry in [*self.schedule, *([self.fixed] if self.fixed is not None else [])]:
            FPFormat.parse(entry)
        if len(self.schedule) > 1:  # the schedule's own checks (switch points per stage), before any training
            from ..lightning.progressive import ProgressivePrecision

            ProgressivePrecision(
                list(self.schedule), self.switch_at, unit=self.unit, law=self.law, block_size=self.block
            )
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] = ()) -> DemoConfig:
    """Defaults, then the YAML file, then ``key=value`` overrides; unknown keys are errors."""
    return _config.load_structured(DemoConfig, path, overrides, what="demo config").validate()


@dataclass
class RunResult:
    """What one run of the demo observed."""

    name: str
    schedule: list[str]
    metrics_csv: Path
    wall_s: float
    val: list[tuple[int, float]]  # (tokens, validation loss)
    gap: list[tuple[int, float]]  # (tokens, quantization gap) of the quantized stages
    history: list[dict[str, Any]]  # the progressive run's switches
    stages: list[Any]  # the QuantRecipe of each stage
    tokens: int
    n_params: int
    law: Any  # the CapybaraLaw the run's callbacks used
    backends: list[str] = field(default_factory=list)  # per quantized stage: "backend (n layers)"

    @property
    def final_val_loss(self) -> float:
        return self.val[-1][1] if self.val else float("nan")


def switch_text(entry: dict[str, Any]) -> str:
    """A switch of a progressive run's history as "e1m0->e2m1" (its recipes' formats)."""
    return "->".join(text.split()[1] if len(text.split()) > 1 else text for text in (entry["from"], entry["to"]))


def _demo_progress_bar(name: str):
    """Lightning's bar, fitted to 80 columns and named after the run (not "Epoch 0/0")."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    class DemoProgressBar(TQDMProgressBar):
        BAR_FORMAT = "{desc}{percentage:3.0f}% {elapsed}<{remaining}{postfix}"

        @property
        def train_description(self) -> str:
            return name

        def init_train_tqdm(self):
            bar = super().init_train_tqdm()
            bar.dynamic_ncols, bar.ncols = False, 80
            keep = bar.set_description
            bar.set_description = lambda desc=None, refresh=True: keep(name, refresh)  # not "Epoch 0"
            return bar

        def get_metrics(self, trainer, pl_module):
            items = super().get_metrics(trainer, pl_module)
            items.pop("v_num", None)
            short = {"train/loss": "loss", "val/loss": "val"}
            return {short.get(k, k): v for k, v in items.items()}

    return DemoProgressBar(refresh_rate=64)


def _progress_lines(name: str):
    """One short line per validation (for runs in parallel processes, whose bars would collide)."""
    from lightning.pytorch import Callback

    class ProgressLines(Callback):
        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            val = trainer.callback_metrics.get("val/loss")
            fraction = trainer.callback_metrics.get("fpq/d_crit_fraction")
            print(
                f"  {name}: step {trainer.global_step}/{trainer.max_steps}"
                + (f", val {float(val):.3f}" if val is not None else "")
                + (f", D/Dcrit {float(fraction):.0%}" if fraction is not None and float(fraction) > 0 else ""),
                flush=True,
            )

    return ProgressLines()


def _trainer_for(cfg: DemoConfig, name: str, schedule: list[str], law: Any, *, lines: bool = False):
    """One run's model, data, plugin, callbacks and trainer."""
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import CSVLogger

    from ..lightning.gap import QuantizationGap
    from ..lightning.monitor import CriticalDataMonitor
    from ..lightning.precision import FPQuantPrecision
    from ..lightning.progressive import ProgressivePrecision
    from ..recipe import QuantRecipe
    from .data import ByteCorpusDataModule
    from .model import GPTConfig, GPTLightning, lm_loss

    seed_everything(cfg.seed, verbose=False)
    data = ByteCorpusDataModule(
        block_size=cfg.block_size,
        batch_size=cfg.batch_size,
        max_bytes=cfg.max_bytes,
        seed=cfg.seed,
        samples_per_epoch=cfg.steps * cfg.batch_size,
        val_samples=cfg.val_samples,
        corpus=cfg.corpus,
    )
    seed_everything(cfg.seed, verbose=False)
    # the model sees windows of cfg.block_size bytes: its position table must be that long
    # (a mapping, not the frozen config: the CSV logger writes the hyperparameters as YAML)
    config = dataclasses.asdict(dataclasses.replace(GPTConfig.from_name(cfg.model), block_size=cfg.block_size))
    model = GPTLightning(
        config,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=min(cfg.warmup_steps, cfg.steps - 1),
        max_steps=cfg.steps,
        min_lr_ratio=cfg.min_lr_ratio,
    )
    # with_format, like every later stage: "bf16" means unquantized, not "quantize to the bf16 grid"
    initial = QuantRecipe.from_name(cfg.recipe, block_size=cfg.block).with_format(schedule[0], block_size=cfg.block)
    callbacks: list = [CriticalDataMonitor(law=law)]
    if len(schedule) > 1:
        callbacks.append(ProgressivePrecision(schedule, cfg.switch_at, unit=cfg.unit, law=law, block_size=cfg.block))
    if any(FPFormat.parse(f).bits < 16 for f in schedule):
        callbacks.append(
            QuantizationGap(lambda module, batch: lm_loss(module(batch[0]), batch[1]), every_n_steps=cfg.gap_every)
        )
    if cfg.progress_bar:
        callbacks.append(_demo_progress_bar(name))
    elif lines:
        callbacks.append(_progress_lines(name))
    trainer = Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        max_steps=cfg.steps,
        max_epochs=1,  # one epoch holds every step (samples_per_epoch)
        plugins=[FPQuantPrecision(recipe=initial)],
        callbacks=callbacks,
        logger=CSVLogger(cfg.out, name=name, version=""),
        val_check_interval=min(cfg.val_every, cfg.steps),
        check_val_every_n_epoch=None,
        log_every_n_steps=max(1, min(16, cfg.steps // 8)),
        enable_checkpointing=False,
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=1,  # QuantizationGap keeps the first validation batch: before step 1
    )
    return trainer, model, data, callbacks


def run_one(cfg: DemoConfig, name: str, schedule: list[str], law: Any, *, lines: bool = False) -> RunResult:
    from ..lightning.gap import QuantizationGap
    from ..lightning.monitor import CriticalDataMonitor
    from ..lightning.progressive import ProgressivePrecision

    trainer, model, data, callbacks = _trainer_for(cfg, name, schedule, law, lines=lines)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    if cfg.steps % min(cfg.val_every, cfg.steps):  # the last validation was before the end: one more
        trainer.validate(model, datamodule=data, verbose=False)
    wall = time.perf_counter() - start
    monitor = next(c for c in callbacks if isinstance(c, CriticalDataMonitor))
    progressive = next((c for c in callbacks if isinstance(c, ProgressivePrecision)), None)
    gap = next((c for c in callbacks if isinstance(c, QuantizationGap)), None)
    csv_path = Path(trainer.logger.log_dir) / "metrics.csv"
    val = [(int(r["step"]) * cfg.tokens_per_step, r["val/loss"]) for r in read_metrics(csv_path) if "val/loss" in r]
    return RunResult(
        name=name,
        schedule=list(schedule),
        metrics_csv=csv_path,
        wall_s=wall,
        val=sorted(dict(val).items()),  # the extra validation repeats the last step: keep the last value
        gap=[(h["tokens"], h["gap"]) for h in (gap.history if gap else []) if "unquantized" not in h["recipe"]],
        history=list(progressive.history) if progressive else [],
        stages=list(progressive.stages) if progressive else [trainer.precision_plugin.recipe],
        tokens=monitor.tokens_seen,
        n_params=monitor.n_params,
        law=monitor.law,
        backends=[
            ", ".join(f"{b} ({n} layers)" for b, n in h["backends"].items())
            for h in trainer.precision_plugin.backend_history
            if "unquantized" not in h["backends"]
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


def planned_runs(cfg: DemoConfig) -> list[tuple[str, list[str]]]:
    """(name, schedule) of each run the config asks for, lowest precision first."""
    runs = []
    if cfg.fixed is not None:
        fixed = FPFormat.parse(cfg.fixed).name
        runs.append((f"fixed-{fixed}", [fixed]))
    schedule = [FPFormat.parse(f).name for f in cfg.schedule]
    if len(schedule) > 1:
        runs.append(("progressive", schedule))
    if cfg.baseline:
        runs.append(("bf16", ["bf16"]))
    if not runs:
        raise ValueError(
            "the demo has nothing to train: set fixed, a schedule of two or more formats, or baseline=true"
        )
    return runs


def run_demo(cfg: DemoConfig) -> list[RunResult]:
    from .plot import plot_demo
    from .reference import load_reference
    from .summary import summary_text

    os.makedirs(cfg.out, exist_ok=True)
    runs = planned_runs(cfg)
    workers = min(len(runs), cfg.workers or os.cpu_count() or 1)
    if workers > 1:
        results = _run_in_processes(cfg, runs, workers)
    else:
        if cfg.threads > 0:
            import torch

            torch.set_num_threads(cfg.threads)
        results = [run_one(cfg, name, schedule, cfg.law) for name, schedule in runs]
    reference = load_reference(list(cfg.reference))
    plot_path = plot_demo(cfg, results, reference, Path(cfg.out) / "demo.png")
    text = summary_text(cfg, results, reference, plot_path)
    (Path(cfg.out) / "summary.txt").write_text(text + "\n")
    print(text)
    return results


def _run_in_worker(cfg: DemoConfig, name: str, schedule: list[str]) -> RunResult:
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import: set ours after)
    import torch

    torch.set_num_threads(1)  # one core per run: the runs share the machine
    # several processes write to one terminal: only warnings (the summary repeats the rest)
    for logger in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*treespec.*")  # Lightning's own deprecation, not the user's
    return run_one(dataclasses.replace(cfg, progress_bar=False), name, schedule, cfg.law, lines=cfg.progress_bar)


def _run_in_processes(cfg: DemoConfig, runs: list[tuple[str, list[str]]], workers: int) -> list[RunResult]:
    """Train the runs in ``workers`` fresh processes (their bars would overwrite each other:
    a line per validation and per finished run instead)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    print(f"training {len(runs)} runs ({', '.join(n for n, _ in runs)}) in {workers} processes, {cfg.steps} steps each")
    start = time.perf_counter()
    done: dict[str, RunResult] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_in_worker, cfg, name, schedule): name for name, schedule in runs}
        for future in as_completed(futures):
            result = future.result()
            done[result.name] = result
            print(
                f"  {result.name}: {result.tokens:,} tokens, final validation loss {result.final_val_loss:.4f} "
                f"({result.wall_s:.0f} s; {time.perf_counter() - start:.0f} s since the start)",
                flush=True,
            )
    return [done[name] for name, _ in runs]
