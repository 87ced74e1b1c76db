"""N as the scaling laws count it: the parameters of a torch module (torch imported when called)."""

from __future__ import annotations

from typing import Any

__all__ = ["count_params"]


def count_params(model: Any, *, include_embeddings: bool = False) -> int:
    """N as the scaling laws expect it: the parameters of a torch ``nn.Module``.

    By default *non-embedding* parameters: the weights of every ``nn.Embedding`` and
    ``nn.EmbeddingBag`` are left out, because a lookup costs no FLOPs and the compute model
    C = 6 N D (times P/16) counts matmul FLOPs. Consequences: a classifier head tied to the
    embedding (the same Parameter) is left out with it; an untied output head is a matmul
    and is counted; position tables stored as a bare ``nn.Parameter`` are counted.
    ``include_embeddings=True`` counts everything. Shared parameters count once; frozen
    parameters count (they still cost compute).
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"count_params expects a torch.nn.Module, got {type(model).__name__}")
    skip: set[int] = set()
    if not include_embeddings:
        for module in model.modules():
            if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
                skip.update(id(p) for p in module.parameters(recurse=False))
    total = 0
    for name, p in model.named_parameters():  # named_parameters() yields a shared Parameter once
        if id(p) in skip:
            continue
        if isinstance(p, torch.nn.parameter.UninitializedParameter):
            raise ValueError(
                f"parameter {name!r} is uninitialized (a lazy module): run one forward pass before count_params"
            )
        total += p.numel()
    return int(total)
