"""The demo GPT: causal, named configs of the documented sizes, and it learns on CPU."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_fpq.demo.data import ByteCorpusDataModule
from lightning_fpq.demo.model import GPT, GPT_CONFIGS, GPTConfig, GPTLightning, cosine_with_warmup, lm_loss


def _prefix_logits_change(model: GPT, T: int, t: int) -> tuple[float, float]:
    """Change token ``t`` of a random sequence; return the largest logit change at positions
    ``< t`` (must be 0 for a causal model) and at positions ``>= t`` (must not be)."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, model.config.vocab_size, (2, T), generator=g)
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)  # (B, T, V)
    return (a[:, :t] - b[:, :t]).abs().max().item(), (a[:, t:] - b[:, t:]).abs().max().item()


@pytest.mark.parametrize("t", [1, 17, 63])
def test_model_is_causal(t):
    torch.manual_seed(0)
    model = GPT("tiny").eval()
    past, future = _prefix_logits_change(model, 64, t)
    assert past == 0.0  # nothing at positions < t may depend on token t
    assert future > 1e-4  # ... while position t itself (and later) does


def test_causality_check_catches_a_model_that_sees_its_target(monkeypatch):
    # A trap listed in docs/architecture.md ("Known traps"): attention without the causal mask lets position t see
    # token t + 1, the one it predicts. The check above must fail on such a model.
    sdpa = F.scaled_dot_product_attention

    def leaky_attention(q, k, v, dropout_p=0.0, is_causal=False, **kwargs):
        return sdpa(q, k, v, dropout_p=dropout_p, is_causal=False)

    monkeypatch.setattr(F, "scaled_dot_product_attention", leaky_attention)
    torch.manual_seed(0)
    past, _ = _prefix_logits_change(GPT("tiny").eval(), 64, 17)
    assert past > 1e-4


def test_forward_shapes_and_initial_loss_is_uniform_guess():
    torch.manual_seed(0)
    model = GPT("tiny")
    idx = torch.randint(0, 256, (4, 64))
    logits = model(idx)
    assert logits.shape == (4, 64, 256)
    # GPT-2 init (std 0.02) gives nearly uniform predictions: loss close to ln 256.
    assert lm_loss(logits, idx).item() == pytest.approx(math.log(256), abs=0.05)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_linear_layers_are_plain_and_named_for_quantization_rules():
    model = GPT("tiny")
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    per_block = {"attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"}
    assert linears == {f"blocks.{i}.{s}" for i in range(2) for s in per_block} | {"lm_head"}
    assert all(type(model.get_submodule(n)) is nn.Linear for n in linears)
    # Untied: the classifier is its own parameter, so a rule can keep it in high precision.
    assert model.lm_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    assert isinstance(model.tok_emb, nn.Embedding) and isinstance(model.pos_emb, nn.Embedding)


def test_gpt2_style_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_embd=256, n_head=4))
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert model.blocks[0].attn.qkv.bias.abs().max() == 0


@pytest.mark.parametrize("name", ["tiny", "demo", "small"])
def test_named_config_parameter_counts_match_the_model(name):
    cfg = GPTConfig.from_name(name)
    model = GPT(name)
    assert model.num_params() == cfg.num_params()
    assert model.num_params(non_embedding=True) == cfg.num_params(non_embedding=True)
    assert cfg.num_params() - cfg.num_params(non_embedding=True) == (cfg.vocab_size + cfg.block_size) * cfg.n_embd


def test_named_config_sizes():
    # Only the arithmetic for the large ones: they are never built in tests.
    millions = {name: cfg.num_params() / 1e6 for name, cfg in GPT_CONFIGS.items()}
    assert 0.05 < millions["tiny"] < 0.15
    assert 0.5 < millions["demo"] < 3
    assert 8 < millions["small"] < 12
    assert 95 < millions["100m"] < 105
    assert 950 < millions["1b"] < 1050
    assert GPTConfig(bias=False).num_params() == sum(p.numel() for p in GPT(GPTConfig(bias=False)).parameters())
    assert GPTConfig.from_name("DEMO") is GPT_CONFIGS["demo"]


def test_config_errors_name_the_bad_value_and_the_choices():
    with pytest.raises(ValueError, match=r"unknown GPT config 'huge'; valid names: \['100m', '1b', 'demo'"):
        GPTConfig.from_name("huge")
    with pytest.raises(ValueError, match=r"n_embd \(100\) must be divisible by n_head \(3\)"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="lr"):
        GPTLightning("tiny", lr=0.0)


def test_cosine_with_warmup():
    assert cosine_with_warmup(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert cosine_with_warmup(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert cosine_with_warmup(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert cosine_with_warmup(500, 10, 110, 0.1) == pytest.approx(0.1)
    assert cosine_with_warmup(500, 10, None, 0.1) == 1.0


@pytest.fixture
def one_thread():
    # One intra-op thread: the tiny model gains nothing from two, and with parallel test
    # workers on 2 cores, two threads each stall on one another (measured: 5x slower).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_tiny_gpt_learns_on_cpu(tmp_path, one_thread):
    from lightning.pytorch import Callback, Trainer, seed_everything

    class Losses(Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values.append(outputs["loss"].item())

    seed_everything(0, verbose=False)
    steps, losses = 120, Losses()
    # max_steps=None: the cosine's length comes from the trainer's estimate (120 steps).
    module = GPTLightning("tiny", lr=3e-3, warmup_steps=20)
    data = ByteCorpusDataModule(
        block_size=64, batch_size=16, max_bytes=500_000, samples_per_epoch=steps * 16, val_samples=32
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[losses],
    )
    trainer.fit(module, datamodule=data)
    first, last = losses.values[0], sum(losses.values[-10:]) / 10
    # Measured here: first 5.57, mean of the last 10 steps 2.54, val 2.69.
    assert first == pytest.approx(math.log(256), abs=0.1)
    assert last < 3.0
    assert trainer.callback_metrics["val/loss"] < 3.0
    assert "train/loss" in trainer.callback_metrics
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(3e-3 * 0.1, rel=0.05)  # the schedule ended at min_lr_ratio * lr

    # A checkpoint restores into a fresh module with the same hyperparameters and weights.
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    restored = GPTLightning.load_from_checkpoint(path)
    assert restored.config == module.config
    for (k, a), (k2, b) in zip(module.state_dict().items(), restored.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_lightning_cli_parses_the_init_arguments(monkeypatch):
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["lightning-fpq"])  # pytest's own arguments are not ours
    cli = LightningCLI(
        GPTLightning,
        ByteCorpusDataModule,
        run=False,
        args=[
            "--model.config=tiny",
            "--model.lr=0.001",
            "--data.block_size=64",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            "--trainer.max_steps=5",
        ],
    )
    assert cli.model.config == GPT_CONFIGS["tiny"] and cli.model.hparams.lr == 0.001
    assert cli.datamodule.block_size == 64
    # A config can also be spelled out field by field (a dict on the command line or in YAML).
    cli = LightningCLI(
        GPTLightning,
        ByteCorpusDataModule,
        run=False,
        args=[
            '--model.config={"n_layer": 1, "n_embd": 32, "n_head": 2}',
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
        ],
    )
    assert cli.model.config == GPTConfig(n_layer=1, n_embd=32, n_head=2)
