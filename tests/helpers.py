"""Shared test model: a tiny next-token LightningModule and random token batches.

Imported as ``from helpers import ...``: pytest puts tests/ on ``sys.path`` (rootdir conftest,
no ``__init__.py``); scripts run as subprocesses (tests/callback_scripts/) add tests/ themselves.
"""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset


class TinyLM(LightningModule):
    """Embedding -> [Linear + ReLU] -> ``lm_head``; cross-entropy on ``(x, y)`` batches of token ids; SGD lr 0.1.

    ``hidden=None`` drops the hidden layer (embedding straight into the head). ``log_loss`` logs
    ``train/loss`` every step.
    """

    def __init__(self, vocab: int = 32, d_model: int = 16, hidden: Optional[int] = 32, log_loss: bool = True) -> None:
        super().__init__()
        self.log_loss = log_loss
        self.emb = torch.nn.Embedding(vocab, d_model)
        self.hidden = torch.nn.Linear(d_model, hidden) if hidden is not None else None
        self.lm_head = torch.nn.Linear(hidden if hidden is not None else d_model, vocab)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.emb(x)
        if self.hidden is not None:
            h = torch.relu(self.hidden(h))
        logits = self.lm_head(h)  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        if self.log_loss:
            self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def token_loader(n_batches: int, batch: int, seq: int, *, vocab: int = 32, seed: Optional[int] = None) -> DataLoader:
    """``n_batches`` batches of ``(x, x rolled by one)``, uniform random ids in ``[0, vocab)``.

    ``seed=None`` draws from torch's global generator; an int uses a fresh generator with that seed.
    """
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randint(0, vocab, (n_batches * batch, seq), generator=g)
    return DataLoader(TensorDataset(x, x.roll(1, -1)), batch_size=batch)


def quiet_trainer(**kwargs) -> Trainer:
    """A CPU ``Trainer`` without logger, progress bar, model summary or checkpoints; ``kwargs``
    add to or override those settings (``max_steps``, ``plugins``, ``callbacks``, ...)."""
    settings = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    return Trainer(**{**settings, **kwargs})


def exit_cleanly() -> None:
    """End a multi-process test script once its results are written (every rank calls it):
    wait for the other ranks, destroy the process group, then leave without the interpreter's finalisation. There, torch's background
    threads (gloo's, the compile workers') have aborted a finished process, about once in
    thirty runs ("terminate called without an active exception", exit -6), failing a test
    whose every result was already written."""
    import os
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank has written its results before rank 0, which the test waits for, leaves
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
