"""Exact resume and switching: a resumed run is bit-identical to an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import TinyLM, token_loader
from lightning_fpq import FPQuantPrecision, ProgressivePrecision
from lightning_fpq.lightning.tokens import TokenCounter

BATCH, SEQ = 4, 8
TOKENS_PER_STEP = BATCH * SEQ


def _trainer(tmp_path, callbacks, *, max_steps, plugin=None, **kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        plugins=[plugin or FPQuantPrecision(recipe="paper", fmt="e2m1", block_size=16)],
        callbacks=callbacks,
        **kwargs,
    )


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("explicit_counter", [False, True])
def test_resume_from_a_step_checkpoint_is_bit_identical(tmp_path, explicit_counter):
    # 4 batches an epoch, a checkpoint every 4 steps, a switch after 5 steps of tokens
    def callbacks(ckpt_dir):
        extra = [TokenCounter()] if explicit_counter else []
        return [
            ProgressivePrecision(["e2m1", "e4m3"], [5 * TOKENS_PER_STEP]),
            ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=4, save_top_k=-1),
            *extra,
        ]

    seed_everything(0)
    full = TinyLM()
    whole = _trainer(tmp_path, callbacks(tmp_path / "a"), max_steps=8)
    whole.fit(full, token_loader(4, BATCH, SEQ, seed=1))
    ckpt = next((tmp_path / "a").glob("*step=4.ckpt"))
    assert torch.load(ckpt, weights_only=False)["callbacks"]["TokenCounter"]["tokens_seen"] == 4 * TOKENS_PER_STEP

    seed_everything(0)
    resumed_model = TinyLM()
    resumed = _trainer(tmp_path, callbacks(tmp_path / "b"), max_steps=8)
    resumed.fit(resumed_model, token_loader(4, BATCH, SEQ, seed=1), ckpt_path=ckpt)
    progressive = next(c for c in resumed.callbacks if isinstance(c, ProgressivePrecision))
    assert [h["step"] for h in progressive.history] == [5]
    for key, value in _weights(full).items():
        assert torch.equal(value, _weights(resumed_model)[key]), key


def test_resume_with_philox_noise_is_bit_identical_and_keeps_its_kind(tmp_path):
    # nvfp4 rounds dY stochastically: the resumed run must continue each layer's Philox counter
    # (4 batches an epoch, a checkpoint at the end of the first)
    def plugin(rng="philox"):
        return FPQuantPrecision(recipe="nvfp4", rng=rng)

    def callbacks(ckpt_dir):
        return [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=4, save_top_k=-1)]

    seed_everything(0)
    full = TinyLM()
    _trainer(tmp_path, callbacks(tmp_path / "a"), max_steps=8, plugin=plugin()).fit(
        full, token_loader(4, BATCH, SEQ, seed=1)
    )
    ckpt = next((tmp_path / "a").glob("*step=4.ckpt"))
    saved = torch.load(ckpt, weights_only=False)["FPQuantPrecision"]
    assert saved["rng_kind"] == "philox" and all(v.shape == (2,) for v in saved["rng"].values())

    seed_everything(0)
    resumed_model = TinyLM()
    _trainer(tmp_path, callbacks(tmp_path / "b"), max_steps=8, plugin=plugin()).fit(
        resumed_model, token_loader(4, BATCH, SEQ, seed=1), ckpt_path=ckpt
    )
    for key, value in _weights(full).items():
        assert torch.equal(value, _weights(resumed_model)[key]), key

    with pytest.raises(ValueError, match=r"generators are rng='philox', this run has rng='torch'"):
        _trainer(tmp_path, [], max_steps=8, plugin=plugin("torch")).fit(
            TinyLM(), token_loader(4, BATCH, SEQ, seed=1), ckpt_path=ckpt
        )


def _count_ids(batch) -> int:
    return batch[0].numel()


def _count_rows(batch) -> int:
    return batch[0].shape[0]


def test_two_callbacks_with_different_token_counts_are_an_error(tmp_path):
    from lightning_fpq import CriticalDataMonitor

    callbacks = [
        ProgressivePrecision(["e2m1", "e4m3"], [64], count_tokens=_count_ids),
        CriticalDataMonitor(count_tokens=_count_rows),
    ]
    with pytest.raises(ValueError) as info:
        _trainer(tmp_path, callbacks, max_steps=2).fit(TinyLM(), token_loader(2, BATCH, SEQ, seed=1))
    message = str(info.value)
    assert "_count_ids" in message and "_count_rows" in message
    assert "ProgressivePrecision" in message and "CriticalDataMonitor" in message


def test_an_explicit_counter_and_a_callback_count_must_agree(tmp_path):
    callbacks = [
        TokenCounter(count_tokens=_count_rows),
        ProgressivePrecision(["e2m1", "e4m3"], [64], count_tokens=_count_ids),
    ]
    with pytest.raises(ValueError, match="_count_rows.*_count_ids|_count_ids.*_count_rows"):
        _trainer(tmp_path, callbacks, max_steps=2).fit(TinyLM(), token_loader(2, BATCH, SEQ, seed=1))
    # the same function, or none, is fine
    same = [
        TokenCounter(count_tokens=_count_ids),
        ProgressivePrecision(["e2m1", "e4m3"], [64], count_tokens=_count_ids),
    ]
    _trainer(tmp_path, same, max_steps=2).fit(TinyLM(), token_loader(2, BATCH, SEQ, seed=1))


def _checkpoint_after(tmp_path, steps, plugin, callbacks=()):
    seed_everything(0)
    trainer = _trainer(tmp_path, list(callbacks), max_steps=steps, plugin=plugin, enable_checkpointing=False)
    trainer.fit(TinyLM(), token_loader(8, BATCH, SEQ, seed=1))
    path = tmp_path / f"after{steps}.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_a_recipe_passed_on_resume_is_a_deliberate_change_and_is_said(tmp_path):
    ckpt = _checkpoint_after(tmp_path, 2, FPQuantPrecision("paper", fmt="e2m1", block_size=16))
    changed = FPQuantPrecision("paper", fmt="e4m3", block_size=16)
    with pytest.warns(UserWarning, match=r"e2m1.*e4m3|e4m3.*e2m1") as record:
        _trainer(tmp_path, [], max_steps=3, plugin=changed).fit(
            TinyLM(), token_loader(8, BATCH, SEQ, seed=1), ckpt_path=ckpt
        )
    assert changed.recipe.fmt.name == "e4m3"  # the user's recipe, not the checkpoint's
    assert any("checkpoint" in str(w.message) for w in record)


def test_the_same_recipe_on_resume_restores_the_switched_one(tmp_path):
    callbacks = [ProgressivePrecision(["e2m1", "e4m3"], [2 * TOKENS_PER_STEP])]
    ckpt = _checkpoint_after(tmp_path, 4, FPQuantPrecision("paper", fmt="e2m1", block_size=16), callbacks)
    plugin = FPQuantPrecision("paper", fmt="e2m1", block_size=16)
    again = [ProgressivePrecision(["e2m1", "e4m3"], [2 * TOKENS_PER_STEP])]
    _trainer(tmp_path, again, max_steps=5, plugin=plugin).fit(
        TinyLM(), token_loader(8, BATCH, SEQ, seed=1), ckpt_path=ckpt
    )
    assert plugin.recipe.fmt.name == "e4m3" and again[0].stage == 1


def test_a_resume_with_another_schedule_is_refused(tmp_path):
    callbacks = [ProgressivePrecision(["e2m1", "e4m3", "bf16"], [2 * TOKENS_PER_STEP, 6 * TOKENS_PER_STEP])]
    ckpt = _checkpoint_after(tmp_path, 4, FPQuantPrecision("paper", fmt="e2m1", block_size=16), callbacks)
    other = [ProgressivePrecision(["e2m1", "bf16"], [2 * TOKENS_PER_STEP])]
    with pytest.raises(ValueError, match=r"schedule.*e4m3"):
        _trainer(tmp_path, other, max_steps=5).fit(TinyLM(), token_loader(8, BATCH, SEQ, seed=1), ckpt_path=ckpt)


class _RecordsFormats(TinyLM):
    def __init__(self):
        super().__init__(log_loss=False)
        self.formats: list[str] = []

    def training_step(self, batch, batch_idx):
        self.formats.append(self.trainer.precision_plugin.recipe.fmt.name)
        return super().training_step(batch, batch_idx)


def test_a_switch_waits_for_the_optimizer_step_boundary(tmp_path):
    model = _RecordsFormats()
    progressive = ProgressivePrecision(["e2m1", "e4m3"], [5 * TOKENS_PER_STEP])  # reached after batch 5
    trainer = _trainer(tmp_path, [progressive], max_steps=4, accumulate_grad_batches=4, enable_checkpointing=False)
    trainer.fit(model, token_loader(16, BATCH, SEQ, seed=1))
    windows = [model.formats[i : i + 4] for i in range(0, len(model.formats), 4)]
    assert all(len(set(window)) == 1 for window in windows), windows
    assert [w[0] for w in windows] == ["e2m1", "e2m1", "e4m3", "e4m3"]  # at the window of batches 8..11
    assert progressive.history[0]["step"] == 2 and progressive.history[0]["tokens"] == 8 * TOKENS_PER_STEP


class _CompiledMLP(TinyLM):
    """TinyLM whose hidden layer and head run under torch.compile (dynamo only: backend="eager")."""

    def __init__(self):
        super().__init__(log_loss=False)
        self.body = torch.compile(self._body, backend="eager")

    def _body(self, h):
        return self.lm_head(torch.relu(self.hidden(h)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.body(self.emb(x))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


_DYNAMO_KEEPS_FORMATS_STATIC = pytest.mark.skipif(
    torch.__version__ < "2.8",
    reason="torch.compile across a precision switch needs torch >= 2.8: 2.6 and 2.7 make the format's bit "
    "counts symbolic when they recompile after the switch and fail (InternalTorchDynamoError)",
)


@pytest.mark.parametrize("switch_at", [10**9, pytest.param(3 * TOKENS_PER_STEP, marks=_DYNAMO_KEEPS_FORMATS_STATIC)])
def test_compiled_training_has_no_graph_breaks_with_or_without_a_switch(tmp_path, switch_at):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    plugin = FPQuantPrecision("paper", fmt="e2m1", block_size=16)  # auto: backends are cached per stage
    progressive = ProgressivePrecision(["e2m1", "e4m3"], [switch_at])
    trainer = _trainer(tmp_path, [progressive], max_steps=6, plugin=plugin, enable_checkpointing=False)
    trainer.fit(_CompiledMLP(), token_loader(6, BATCH, SEQ, seed=1))
    assert len(progressive.history) == (1 if switch_at < 10**9 else 0)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


@pytest.mark.slow
@pytest.mark.parametrize("rng", ["torch", "philox"])
def test_ddp_resume_gives_each_rank_its_own_stochastic_rounding_generators(tmp_path, rng):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "callback_scripts" / "ddp_rng_resume.py"
    for phase in ("train", "resume"):
        result = subprocess.run(
            [sys.executable, str(script), str(tmp_path), phase, rng], capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
    trained = [json.loads((tmp_path / f"train{r}.json").read_text()) for r in (0, 1)]
    resumed = [json.loads((tmp_path / f"resume{r}.json").read_text()) for r in (0, 1)]
    assert trained[0] and trained[0] != trained[1]  # the ranks draw different noise
    assert resumed == trained  # and each gets its own back


@pytest.mark.parametrize(
    "build, needle",
    [
        (lambda: ProgressivePrecision(["e2m1", "bf16"], [64], count_tokens=5), "count_tokens=5"),
        (lambda: ProgressivePrecision(["e2m1", "bf16"], [64], block_size="chanel"), "'chanel'"),
        (lambda: ProgressivePrecision(["e2m1", "bf16"], "auto", law="/missing.yaml"), "/missing.yaml"),
        (lambda: _monitor(law="papr"), "demo-calibration"),
        (lambda: _monitor(law="/missing.yaml"), "/missing.yaml"),
        (lambda: _monitor(count_tokens="x"), "count_tokens='x'"),
        (lambda: FPQuantPrecision(recipe="fp8", fmt="e2m1"), "8-bit"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_valid_choices(build, needle):
    with pytest.raises(ValueError) as info:
        build()
    assert needle in str(info.value)


def _monitor(**kwargs):
    from lightning_fpq import CriticalDataMonitor

    return CriticalDataMonitor(**kwargs)
