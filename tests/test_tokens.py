"""TokenCounter: the counting rule, exact counts in a real Trainer, and resume."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from helpers import TinyLM, token_loader
from lightning_fpq.lightning.tokens import TokenCounter, count_batch_tokens


def test_counting_rule_for_tensors_tuples_and_dicts():
    ids = torch.zeros(4, 16, dtype=torch.long)
    assert count_batch_tokens(ids) == 64
    assert count_batch_tokens((ids, ids[:, :3])) == 64  # the first item holds the token ids
    assert count_batch_tokens([ids]) == 64
    assert count_batch_tokens({"labels": ids[:1], "input_ids": ids}) == 64
    assert count_batch_tokens({"tokens": ids[:2]}) == 32


def test_counting_rule_errors_say_what_to_do():
    with pytest.raises(ValueError, match=r"keys \['labels'\].*count_tokens="):
        count_batch_tokens({"labels": torch.zeros(2)})
    with pytest.raises(ValueError, match="batch of type str"):
        count_batch_tokens("text")
    with pytest.raises(ValueError, match="count_tokens=3 is not callable"):
        TokenCounter(count_tokens=3)  # type: ignore[arg-type]


def tiny_lm() -> TinyLM:
    """Embedding(32, 8) straight into the head; no logging."""
    return TinyLM(d_model=8, hidden=None, log_loss=False)


def loader(n_batches: int, batch: int = 4, seq: int = 6) -> DataLoader:
    return token_loader(n_batches, batch, seq)


def trainer(tmp_path, **kwargs) -> Trainer:
    base = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    base.update(kwargs)
    return Trainer(**base)


def test_counts_every_batch_once_and_resumes_exactly(tmp_path):
    counter = TokenCounter()
    t = trainer(tmp_path, max_steps=7, callbacks=[counter], enable_checkpointing=False)
    t.fit(tiny_lm(), loader(10))
    assert counter.tokens_seen == 7 * 4 * 6
    t.save_checkpoint(tmp_path / "mid.ckpt")

    resumed = TokenCounter()
    t2 = trainer(tmp_path, max_steps=10, callbacks=[resumed], enable_checkpointing=False)
    t2.fit(tiny_lm(), loader(10), ckpt_path=tmp_path / "mid.ckpt")
    assert resumed.tokens_seen == 10 * 4 * 6


def test_custom_count_function_and_attach_reuses_the_existing_counter(tmp_path):
    counter = TokenCounter(count_tokens=lambda batch: batch[0].shape[0])  # count sequences
    t = trainer(tmp_path, max_steps=3, callbacks=[counter], enable_checkpointing=False)
    t.fit(tiny_lm(), loader(5))
    assert counter.tokens_seen == 3 * 4
    assert TokenCounter.attach(t) is counter
    assert sum(isinstance(c, TokenCounter) for c in t.callbacks) == 1
