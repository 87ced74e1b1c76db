"""The sweep's plan: every run of the grid (:class:`RunSpec`), the hash of the settings the runs
share (the resume key's guard), and each run's estimated size (for the time-left estimate)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from .. import _config
from ..formats import FPFormat
from .sweep_config import SweepConfig, plain

__all__ = ["UNQUANTIZED", "RunSpec", "estimated_params", "plan_runs", "settings_hash"]

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
