"""The sweep's configuration: the grid (model sizes x token budgets x formats x block sizes x
seeds) and the training settings every run shares, loaded from YAML and ``key=value`` overrides.

Unknown keys and bad values raise one ``ValueError`` naming the key, the value and what is
valid (:mod:`lightning_fpq._config` does the parsing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf

from .. import _config
from ..formats import FPFormat

__all__ = ["EXECUTORS", "GridSpec", "ModelSize", "SweepConfig", "load_config", "plain"]

EXECUTORS = ("sequential", "local", "ray")
"""Where a sweep's runs train (``lightning_fpq.scaling.sweep_executor``)."""


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
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class GridSpec:
    """One block of the grid: the product of its lists. A field left out (null) takes the
    top-level value; ``models`` null means every model size."""

    models: Optional[list[str]] = None
    tokens: Optional[list[int]] = None
    formats: Optional[list[str]] = None
    block_sizes: Optional[list[Any]] = None
    seeds: Optional[list[int]] = None


@dataclass
class SweepConfig:
    """Everything a sweep does. Load with :func:`load_config` (YAML + ``key=value`` overrides);
    unknown keys and bad values raise ``ValueError`` naming them.

    The grid is the union of the products in ``grid`` (each entry inherits the top-level
    ``tokens``, ``formats``, ``block_sizes``, ``seeds``); with ``grid`` empty, it is the one
    product of the top-level lists over every model size. Unquantized formats
    (:data:`~lightning_fpq.scaling.sweep_plan.UNQUANTIZED`) get one run per (model, tokens, seed), whatever the block sizes.
    """

    out: str = "sweep.csv"  # the CSV the rows are appended to
    recipe: str = "paper"  # a named recipe or a recipe YAML; each run sets its format and block size on it
    models: dict[str, ModelSize] = field(
        default_factory=dict
    )  # name -> size, e.g. s: {n_layer: 2, n_head: 2, n_embd: 64}
    tokens: list[int] = field(default_factory=lambda: [65_536, 131_072, 262_144])  # D per run
    formats: list[str] = field(default_factory=lambda: ["e2m1", "e4m3", "bf16"])
    block_sizes: list[Any] = field(default_factory=lambda: [32])  # ints, "channel" or "tensor"
    seeds: list[int] = field(default_factory=lambda: [0])
    grid: list[GridSpec] = field(default_factory=list)
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
    datamodule_args: dict[str, Any] = field(default_factory=dict)
    tokens_per_step: Optional[int] = (
        None  # custom datamodule: tokens per optimizer step (default: measured from one batch)
    )
    # model
    model: Optional[str] = None  # import path of a LightningModule (default: lightning_fpq.demo.model.GPTLightning)
    model_args: dict[str, Any] = field(default_factory=dict)
    val_metric: str = "val/loss"  # the logged metric that becomes the row's loss
    train_metric: str = "train/loss"
    # machine
    accelerator: str = "auto"
    threads: int = 0  # torch.set_num_threads; 0 leaves torch's default
    progress_bar: bool = True  # a live bar on a terminal; one line per run is always printed
    # where the runs train (not in the settings hash: every executor writes the same rows)
    executor: str = "sequential"  # "sequential" (this process), "local" (worker processes here) or "ray" (a cluster)
    workers: int = 0  # local/ray: runs at once; 0: as many as the CPUs (local) or the cluster's resources (ray) hold
    address: Optional[str] = None  # ray: the cluster ("auto", "HOST:PORT", "ray://HOST:10001"); null: this machine
    cpus_per_run: float = 1.0  # local/ray: CPUs per run (Ray's num_cpus; torch threads when threads is 0)
    gpus_per_run: float = 0.0  # ray: GPUs per run (Ray's num_gpus)
    max_retries: int = 2  # local/ray: a run whose worker dies is tried again this often, then recorded as failed

    def validate(self) -> SweepConfig:
        """Check every value; raise ``ValueError`` naming the key, the value and what is valid."""
        from ..recipe import QuantRecipe

        for key, low in (
            ("batch_size", 1),
            ("seq_len", 1),
            ("warmup_steps", 0),
            ("val_samples", 1),
            ("max_bytes", 2),
            ("threads", 0),
        ):
            _config.integer(getattr(self, key), what=key, low=low)
        _config.integer(self.tokens_per_step, what="tokens_per_step", low=1, optional=True)
        _config.number(self.lr, what="lr", low=0.0, low_open=True)
        _config.number(self.min_lr_ratio, what="min_lr_ratio", low=0.0, high=1.0)
        _config.number(self.weight_decay, what="weight_decay", low=0.0)
        if self.compute_dtype not in (None, "fp32", "bf16", "fp16"):
            raise ValueError(
                f"compute_dtype={self.compute_dtype!r} is not valid: expected null, 'fp32', 'bf16' or 'fp16'"
            )
        if not isinstance(self.out, str) or not self.out.strip():
            raise ValueError(f"out={self.out!r} is not valid: expected the path of the CSV to write")
        try:
            QuantRecipe.coerce(self.recipe)
        except (ValueError, OSError) as err:
            raise ValueError(f"recipe={self.recipe!r} is not valid: {err}") from None
        for key in ("datamodule", "model"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or "." not in value.strip(". ")):
                raise ValueError(
                    f"{key}={value!r} is not valid: expected an import path 'package.module.ClassName' or null"
                )
        if not self.models:
            raise ValueError(
                "models is empty: give at least one model size, e.g. models: {s: {n_layer: 2, n_head: 2, n_embd: 64}}"
            )
        for name, size in self.models.items():
            for key in ("n_layer", "n_head", "n_embd"):
                _config.integer(getattr(size, key), what=f"models.{name}.{key}", low=1, optional=True)
            if self.model is None and None in (size.n_layer, size.n_head, size.n_embd):
                missing = [k for k in ("n_layer", "n_head", "n_embd") if getattr(size, k) is None]
                raise ValueError(
                    f"models.{name} lacks {', '.join(missing)}: the default GPT needs n_layer, n_head and n_embd"
                )
        for where, grid in self.grids():
            self._check_grid(where, grid)
        self._check_executor()
        return self

    def _check_executor(self) -> None:
        self.executor = _config.choice(self.executor, EXECUTORS, what="executor")
        _config.integer(self.workers, what="workers", low=0)
        _config.integer(self.max_retries, what="max_retries", low=0)
        _config.number(self.cpus_per_run, what="cpus_per_run", low=0.0, low_open=True)
        _config.number(self.gpus_per_run, what="gpus_per_run", low=0.0)
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            raise ValueError(f"address={self.address!r} is not valid: expected a Ray address (auto, HOST:PORT) or null")
        if self.executor == "sequential" and self.workers > 1:
            raise ValueError(
                f"workers={self.workers} needs executor 'local' or 'ray': executor 'sequential' runs one run at a time"
            )
        if self.executor != "ray" and self.gpus_per_run:
            raise ValueError(
                f"gpus_per_run={self.gpus_per_run} needs executor 'ray', which gives each run its GPUs "
                "(it runs on this machine too: leave address null)"
            )

    # ------------------------------------------------------------------ helpers
    def grids(self) -> list[tuple[str, GridSpec]]:
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
                raise ValueError(
                    f"{prefix}models names {name!r}, which is not a model size: expected some of {sorted(self.models)}"
                )
        for i, tokens in enumerate(g.tokens):
            _config.integer(tokens, what=f"{prefix}tokens[{i}]", low=1)
        for i, fmt in enumerate(g.formats):
            try:
                FPFormat.parse(fmt)
            except ValueError as err:
                raise ValueError(f"{prefix}formats[{i}]={fmt!r} is not valid: {err}") from None
        for i, block in enumerate(g.block_sizes):
            _config.block_size(block, what=f"{prefix}block_sizes[{i}]", allow_none=False)
        for i, seed in enumerate(g.seeds):
            _config.integer(seed, what=f"{prefix}seeds[{i}]", low=0)

    def settings(self) -> dict[str, Any]:
        """The training settings every run shares (what the settings hash covers)."""
        keys = (
            "recipe",
            "batch_size",
            "seq_len",
            "lr",
            "warmup_steps",
            "min_lr_ratio",
            "weight_decay",
            "compute_dtype",
            "max_bytes",
            "val_samples",
            "datamodule",
            "datamodule_args",
            "tokens_per_step",
            "model",
            "model_args",
            "val_metric",
        )
        return {k: plain(getattr(self, k)) for k in keys}


def plain(value: Any) -> Any:
    """An OmegaConf container or a dataclass as plain Python containers (for hashing and kwargs)."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return value


def load_config(source: Any = None, overrides: tuple[str, ...] | list[str] = ()) -> SweepConfig:
    """Defaults, then ``source`` (a YAML path, a dict or a :class:`SweepConfig`), then
    ``key=value`` overrides (OmegaConf dot-list). Unknown keys and values of the wrong type
    raise ``ValueError`` naming the key; :meth:`SweepConfig.validate` checks the values."""
    return _config.load_structured(SweepConfig, source, overrides, what="sweep config").validate()
