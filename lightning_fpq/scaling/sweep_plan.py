"""The sweep's plan: every run of the grid (:class:`RunSpec`), the hash of the settings the runs
share (the resume key's guard), each run's estimated size (for the time-left estimate), and the
checks that refuse a plan whose runs must fail before any of them trains (:func:`check_runs`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from .. import _config
from ..formats import FPFormat
from .sweep_config import SweepConfig, plain

__all__ = ["UNQUANTIZED", "RunSpec", "check_runs", "estimated_params", "plan_runs", "run_steps", "settings_hash"]

UNQUANTIZED = ("bf16", "fp32")
"""Formats that mean "no quantization": the recipe becomes ``bf16`` (nothing quantized) and the
row gets B = 1, for which the Capybara law has no quantization penalty (log2 1 = 0)."""


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
        return FPFormat.parse(self.fmt).ebits

    @property
    def mbits(self) -> int:
        return FPFormat.parse(self.fmt).mbits


def _is_unquantized(fmt: FPFormat) -> bool:
    return any(fmt == FPFormat.parse(name) for name in UNQUANTIZED)


def plan_runs(cfg: SweepConfig) -> list[RunSpec]:
    """Every run of the grid, in order (grid blocks in order; within one: model, format, block
    size, tokens, seed), without duplicates."""
    runs: dict[str, RunSpec] = {}
    for _, grid in cfg.grids():
        g = cfg.resolved(grid)
        for model in g.models:
            for fmt_name in g.formats:
                fmt = FPFormat.parse(fmt_name)
                quantized = not _is_unquantized(fmt)
                blocks = (
                    [_config.block_size(b, what="block_sizes", allow_none=False) for b in g.block_sizes]
                    if quantized
                    else [1]
                )
                for block in dict.fromkeys(blocks):
                    for tokens in g.tokens:
                        for seed in g.seeds:
                            run_id = f"{model}_{fmt.name}_B{block}_D{tokens}_s{seed}"
                            runs.setdefault(
                                run_id, RunSpec(run_id, model, int(tokens), fmt.name, block, int(seed), quantized)
                            )
    return list(runs.values())


def settings_hash(cfg: SweepConfig, spec: RunSpec) -> str:
    """10 hex digits over the shared training settings and the run's model size."""
    blob = json.dumps({"settings": cfg.settings(), "size": plain(cfg.models[spec.model])}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def estimated_params(cfg: SweepConfig, spec: RunSpec) -> int:
    """N before building the model (default GPT only; 0 when unknown)."""
    if cfg.model is not None:
        return 0
    from ..demo.model import GPTConfig

    size = cfg.models[spec.model]
    try:
        gpt = GPTConfig(
            block_size=cfg.seq_len, n_layer=size.n_layer, n_head=size.n_head, n_embd=size.n_embd, **size.args
        )
    except (TypeError, ValueError):
        return 0
    return gpt.num_params(non_embedding=True)


def known_tokens_per_step(cfg: SweepConfig) -> Optional[int]:
    """Tokens per optimizer step when the config fixes it (the embedded corpus, or ``tokens_per_step``);
    None when a custom datamodule decides (it is measured when a run starts)."""
    if cfg.tokens_per_step is not None:
        return cfg.tokens_per_step
    return cfg.batch_size * cfg.seq_len if cfg.datamodule is None else None


def run_steps(tokens: int, tokens_per_step: int) -> int:
    """Optimizer steps of a run of ``tokens`` tokens (its schedule ends there)."""
    return max(1, round(tokens / tokens_per_step))


def check_runs(cfg: SweepConfig, runs: Sequence[RunSpec]) -> None:
    """Refuse, before anything trains, runs that must fail: a datamodule or model whose import path
    does not import, a GPT size that cannot be built (n_embd not divisible by n_head, unknown
    ``args``), a token budget of no more steps than ``warmup_steps``. One ``ValueError`` names each
    problem, its key and what would be valid. The dry run calls it too."""
    from .sweep_run import import_path

    problems = []
    for key in ("datamodule", "model"):
        path = getattr(cfg, key)
        if path is None:
            continue
        try:
            target = import_path(path, key)
        except ImportError as err:
            problems.append(f"{err} (every run would fail)")
            continue
        if not callable(target):
            problems.append(f"{key}={path!r} is a {type(target).__name__}, not a class or function")
    if cfg.model is None:
        from ..demo.model import GPTConfig

        for name in dict.fromkeys(spec.model for spec in runs):
            size = cfg.models[name]
            try:
                GPTConfig(
                    block_size=cfg.seq_len,
                    n_layer=size.n_layer,
                    n_head=size.n_head,
                    n_embd=size.n_embd,
                    **plain(size.args),
                )
            except (TypeError, ValueError) as err:
                problems.append(f"models.{name} is not a GPT size: {err}")
    per_step = known_tokens_per_step(cfg)
    if per_step is not None:
        short = sorted({s.tokens for s in runs if run_steps(s.tokens, per_step) <= cfg.warmup_steps})
        if short:
            problems.append(
                f"tokens {short} give {', '.join(str(run_steps(t, per_step)) for t in short)} step(s) of {per_step} "
                f"tokens, not more than warmup_steps={cfg.warmup_steps}: give every run more steps "
                f"(tokens >= {(cfg.warmup_steps + 1) * per_step}) or lower warmup_steps"
            )
    if problems:
        raise ValueError("; ".join(problems))
