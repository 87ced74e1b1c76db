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


class _FakeStrategy:
    """A strategy on a non-CPU root device (``meta``), two ranks that see equal batches."""

    def __init__(self, world_size: int):
        self.root_device = torch.device("meta")
        self.world_size = world_size
        self.reduced: list[torch.device] = []


class _FakeTrainer:
    def __init__(self, world_size: int):
        from types import SimpleNamespace

        self.strategy = _FakeStrategy(world_size)
        self.world_size = world_size
        self.batches = SimpleNamespace(ready=0)
        self.fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(total=self.batches)))

    def step(self, counter, batch):
        self.batches.ready += 1
        return counter.observe(self, batch)


def _fake_reduce(strategy):
    def reduce(tensor, reduce_op):
        strategy.reduced.append(tensor.device)
        return torch.tensor(float(pending[0]) * strategy.world_size)  # every rank holds the same count

    pending = [0]
    return reduce, pending


def test_collectives_run_on_the_strategy_root_device_and_only_when_a_decision_needs_them():
    trainer = _FakeTrainer(world_size=2)
    reduce, pending = _fake_reduce(trainer.strategy)
    trainer.strategy.reduce = reduce
    counter = TokenCounter(sync_every=10)
    batch = torch.zeros(4, 8, dtype=torch.long)  # 32 tokens a rank, 64 a step

    def step():
        pending[0] = counter._pending + 32  # what this rank will hold when it syncs
        return trainer.step(counter, batch)

    assert step() == 64  # the first step syncs (no rate known yet)
    assert trainer.strategy.reduced == [torch.device("meta")]
    assert [step() for _ in range(9)] == [64] * 9  # no target watched: no collective for 9 steps
    assert len(trainer.strategy.reduced) == 1
    assert step() == 11 * 64  # the 10th step since the sync (sync_every) syncs
    assert len(trainer.strategy.reduced) == 2
    counter.watch("ProgressivePrecision", 13 * 64)  # a switch once 13 steps of tokens are seen
    assert [step() for _ in range(3)] == [12 * 64, 13 * 64, 14 * 64]  # exact while the target is in reach
    counter.watch("ProgressivePrecision", None)
    assert step() == 14 * 64  # no target: back to every sync_every steps
    assert len(trainer.strategy.reduced) == 5


def test_one_process_counts_without_any_collective():
    trainer = _FakeTrainer(world_size=1)
    counter = TokenCounter()
    assert [trainer.step(counter, torch.zeros(2, 8)) for _ in range(3)] == [16, 32, 48]
    assert trainer.strategy.reduced == []
