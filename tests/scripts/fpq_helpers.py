"""Shared by the plugin tests and the multi-process scripts: a tiny GPT run on the demo corpus."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402

from lightning_fpq.demo.data import ByteCorpusDataModule  # noqa: E402
from lightning_fpq.demo.model import GPTConfig, GPTLightning  # noqa: E402

# 2 blocks, width 32, 8 x 24 tokens a batch: whole 32-element blocks along features and tokens,
# and every operand below the quantizer's compile threshold (no compile time in the tests).
TINY = GPTConfig(block_size=24, n_layer=2, n_head=2, n_embd=32)
SEQ, BATCH = 24, 8


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def datamodule(batch_size: int = BATCH, seq: int = SEQ, max_bytes: int = 400_000) -> ByteCorpusDataModule:
    return ByteCorpusDataModule(block_size=seq, batch_size=batch_size, max_bytes=max_bytes, val_samples=None)


def model(lr: float = 3e-3, steps: int = 100, config: GPTConfig = TINY) -> GPTLightning:
    return GPTLightning(config, lr=lr, warmup_steps=min(10, steps // 5), max_steps=steps)


def trainer(steps: int, plugin=None, callbacks=(), **kwargs) -> L.Trainer:
    defaults = dict(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(plugins=[plugin] if plugin is not None else None, callbacks=list(callbacks), **defaults)


def quiet() -> None:
    """Fewer threads than cores (tests run two at a time) and no Lightning chatter."""
    torch.set_num_threads(max(1, int(os.environ.get("FPQ_TEST_THREADS", "1"))))
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
