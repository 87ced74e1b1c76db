"""The sweep runner: a grid of small training runs, one CSV row per run, for fitting a law.

The paper's constants (SCIENCE.md section 4) belong to LLaMA on Dolma with a 2M-token batch;
they do not transfer to another model family, tokenizer, data or scale. A law is calibrated
the way the paper made it (SCIENCE.md section 8): many small runs, each with its own token
budget D and its own learning-rate schedule ending at D, one fit, then extrapolation::

    lightning-fpq sweep sweep.yaml            # this module: the runs -> runs.csv
    lightning-fpq fit runs.csv --plots plots --out law.yaml

A run is one (model size, token budget D, format, block size B, seed) point of the grid. It
is trained with the ``paper`` recipe by default (P2, P4, P6 quantized, the setup the law was
fitted on), validated once at its last step on a validation set that is the same for every
run, and appended to the CSV as soon as it finishes (flushed and fsync'ed), with columns
:data:`COLUMNS`. Rerunning the command resumes: runs already in the CSV with status ``ok``
(same run id, same training settings) are skipped; a run that raises is recorded with
status ``failed`` and its reason, and the sweep goes on (``--retry-failed`` runs those again).

Data and model default to the embedded corpus (:class:`~lightning_fpq.demo.data.ByteCorpusDataModule`)
and the demo GPT (:class:`~lightning_fpq.demo.model.GPTLightning`); either can be replaced by an
import path (``datamodule: mypkg.data.MyDataModule`` with ``datamodule_args: {...}``; ``model:
mypkg.models.MyModule`` with ``model_args`` and per-size ``args``).

Why the runs share one process: the compiled quantizer (``fastquant.py``) compiles each kernel
once per process; a process per run would pay that again and again. A run that kills the
process (out of memory, a segfault) leaves the rows written so far; run the command again.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from omegaconf import OmegaConf

from ..formats import FPFormat, as_format

__all__ = [
    "COLUMNS",
    "GridSpec",
    "ModelSize",
    "RunSpec",
    "SweepConfig",
    "SweepResult",
    "load_config",
    "ok_rows",
    "plan_runs",
    "read_rows",
    "run_sweep",
]

COLUMNS: tuple[str, ...] = (
    "run_id",  # model_format_B<B>_D<target tokens>_s<seed>: the resume key
    "status",  # ok | failed
    "model",  # the size's name in the config
    "N",  # non-embedding parameters (lightning_fpq.scaling.count_params)
    "D",  # training tokens actually seen (counted per batch)
    "steps",  # optimizer steps (the schedule ends here)
    "format",  # the format name as planned ("bf16"/"fp32": unquantized)
    "E", "M",  # exponent and mantissa bits
    "B",  # block size (int, "channel" or "tensor"); 1 for an unquantized run (no penalty in the law)
    "loss",  # final validation loss (nats per token), the fitted quantity
    "train_loss",  # mean training loss over the last 10% of steps
    "wall_s", "cpu_s",  # seconds of wall clock and of process CPU time (all threads) for the run
    "seed",
    "recipe",
    "settings",  # hash of the training settings shared by the runs: rows with another hash are not resumed
    "finished",  # ISO time the row was written
    "reason",  # why a failed run failed (one line)
)
"""The CSV's columns, in order. ``lightning-fpq fit`` reads N, D, E, M, B, loss and skips
rows whose status is not ``ok``."""

UNQUANTIZED = ("bf16", "fp32")
"""Formats that mean "no quantization": the recipe becomes ``bf16`` (nothing quantized) and the
row gets B = 1, for which the Capybara law has no quantization penalty (log2 1 = 0)."""

COST_OVERHEAD_PARAMS = 150_000
"""For the time-left estimate only: a run's cost is taken as D * (N + this), the second term
standing for the per-token work that does not grow with N (the quantizer on small tensors,
the embeddings, the optimizer's Python). Measured on the 2-core CPU with 32..128-wide GPTs."""

_REASON_CHARS = 300


# --------------------------------------------------------------------------- config


@dataclass
class ModelSize:
    """One model size of the grid.

    For the default GPT: ``n_layer``, ``n_head``, ``n_embd`` (``args`` may add other
    :class:`~lightning_fpq.demo.model.GPTConfig` fields, e.g. ``dropout``). For a model given by
    import path: ``args`` are this size's keyword arguments (merged over ``model_args``), and
    the three GPT fields are ignored unless set.
    """

    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class GridSpec:
    """One block of the grid: the product of its lists. A field left out (null) takes the
    top-level value; ``models`` null means every model size."""

    models: Optional[List[str]] = None
    tokens: Optional[List[int]] = None
    formats: Optional[List[str]] = None
    block_sizes: Optional[List[Any]] = None
    seeds: Optional[List[int]] = None


@dataclass
class SweepConfig:
    """Everything a sweep does. Load with :func:`load_config` (YAML + ``key=value`` overrides);
    unknown keys and bad values raise ``ValueError`` naming them.

    The grid is the union of the products in ``grid`` (each entry inherits the top-level
    ``tokens``, ``formats``, ``block_sizes``, ``seeds``); with ``grid`` empty, it is the one
    product of the top-level lists over every model size. Unquantized formats
    (:data:`UNQUANTIZED`) get one run per (model, tokens, seed), whatever the block sizes.
    """

    out: str = "sweep.csv"  # the CSV the rows are appended to
    recipe: str = "paper"  # a named recipe or a recipe YAML; each run sets its format and block size on it
    models: Dict[str, ModelSize] = field(default_factory=dict)  # name -> size, e.g. s: {n_layer: 2, n_head: 2, n_embd: 64}
    tokens: List[int] = field(default_factory=lambda: [65_536, 131_072, 262_144])  # D per run
    formats: List[str] = field(default_factory=lambda: ["e2m1", "e4m3", "bf16"])
    block_sizes: List[Any] = field(default_factory=lambda: [32])  # ints, "channel" or "tensor"
    seeds: List[int] = field(default_factory=lambda: [0])
    grid: List[GridSpec] = field(default_factory=list)
    # training (shared by every run: part of the settings hash)
    batch_size: int = 16
    seq_len: int = 64  # tokens per sample (the GPT's block_size)
    lr: float = 3e-3
    warmup_steps: int = 16  # linear warmup, then cosine to min_lr_ratio * lr at the run's last step
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    compute_dtype: Optional[str] = None  # None/"fp32", or "bf16" (autocast) as the paper's GPU runs
    # data
    max_bytes: int = 2_000_000  # embedded corpus size
    val_samples: int = 512  # validation windows: evenly spaced and the same for every run
    datamodule: Optional[str] = None  # import path of a LightningDataModule (default: the embedded corpus)
    datamodule_args: Dict[str, Any] = field(default_factory=dict)
    tokens_per_step: Optional[int] = None  # custom datamodule: tokens per optimizer step (default: measured from one batch)
    # model
    model: Optional[str] = None  # import path of a LightningModule (default: lightning_fpq.demo.model.GPTLightning)
    model_args: Dict[str, Any] = field(default_factory=dict)
    val_metric: str = "val/loss"  # the logged metric that becomes the row's loss
    train_metric: str = "train/loss"
    # machine
    accelerator: str = "auto"
    threads: int = 0  # torch.set_num_threads; 0 leaves torch's default
    progress_bar: bool = True  # a live bar on a terminal; one line per run is always printed

    def validate(self) -> "SweepConfig":
        """Check every value; raise ``ValueError`` naming the key, the value and what is valid."""
        from ..recipe import QuantRecipe

        _int_at_least("batch_size", self.batch_size, 1)
        _int_at_least("seq_len", self.seq_len, 1)
        _int_at_least("warmup_steps", self.warmup_steps, 0)
        _int_at_least("val_samples", self.val_samples, 1)
        _int_at_least("max_bytes", self.max_bytes, 2)
        _int_at_least("threads", self.threads, 0)
        if self.tokens_per_step is not None:
            _int_at_least("tokens_per_step", self.tokens_per_step, 1)
        _number_in("lr", self.lr, 0.0, math.inf, low_open=True)
        _number_in("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _number_in("weight_decay", self.weight_decay, 0.0, math.inf)
        if self.compute_dtype not in (None, "fp32", "bf16", "fp16"):
            raise ValueError(f"compute_dtype={self.compute_dtype!r} is not valid: expected null, 'fp32', 'bf16' or 'fp16'")
        if not isinstance(self.out, str) or not self.out.strip():
            raise ValueError(f"out={self.out!r} is not valid: expected the path of the CSV to write")
        try:
            QuantRecipe.coerce(self.recipe)
        except (ValueError, OSError) as err:
            raise ValueError(f"recipe={self.recipe!r} is not valid: {err}") from None
        for key in ("datamodule", "model"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or "." not in value.strip(". ")):
                raise ValueError(f"{key}={value!r} is not valid: expected an import path 'package.module.ClassName' or null")
        if not self.models:
            raise ValueError("models is empty: give at least one model size, e.g. models: {s: {n_layer: 2, n_head: 2, n_embd: 64}}")
        for name, size in self.models.items():
            for key in ("n_layer", "n_head", "n_embd"):
                value = getattr(size, key)
                if value is not None:
                    _int_at_least(f"models.{name}.{key}", value, 1)
            if self.model is None and None in (size.n_layer, size.n_head, size.n_embd):
                missing = [k for k in ("n_layer", "n_head", "n_embd") if getattr(size, k) is None]
                raise ValueError(f"models.{name} lacks {', '.join(missing)}: the default GPT needs n_layer, n_head and n_embd")
        for where, grid in self._grids():
            self._check_grid(where, grid)
        return self

    # ------------------------------------------------------------------ helpers
    def _grids(self) -> list[tuple[str, GridSpec]]:
        if not self.grid:
            return [("", GridSpec())]
        return [(f"grid[{i}].", g) for i, g in enumerate(self.grid)]

    def resolved(self, grid: GridSpec) -> GridSpec:
        """``grid`` with every null field taken from the top level."""
        return GridSpec(
            models=list(grid.models) if grid.models is not None else list(self.models),
            tokens=list(grid.tokens if grid.tokens is not None else self.tokens),
            formats=list(grid.formats if grid.formats is not None else self.formats),
            block_sizes=list(grid.block_sizes if grid.block_sizes is not None else self.block_sizes),
            seeds=list(grid.seeds if grid.seeds is not None else self.seeds),
        )

    def _check_grid(self, where: str, grid: GridSpec) -> None:
        g = self.resolved(grid)
        prefix = where
        for key in ("models", "tokens", "formats", "block_sizes", "seeds"):
            if not getattr(g, key):
                raise ValueError(f"{prefix}{key} is empty: the grid needs at least one value")
        for name in g.models:
            if name not in self.models:
                raise ValueError(f"{prefix}models names {name!r}, which is not a model size: expected some of {sorted(self.models)}")
        for i, tokens in enumerate(g.tokens):
            _int_at_least(f"{prefix}tokens[{i}]", tokens, 1)
        for i, fmt in enumerate(g.formats):
            try:
                as_format(fmt)
            except ValueError as err:
                raise ValueError(f"{prefix}formats[{i}]={fmt!r} is not valid: {err}") from None
        for i, block in enumerate(g.block_sizes):
            _block(f"{prefix}block_sizes[{i}]", block)
        for i, seed in enumerate(g.seeds):
            _int_at_least(f"{prefix}seeds[{i}]", seed, 0)

    def settings(self) -> dict[str, Any]:
        """The training settings every run shares (what the settings hash covers)."""
        keys = ("recipe", "batch_size", "seq_len", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "compute_dtype",
                "max_bytes", "val_samples", "datamodule", "datamodule_args", "tokens_per_step", "model", "model_args",
                "val_metric")
        return {k: _plain(getattr(self, k)) for k in keys}


def _int_at_least(key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key}={value!r} is not valid: expected an int >= {low}")
    return value


def _number_in(key: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if not (number and (value > low if low_open else value >= low) and value <= high and math.isfinite(value)):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high == math.inf else ']'}"
        raise ValueError(f"{key}={value!r} is not valid: expected a finite number in {interval}")
    return float(value)


def _block(key: str, value: Any) -> Any:
    """A grid block size: an int >= 1, 'channel' or 'tensor'."""
    if isinstance(value, str) and value.strip().lower() in ("channel", "tensor"):
        return value.strip().lower()
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r} is not valid: expected an int >= 1, 'channel' or 'tensor'")
    return value


def _plain(value: Any) -> Any:
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return value


def load_config(source: Any = None, overrides: tuple[str, ...] | list[str] = ()) -> SweepConfig:
    """Defaults, then ``source`` (a YAML path, a dict or a :class:`SweepConfig`), then
    ``key=value`` overrides (OmegaConf dot-list). Unknown keys and values of the wrong type
    raise ``ValueError`` naming the key; :meth:`SweepConfig.validate` checks the values."""
    schema = OmegaConf.structured(SweepConfig)
    try:
        merged = schema
        if source is not None:
            if isinstance(source, SweepConfig):
                data = OmegaConf.structured(source)
            elif isinstance(source, dict):
                data = OmegaConf.create(source)
            else:
                path = os.fspath(source)
                if not os.path.isfile(path):
                    raise ValueError(f"sweep config {path!r} does not exist")
                data = OmegaConf.load(path)
            merged = OmegaConf.merge(merged, data)
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg: SweepConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except ValueError:
        raise
    except Exception as err:  # OmegaConf's ConfigKeyError / ValidationError: it names the key
        raise ValueError(f"sweep config: {_omegaconf_message(err)} (valid top-level keys: {sorted(SweepConfig.__dataclass_fields__)})") from None
    return cfg.validate()


def _omegaconf_message(err: Exception) -> str:
    """OmegaConf's first line plus the full key it names (its messages carry it on a later line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    head = lines[0] if lines else type(err).__name__
    key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), "")
    if key and key not in head:
        head = f"{head} (key: {key})"
    return head


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class RunSpec:
    """One point of the grid."""

    run_id: str
    model: str
    tokens: int  # target D
    fmt: str  # the format's canonical name
    block_size: Any  # int, "channel", "tensor"; 1 for an unquantized run
    seed: int
    quantized: bool

    @property
    def ebits(self) -> int:
        return as_format(self.fmt).ebits

    @property
    def mbits(self) -> int:
        return as_format(self.fmt).mbits


def _is_unquantized(fmt: FPFormat) -> bool:
    return any(fmt == as_format(name) for name in UNQUANTIZED)


def plan_runs(cfg: SweepConfig) -> list[RunSpec]:
    """Every run of the grid, in order (grid blocks in order; within one: model, format, block
    size, tokens, seed), without duplicates."""
    runs: dict[str, RunSpec] = {}
    for _, grid in cfg._grids():
        g = cfg.resolved(grid)
        for model in g.models:
            for fmt_name in g.formats:
                fmt = as_format(fmt_name)
                quantized = not _is_unquantized(fmt)
                blocks = [_block("block_sizes", b) for b in g.block_sizes] if quantized else [1]
                for block in dict.fromkeys(blocks):
                    for tokens in g.tokens:
                        for seed in g.seeds:
                            run_id = f"{model}_{fmt.name}_B{block}_D{tokens}_s{seed}"
                            runs.setdefault(run_id, RunSpec(run_id, model, int(tokens), fmt.name, block, int(seed), quantized))
    return list(runs.values())


def settings_hash(cfg: SweepConfig, spec: RunSpec) -> str:
    """10 hex digits over the shared training settings and the run's model size."""
    blob = json.dumps({"settings": cfg.settings(), "size": _plain(cfg.models[spec.model])}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _estimated_params(cfg: SweepConfig, spec: RunSpec) -> int:
    """N before building the model (default GPT only; 0 when unknown)."""
    if cfg.model is not None:
        return 0
    from ..demo.model import GPTConfig

    size = cfg.models[spec.model]
    try:
        gpt = GPTConfig(block_size=cfg.seq_len, n_layer=size.n_layer, n_head=size.n_head, n_embd=size.n_embd, **size.args)
    except (TypeError, ValueError):
        return 0
    return gpt.num_params(non_embedding=True)


# ------------------------------------------------------------------------- the CSV


def read_rows(path: Any) -> list[dict[str, str]]:
    """The CSV's rows as dicts ([] when the file does not exist or is empty)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in ("run_id", "status") if c not in header]
        if missing:
            raise ValueError(f"{path} is not a sweep CSV: its header lacks {', '.join(missing)} (it has {header})")
        return list(reader)


def ok_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows a fit may use: status ``ok`` and, when a run id occurs several times, its last row.

    Returns ``(rows, counts)`` with counts of ``total``, ``used``, ``failed`` (last status not
    ok) and ``superseded`` (earlier rows of a run id). Rows without a status column are all used.
    """
    counts = {"total": len(rows), "used": 0, "failed": 0, "superseded": 0}
    if not rows or "status" not in rows[0]:
        counts["used"] = len(rows)
        return list(rows), counts
    last: dict[Any, int] = {}
    for i, row in enumerate(rows):
        last[row.get("run_id") or f"#{i}"] = i
    keep = []
    for i, row in enumerate(rows):
        if last[row.get("run_id") or f"#{i}"] != i:
            counts["superseded"] += 1
        elif str(row.get("status", "")).strip().lower() != "ok":
            counts["failed"] += 1
        else:
            keep.append(row)
    counts["used"] = len(keep)
    return keep, counts


class _Writer:
    """Appends one row at a time, flushed and fsync'ed, so a killed sweep loses no finished run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size > 0:
            with open(path, newline="", encoding="utf-8") as fh:
                header = next(csv.reader(fh), [])
            if tuple(header) != COLUMNS:
                raise ValueError(f"{path} has columns {header}, not a sweep CSV's {list(COLUMNS)}: write to another file (out=...)")
        else:
            with open(path, "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow(COLUMNS)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, fieldnames=COLUMNS).writerow({k: _cell(row.get(k)) for k in COLUMNS})
            fh.flush()
            os.fsync(fh.fileno())


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.7g}"
    return value


# --------------------------------------------------------------------- one run


def _import(path: str, what: str) -> Any:
    module_name, _, attr = path.strip().rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise ImportError(f"{what} {path!r}: cannot import module {module_name!r}: {type(err).__name__}: {err}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}") from None


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _build_datamodule(cfg: SweepConfig, spec: RunSpec, steps: Optional[int]):
    if cfg.datamodule is None:
        from ..demo.data import ByteCorpusDataModule

        return ByteCorpusDataModule(
            block_size=cfg.seq_len, batch_size=cfg.batch_size, max_bytes=cfg.max_bytes, seed=spec.seed,
            samples_per_epoch=max(1, steps or 1) * cfg.batch_size, val_samples=cfg.val_samples,
        )
    cls = _import(cfg.datamodule, "datamodule")
    kwargs = dict(_plain(cfg.datamodule_args))
    if "seed" not in kwargs and _accepts(cls, "seed"):
        kwargs["seed"] = spec.seed
    return cls(**kwargs)


def _tokens_per_step(cfg: SweepConfig, datamodule: Any) -> int:
    if cfg.tokens_per_step is not None:
        return cfg.tokens_per_step
    if cfg.datamodule is None:
        return cfg.batch_size * cfg.seq_len
    per_batch = getattr(datamodule, "tokens_per_batch", None)
    if isinstance(per_batch, int) and per_batch > 0:
        return per_batch
    from ..lightning.tokens import count_batch_tokens

    try:
        if hasattr(datamodule, "prepare_data"):
            datamodule.prepare_data()
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))
        return int(count_batch_tokens(batch))
    except Exception as err:
        raise ValueError(f"cannot tell how many tokens a step of {cfg.datamodule} holds ({type(err).__name__}: {err}): "
                         "set tokens_per_step in the sweep config") from None


def _build_model(cfg: SweepConfig, spec: RunSpec, steps: int):
    size = cfg.models[spec.model]
    if cfg.model is None:
        from ..demo.model import GPTConfig, GPTLightning

        gpt = GPTConfig(block_size=cfg.seq_len, n_layer=size.n_layer, n_head=size.n_head, n_embd=size.n_embd,
                        **_plain(size.args))
        return GPTLightning(gpt, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                            max_steps=steps, min_lr_ratio=cfg.min_lr_ratio)
    cls = _import(cfg.model, "model")
    kwargs = {**_plain(cfg.model_args), **_plain(size.args)}
    for key in ("n_layer", "n_head", "n_embd"):
        if getattr(size, key) is not None:
            kwargs.setdefault(key, getattr(size, key))
    shared = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "warmup_steps": cfg.warmup_steps, "max_steps": steps,
              "min_lr_ratio": cfg.min_lr_ratio}
    for key, value in shared.items():
        if key not in kwargs and _accepts(cls, key):
            kwargs[key] = value
    return cls(**kwargs)


def _recipe(cfg: SweepConfig, spec: RunSpec):
    from ..recipe import QuantRecipe

    if not spec.quantized:
        return QuantRecipe.from_name("bf16")
    return QuantRecipe.coerce(cfg.recipe).with_format(spec.fmt, block_size=spec.block_size)


def _recorder_callback(train_metric: str):
    """A callback that counts training tokens and keeps the per-step training losses."""
    from lightning.pytorch import Callback

    from ..lightning.tokens import count_batch_tokens

    class _Recorder(Callback):
        def __init__(self) -> None:
            self.tokens = 0
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.tokens += int(count_batch_tokens(batch))
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if loss is None:
                loss = trainer.callback_metrics.get(train_metric)
            if loss is not None:
                self.losses.append(float(loss))

    return _Recorder()


def _one_line(err: BaseException) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def run_one(cfg: SweepConfig, spec: RunSpec) -> dict[str, Any]:
    """Train and validate one run; returns its CSV row (status ``ok``). Raises on failure."""
    from lightning.pytorch import Trainer, seed_everything

    from ..lightning.precision import FPQuantPrecision
    from .laws import count_params

    seed_everything(spec.seed, verbose=False)
    if cfg.datamodule is None:
        tps = cfg.batch_size * cfg.seq_len if cfg.tokens_per_step is None else cfg.tokens_per_step
        steps = max(1, round(spec.tokens / tps))
        datamodule = _build_datamodule(cfg, spec, steps)
    else:
        datamodule = _build_datamodule(cfg, spec, None)
        tps = _tokens_per_step(cfg, datamodule)
        steps = max(1, round(spec.tokens / tps))
    if cfg.warmup_steps >= steps:
        raise ValueError(f"warmup_steps={cfg.warmup_steps} is not below this run's {steps} steps "
                         f"(tokens={spec.tokens} at {tps} tokens per step): lower warmup_steps or raise tokens")
    seed_everything(spec.seed, verbose=False)  # the model's init does not depend on what building the data drew
    model = _build_model(cfg, spec, steps)
    n_params = count_params(model)
    plugin = FPQuantPrecision(recipe=_recipe(cfg, spec), compute_dtype=cfg.compute_dtype)
    recorder = _recorder_callback(cfg.train_metric)
    trainer = Trainer(
        accelerator=cfg.accelerator, devices=1, max_steps=steps, max_epochs=-1, plugins=[plugin], callbacks=[recorder],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, check_val_every_n_epoch=None, val_check_interval=steps,
        log_every_n_steps=max(1, min(50, steps)),
    )
    trainer.fit(model, datamodule=datamodule)
    if trainer.global_step < steps:
        raise RuntimeError(f"training stopped at step {trainer.global_step} of {steps} (the data ran out?)")
    val = trainer.callback_metrics.get(cfg.val_metric)
    if val is None:  # the datamodule's loop did not reach the validation point: validate once more
        trainer.validate(model, datamodule=datamodule, verbose=False)
        val = trainer.callback_metrics.get(cfg.val_metric)
    if val is None:
        logged = sorted(trainer.callback_metrics)
        raise ValueError(f"the model logged no {cfg.val_metric!r} (it logged {logged}): set val_metric")
    loss = float(val)
    if not math.isfinite(loss):
        raise FloatingPointError(f"validation loss is {loss} (the run diverged)")
    tail = recorder.losses[-max(1, len(recorder.losses) // 10):]
    return {
        "N": n_params, "D": recorder.tokens or steps * tps, "steps": steps, "loss": loss,
        "train_loss": sum(tail) / len(tail) if tail else None,
    }


# --------------------------------------------------------------------- the sweep


@dataclass
class SweepResult:
    """What one invocation of :func:`run_sweep` did."""

    csv: Path
    planned: int
    skipped: int  # already in the CSV
    ran: int
    ok: int
    failed: int
    wall_s: float
    cpu_s: float
    failures: list[tuple[str, str]] = field(default_factory=list)  # (run_id, reason)

    def summary(self) -> str:
        text = (f"sweep: {self.planned} runs in the grid, {self.skipped} already in {self.csv}, ran {self.ran} "
                f"({self.ok} ok, {self.failed} failed) in {_duration(self.wall_s)} wall, {_duration(self.cpu_s)} CPU")
        for run_id, reason in self.failures[:10]:
            text += f"\n  failed {run_id}: {reason}"
        if len(self.failures) > 10:
            text += f"\n  ... and {len(self.failures) - 10} more (see the CSV's reason column)"
        return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


class _Eta:
    """Time left = the cost of the runs left, at the seconds per cost unit measured so far.

    A run's cost is D * (N + :data:`COST_OVERHEAD_PARAMS`); runs of unknown N cost D * that
    constant. The first run also pays for compiling the quantizer, so early estimates run high.
    """

    def __init__(self, costs: dict[str, float]) -> None:
        self.costs = costs
        self.left = sum(costs.values())
        self.done_cost = 0.0
        self.done_s = 0.0

    def finished(self, run_id: str, seconds: float) -> None:
        cost = self.costs.get(run_id, 0.0)
        self.left -= cost
        self.done_cost += cost
        self.done_s += seconds

    def seconds_left(self) -> Optional[float]:
        if self.done_cost <= 0:
            return None
        return max(0.0, self.left) * self.done_s / self.done_cost

    def text(self) -> str:
        s = self.seconds_left()
        return "time left: estimating" if s is None else f"time left ~{_duration(s)}"


def _quiet_lightning() -> Callable[[], None]:
    """Silence Lightning's per-run banners and the warnings a tiny run triggers; returns the undo."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero", "lightning_fpq")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    catcher = warnings.catch_warnings()
    catcher.__enter__()
    for pattern in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                    ".*is an nn.Linear subclass.*", ".*LeafSpec.*", ".*treespec.*"):
        warnings.filterwarnings("ignore", message=pattern)

    def undo() -> None:
        catcher.__exit__(None, None, None)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)

    return undo


def run_sweep(
    cfg: SweepConfig,
    *,
    retry_failed: bool = False,
    dry_run: bool = False,
    echo: Optional[Callable[[str], None]] = None,
) -> SweepResult:
    """Run every planned run not yet in ``cfg.out``; append one row per run as it finishes.

    ``retry_failed``: also run again the runs whose last row is ``failed``. ``dry_run``: plan
    and report, train nothing. ``echo``: where progress lines go (default: stdout; the live
    bar, when shown, goes to the terminal).
    """
    import torch

    echo = echo or (lambda line: print(line, flush=True))
    csv_path = Path(cfg.out)
    runs = plan_runs(cfg)
    existing = read_rows(csv_path)
    hashes = {spec.run_id: settings_hash(cfg, spec) for spec in runs}
    stale = [r["run_id"] for r in existing if r.get("run_id") in hashes and r.get("settings") not in ("", None, hashes[r["run_id"]])]
    if stale:
        raise ValueError(
            f"{csv_path} holds {len(stale)} row(s) made with other training settings or model sizes (e.g. {stale[0]}): "
            "rows of two setups must not be fitted together; write to a new CSV (out=...) or remove those rows"
        )
    last_status = {r["run_id"]: str(r.get("status", "")).strip().lower() for r in existing}
    done = {rid for rid, status in last_status.items() if status == "ok"}
    failed_before = {rid for rid, status in last_status.items() if status != "ok"}
    todo = [s for s in runs if s.run_id not in done and (retry_failed or s.run_id not in failed_before)]
    skipped = len(runs) - len(todo)
    result = SweepResult(csv=csv_path, planned=len(runs), skipped=skipped, ran=0, ok=0, failed=0, wall_s=0.0, cpu_s=0.0)
    not_retried = sum(1 for s in runs if s.run_id in failed_before and s.run_id not in done) if not retry_failed else 0
    if dry_run:
        echo(f"sweep (dry run): {len(runs)} runs in the grid, {len(runs) - skipped} to run, {skipped} already in {csv_path}")
        for spec in todo:
            echo(f"  {spec.run_id}")
        return result
    if not todo:
        echo(f"sweep: all {len(runs)} runs are in {csv_path}" + (f" ({not_retried} failed; --retry-failed runs them again)" if not_retried else ""))
        return result
    if not_retried:
        echo(f"sweep: {not_retried} run(s) failed before and are skipped (--retry-failed runs them again)")

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    writer = _Writer(csv_path)
    eta = _Eta({s.run_id: s.tokens * (_estimated_params(cfg, s) + COST_OVERHEAD_PARAMS) for s in todo})
    echo(f"sweep: {len(runs)} runs in the grid, {skipped} already in {csv_path}, {len(todo)} to run "
         f"(torch threads: {torch.get_num_threads()})")
    bar = _Bar(len(todo), enabled=cfg.progress_bar and sys.stdout.isatty())
    undo = _quiet_lightning()
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    try:
        with bar:
            for i, spec in enumerate(todo, 1):
                bar.update(i - 1, f"{spec.run_id}", eta.text())
                row: dict[str, Any] = {
                    "run_id": spec.run_id, "model": spec.model, "format": spec.fmt, "E": spec.ebits, "M": spec.mbits,
                    "B": spec.block_size, "seed": spec.seed, "recipe": cfg.recipe if spec.quantized else "bf16",
                    "settings": hashes[spec.run_id], "D": spec.tokens,
                }
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    row.update(run_one(cfg, spec))
                    row["status"] = "ok"
                except KeyboardInterrupt:
                    raise
                except Exception as err:  # the run failed: record why and go on
                    row.update(status="failed", reason=_one_line(err))
                row["wall_s"] = time.perf_counter() - t0
                row["cpu_s"] = time.process_time() - c0
                row["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                writer.write(row)
                eta.finished(spec.run_id, row["wall_s"])
                result.ran += 1
                if row["status"] == "ok":
                    result.ok += 1
                    what = f"loss {row['loss']:.4f}, N={row['N']:,}, D={row['D']:,}"
                else:
                    result.failed += 1
                    result.failures.append((spec.run_id, row["reason"]))
                    what = f"FAILED: {row['reason']}"
                bar.print(f"[{i}/{len(todo)}] {spec.run_id}: {what} ({row['wall_s']:.1f} s); {eta.text()}", echo)
                gc.collect()
            bar.update(len(todo), "done", "")
    finally:
        undo()
        result.wall_s = time.perf_counter() - start_wall
        result.cpu_s = time.process_time() - start_cpu
    return result


class _Bar:
    """A rich progress bar over the runs on a terminal; nothing otherwise (lines are echoed)."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self._progress = None
        self._task = None

    def __enter__(self) -> "_Bar":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[eta]}"), TextColumn("{task.description}"),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("", total=self.total, eta="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def update(self, completed: int, description: str, eta: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, description=description, eta=eta)

    def print(self, line: str, echo: Callable[[str], None]) -> None:
        if self._progress is not None:
            self._progress.console.print(line, highlight=False, markup=False)
        else:
            echo(line)
