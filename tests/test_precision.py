"""FPQuantPrecision in a single-process Trainer: conversion, autocast, recipe switches,
checkpoints, errors, the torchao backend, LightningCLI, and training sanity per recipe family."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

import lightning as L  # noqa: E402

from fpq_helpers import LossRecorder, datamodule, model, quiet, trainer  # noqa: E402
from lightning_fpq.lightning.precision import FPQuantPrecision  # noqa: E402
from lightning_fpq.linear import QuantLinear  # noqa: E402
from lightning_fpq.recipe import LayerRule, QuantRecipe  # noqa: E402

quiet()


# ------------------------------------------------------------------ construction
@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(recipe="papr"), "'papr'"),
        (dict(recipe="paper", fmt="e9m1"), "e9m1"),
        (dict(recipe="paper", block_size=-1), "-1"),
        (dict(compute_dtype="int8"), "'int8'"),
        (dict(backend="trition"), "'trition'"),
        (dict(seed="x"), "'x'"),
        (dict(recipe=3), "3"),
        (dict(cache_weights="yes"), "'yes'"),
        (dict(save_quantized_weight=1), "1"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, needle):
    with pytest.raises(ValueError) as info:
        FPQuantPrecision(**kwargs)
    assert needle in str(info.value)


def test_recipe_forms(tmp_path):
    assert FPQuantPrecision("paper", fmt="e2m1", block_size=64).recipe == QuantRecipe.from_name(
        "paper", fmt="e2m1", block_size=64
    )
    r = QuantRecipe.from_name("nvfp4", rules=[LayerRule("*.blocks.1.*", recipe="bf16")])
    assert FPQuantPrecision(r).recipe is r
    r.to_yaml(tmp_path / "r.yaml")
    plugin = FPQuantPrecision(str(tmp_path / "r.yaml"))
    assert plugin.recipe == r
    assert FPQuantPrecision(compute_dtype="bf16").precision == "bf16-mixed"
    assert "paper e4m3 B=128" in repr(FPQuantPrecision())


# -------------------------------------------------------------------- conversion
def test_convert_module_keeps_parameters_and_keys():
    m = model()
    params = {n: p for n, p in m.named_parameters()}
    keys = list(m.state_dict())
    plugin = FPQuantPrecision("paper", fmt="e2m1")
    out = plugin.convert_module(m)
    assert out is m
    assert all(p is params[n] for n, p in m.named_parameters())
    assert list(m.state_dict()) == keys
    quant = [n for n, mod in m.named_modules() if isinstance(mod, QuantLinear)]
    assert len(quant) == 8 and "model.lm_head" not in quant
    assert type(m.model.lm_head) is nn.Linear
    assert "model.blocks.0.attn.qkv" in plugin.describe()


def test_no_matching_layer_warns():
    with pytest.warns(UserWarning, match="no nn.Linear layer matches"):
        FPQuantPrecision(QuantRecipe.from_name("paper", include=["nothing.*"])).convert_module(model())


class DtypeProbe(L.Callback):
    def __init__(self):
        self.dtypes = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        def hook(mod, inp, out):
            self.dtypes.add(out.dtype)

        self.handle = pl_module.model.blocks[0].mlp.fc.register_forward_hook(hook)

    def on_train_batch_end(self, *args):
        self.handle.remove()


def test_compute_dtype_autocasts_on_the_model_device():
    probe = DtypeProbe()
    plugin = FPQuantPrecision("paper", fmt="e4m3", compute_dtype="bf16")
    m = model(steps=2)
    trainer(2, plugin, [probe]).fit(m, datamodule())
    assert plugin._device_type == "cpu" and probe.dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in m.parameters())  # fp32 master weights


# ------------------------------------------------------- switches and checkpoints
class SwitchAt(L.Callback):
    """Switch the recipe at a batch boundary and record the optimizer state around it."""

    def __init__(self, step, recipe):
        self.step, self.recipe = step, recipe
        self.before = self.after = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            opt = trainer.optimizers[0]
            w = pl_module.model.blocks[0].mlp.fc.weight
            self.weight = w
            self.before = (opt.state[w]["exp_avg"], opt.state[w]["exp_avg"].clone(), int(opt.state[w]["step"]))
            trainer.precision_plugin.set_recipe(self.recipe)

    def on_train_end(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        w = pl_module.model.blocks[0].mlp.fc.weight
        self.after = (
            w is self.weight,
            opt.state[w]["exp_avg"],
            int(opt.state[w]["step"]),
            any(p is w for g in opt.param_groups for p in g["params"]),
        )


def test_recipe_switch_mid_training_keeps_optimizer_state(tmp_path):
    new = QuantRecipe.from_name("full", fmt="e2m1", block_size=32)
    switch = SwitchAt(4, new)
    plugin = FPQuantPrecision("paper", fmt="e4m3")
    m = model(steps=8)
    trainer(8, plugin, [switch]).fit(m, datamodule())
    assert plugin.recipe == new
    assert m.model.blocks[0].mlp.fc.spec == new.layer_spec("model.blocks.0.mlp.fc")
    same_param, exp_avg, step, in_optimizer = switch.after
    assert same_param and in_optimizer
    assert exp_avg is switch.before[0]  # the very state tensor, updated in place
    assert step == switch.before[2] + 4  # Adam's step count continued across the switch
    assert not torch.equal(exp_avg, switch.before[1])


def test_checkpoint_restores_the_active_recipe(tmp_path):
    new = QuantRecipe.from_name("mxfp4", rules=[LayerRule("*.blocks.0.*", recipe="bf16")])
    plugin = FPQuantPrecision("paper", fmt="e4m3", seed=5)
    t = trainer(6, plugin, [SwitchAt(3, new)], enable_checkpointing=True, default_root_dir=tmp_path)
    t.fit(model(steps=6), datamodule())
    ckpt = tmp_path / "last.ckpt"
    t.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["FPQuantPrecision"]["recipe"] == new.to_dict()
    resumed = FPQuantPrecision("paper", fmt="e4m3")
    m2 = model(steps=8)
    from lightning_fpq.demo.model import GPTConfig

    with torch.serialization.safe_globals([GPTConfig]):  # the hparams hold a GPTConfig
        trainer(8, resumed).fit(m2, datamodule(), ckpt_path=ckpt)
    assert resumed.recipe == new
    assert m2.model.blocks[0].mlp.fc.spec.is_identity and m2.model.blocks[1].mlp.fc.spec.p1.scale_format == "e8m0"
    # the quantized model's checkpoint loads into a plain, unconverted model
    plain = model()
    plain.load_state_dict(saved["state_dict"])


# -------------------------------------------------------------------------- errors
def test_fsdp1_is_refused_with_a_message_that_says_what_to_use():
    """Lightning's FSDPStrategy refuses any plugin but FSDPPrecision in its precision_plugin setter
    (the Trainer assigns the plugin through it); the message it builds then names the fix.
    (On a CPU-only machine ``Trainer(strategy="fsdp")`` stops earlier: FSDP1 needs a GPU.)"""
    from lightning.pytorch.strategies import FSDPStrategy

    for make in (
        lambda: FSDPStrategy(precision_plugin=FPQuantPrecision()),
        lambda: setattr(FSDPStrategy(), "precision_plugin", FPQuantPrecision()),
    ):
        with pytest.raises(TypeError) as info:
            make()
        message = str(info.value)
        assert "FSDPPrecision" in message and "ModelParallelStrategy" in message and "fully_shard" in message
    assert (
        "ModelParallelStrategy" not in str(FPQuantPrecision())
        and "ModelParallelStrategy" not in f"{FPQuantPrecision()}"
    )


def test_model_wrapped_in_fsdp1_is_refused():
    from lightning_fpq.lightning.quantized_precision import _refuse_fsdp1

    class FakeFSDP(torch.distributed.fsdp.FullyShardedDataParallel):
        def __init__(self):
            nn.Module.__init__(self)

    with pytest.raises(TypeError, match="ModelParallelStrategy"):
        _refuse_fsdp1(nn.Sequential(FakeFSDP()))


# ------------------------------------------------------------------------ torchao
def test_torchao_fp8_agrees_with_the_emulated_reference():
    """torchao's float8 linear (emulated on CPU) against our emulation of the same fp8 recipe.

    Both scale by fmt.max / amax in fp32 and round to nearest, so the operands agree; torchao
    divides by the scale after the cast exactly as the fake quantizer does. Measured here:
    bit-identical outputs and gradients for tensorwise and rowwise; the stated tolerance is
    rtol = atol = 1e-6 (an fp32 GEMM summation-order difference), far below FP8's 2**-4.
    """
    from lightning_fpq import backends

    if not backends.machine_available("torchao")[0]:
        pytest.skip(backends.machine_available("torchao")[1])
    for block in ("tensor", "channel"):
        recipe = QuantRecipe.from_name("fp8", block_size=block)
        outs = {}
        for backend in ("emulated", "torchao"):
            torch.manual_seed(0)
            layer = QuantLinear(64, 48, recipe=recipe)
            layer._fpq_state.set_backend(backend)
            x = torch.randn(4, 16, 64, requires_grad=True)
            y = layer(x)
            y.backward(torch.randn_like(y))
            outs[backend] = (y, x.grad, layer.weight.grad, layer.bias.grad)
        assert layer._fpq_state.layer_backend(layer._fpq_name, x.device) == "torchao_float8"
        for a, b in zip(outs["emulated"], outs["torchao"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_torchao_under_autocast_quantizes_the_master_weight_and_the_incoming_activation():
    """Under bf16 autocast torchao must scale the fp32 master weight and the activation as
    they are (the reference's operands), not bf16 copies of them: the autocast run then gives
    exactly the fp32 run's output rounded once to bf16, and the same gradients for the same
    (bf16-representable) dY."""
    from lightning_fpq import backends

    if not backends.machine_available("torchao")[0]:
        pytest.skip(backends.machine_available("torchao")[1])
    torch.manual_seed(0)
    layer = QuantLinear(64, 48, recipe="fp8")
    layer._fpq_state.set_backend("torchao")
    x0 = torch.randn(32, 64)
    dy = torch.randn(32, 48).to(torch.bfloat16)
    runs = []
    for autocast in (False, True):
        layer.zero_grad()
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        y.backward(dy.to(y.dtype))
        runs.append((y, x.grad, layer.weight.grad, layer.bias.grad))
    (y32, dx32, dw32, db32), (y16, dx16, dw16, db16) = runs
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, y32.to(torch.bfloat16))
    assert torch.equal(dx16, dx32) and torch.equal(dw16, dw32)
    torch.testing.assert_close(db16, db32, rtol=2**-8, atol=0)  # the bias gradient is summed in bf16


def test_torchao_backend_falls_back_with_a_warning_never_a_different_recipe():
    from lightning_fpq import backends

    if not backends.machine_available("torchao")[0]:
        pytest.skip(backends.machine_available("torchao")[1])
    plugin = FPQuantPrecision("paper", fmt="e4m3", backend="torchao")
    net = model()
    plugin.convert_module(net)
    with pytest.warns(UserWarning, match="torchao_float8 cannot compute this spec exactly.*P1 is not quantized"):
        plugin.connect(net, [], [])
    assert plugin.recipe == QuantRecipe.from_name("paper", fmt="e4m3")
    choices = plugin.backend_choices()
    assert {backend for backend, _ in choices.values()} <= {"compiled", "unquantized"}


def test_a_forced_backend_this_machine_cannot_run_raises_with_the_reason():
    from lightning_fpq import backends

    for backend in ("triton", "transformer_engine", "te"):
        ok, reason = backends.machine_available(backend)
        if ok:
            continue
        with pytest.raises(backends.BackendUnavailableError) as info:
            FPQuantPrecision("fp8", backend=backend)
        assert reason in str(info.value) and backends.check_backend(backend) in str(info.value)


def test_auto_logs_its_choice_once_per_stage(caplog):
    import logging

    plugin = FPQuantPrecision("mxfp4")
    net = model()
    plugin.convert_module(net)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        plugin.connect(net, [], [])
        plugin.connect(net, [], [])  # the same stage: said once
        plugin.set_recipe("fp8")
    lines = [r.getMessage() for r in caplog.records if "layer(s) on backend" in r.getMessage()]
    assert len(lines) == 2, lines
    expected = "compiled" if backends_compiled() else "emulated"
    assert f"backend {expected!r}" in lines[0] and "mxfp4" in lines[0] and "fp8" in lines[1]


def backends_compiled() -> bool:
    from lightning_fpq import backends

    return backends.available("compiled", "cpu")[0]


# ---------------------------------------------------------------------- LightningCLI
def test_lightning_cli_takes_the_plugin_by_class_path(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    from lightning_fpq.demo.data import ByteCorpusDataModule
    from lightning_fpq.demo.model import GPTLightning

    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  default_root_dir: {tmp_path}
  accelerator: cpu
  devices: 1
  max_steps: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  plugins:
    - class_path: lightning_fpq.FPQuantPrecision
      init_args:
        recipe: full
        fmt: e2m1
        block_size: 32
        compute_dtype: bf16
model:
  config: tiny
data:
  block_size: 32
  batch_size: 4
  max_bytes: 100000
  val_samples: null
"""
    )
    cli = LightningCLI(
        GPTLightning,
        ByteCorpusDataModule,
        args=["--config", str(config)],
        run=False,
        save_config_kwargs={"overwrite": True},
    )
    plugin = cli.trainer.precision_plugin
    assert isinstance(plugin, FPQuantPrecision)
    assert plugin.recipe == QuantRecipe.from_name("full", fmt="e2m1", block_size=32)
    assert plugin.compute_dtype == torch.bfloat16
    cli.trainer.fit(cli.model, cli.datamodule)
    assert isinstance(cli.model.model.blocks[0].attn.qkv, QuantLinear)


# ----------------------------------------------------------------- training sanity
FAMILIES = [
    ("paper", dict(fmt="e2m1", block_size=32)),
    ("full", dict(fmt="e4m3", block_size=32)),
    ("fp8", {}),
    ("fp4", {}),
    ("nvfp4", {}),
    ("mxfp4", {}),
    ("mxfp8", {}),
    ("bf16", {}),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_loss_falls_for_every_recipe_family(name, kwargs):
    """A 2-block GPT on the stdlib corpus, 80 steps: the loss must fall from ln(256) ~ 5.3 by
    well over a nat (measured: to ~2.75 for every family). Final losses per format are reported
    by benchmarks/bench_step.py, not compared here."""
    L.seed_everything(0)
    rec = LossRecorder()
    plugin = FPQuantPrecision(name, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(80, plugin, [rec]).fit(model(steps=80), datamodule())
    first, last = sum(rec.losses[:10]) / 10, sum(rec.losses[-10:]) / 10
    assert len(rec.losses) == 80 and all(map(lambda v: v == v, rec.losses))  # no NaN
    assert last < first - 1.5, (name, first, last)


def test_a_recipe_switch_changes_backend_without_rebuilding_anything():
    """FP4 -> FP8 -> BF16 with torchao forced: the FP4 stage runs on what auto picks (torchao
    cannot compute it), the FP8 stage on torchao, BF16 unquantized; the same modules and
    Parameter objects throughout, and each stage trains."""
    from lightning_fpq import backends

    if not backends.machine_available("torchao")[0]:
        pytest.skip(backends.machine_available("torchao")[1])
    plugin = FPQuantPrecision("mxfp4", backend="torchao")
    net = model()
    plugin.convert_module(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plugin.connect(net, [], [])
    params = [id(p) for p in net.parameters()]
    modules = [(id(m), type(m)) for m in net.modules()]
    idx = torch.randint(0, 256, (2, 16))
    seen = []
    for recipe in ("mxfp4", "fp8", "bf16"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plugin.set_recipe(recipe)
        net.zero_grad()
        net(idx).float().pow(2).mean().backward()
        assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
        seen.append(sorted({backend for backend, _ in plugin.backend_choices().values()}))
    fp4_backend = "compiled" if backends.available("compiled", "cpu")[0] else "emulated"
    assert seen == [[fp4_backend], ["torchao_float8"], ["unquantized"]]
    assert [id(p) for p in net.parameters()] == params
    assert [(id(m), type(m)) for m in net.modules()] == modules
    assert [h["backends"] for h in plugin.backend_history] == [
        {fp4_backend: 8},
        {"torchao_float8": 8},
        {"unquantized": 8},
    ]


# ------------------------------------------------------------- models as people write them
class _TiedLM(torch.nn.Module):
    """An embedding whose weight the output head shares (BERT's cls.predictions.decoder, GPT-2's lm_head)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)
        self.block = torch.nn.Linear(16, 16)
        self.decoder = torch.nn.Linear(16, 32, bias=False)
        self.decoder.weight = self.emb.weight

    def forward(self, x):
        return self.decoder(torch.relu(self.block(self.emb(x))))


def test_heads_tied_to_an_embedding_stay_unquantized_by_default():
    from lightning_fpq.linear import QuantLinear

    model = _TiedLM()
    FPQuantPrecision("paper").convert_module(model)
    assert isinstance(model.block, QuantLinear) and not isinstance(model.decoder, QuantLinear)
    assert model.decoder.weight is model.emb.weight
    other = _TiedLM()
    FPQuantPrecision("paper", quantize_tied=True).convert_module(other)
    assert isinstance(other.decoder, QuantLinear)


def test_a_rule_that_matches_no_layer_is_a_warning():
    recipe = QuantRecipe.from_name("paper", rules=[LayerRule("*blocks.99.*", recipe="bf16")])
    with pytest.warns(UserWarning, match=r"blocks\.99.*matches no nn.Linear"):
        FPQuantPrecision(recipe).convert_module(_TiedLM())


def test_restore_linears_gives_back_plain_layers_for_export_and_inference():
    from lightning_fpq.linear import QuantLinear, restore_linears

    model = _TiedLM()
    weight, keys = model.block.weight, list(model.state_dict())
    FPQuantPrecision("paper", fmt="e2m1").convert_module(model)
    x = torch.randint(0, 32, (4, 8))
    quantized = model(x)
    assert restore_linears(model) == ["block"]
    assert type(model.block) is torch.nn.Linear and model.block.weight is weight
    assert list(model.state_dict()) == keys and not hasattr(model.block, "_fpq_state")
    plain = model(x)
    expected = model.decoder(torch.relu(torch.nn.functional.linear(model.emb(x), model.block.weight, model.block.bias)))
    assert torch.equal(plain, expected) and not torch.equal(plain, quantized)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


class _Encoder(L.LightningModule):
    """``nn.TransformerEncoder`` (whose eval-mode fast path fuses its linear layers) and a head."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 8)

    def loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.encoder(x)).mean(1), y)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _validating_trainer(tmp_path, plugin):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        plugins=[plugin],
    )


def test_validation_runs_quantized_like_training_with_attention_quantized(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_fpq.attention import QuantMultiheadAttention

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 6, 32), torch.randint(0, 8, (16,))), batch_size=8)
    model = _Encoder()
    plugin = FPQuantPrecision("paper", fmt="e2m1", block_size=16)
    trainer = _validating_trainer(tmp_path, plugin)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validated = trainer.validate(model, data, verbose=False)[0]["val_loss"]
    assert not [w for w in caught if "self_attn" in str(w.message) or "compute dtype" in str(w.message)]
    assert isinstance(model.encoder.layers[0].self_attn, QuantMultiheadAttention)
    assert {"encoder.layers.0.self_attn", "encoder.layers.1.self_attn.out_proj"} <= set(plugin.backend_choices())
    # the quantized loss, computed outside the fast path (train mode; dropout is 0)
    model.train()
    with torch.no_grad():
        expected = torch.stack([model.loss(b) for b in data]).mean()
    assert validated == pytest.approx(float(expected), abs=1e-6)
    plain = FPQuantPrecision("bf16")  # nothing quantized: a different loss, so the check above can fail
    model.encoder.layers[0].linear1._fpq_state.set_recipe(plain.recipe)
    with torch.no_grad():
        unquantized = torch.stack([model.loss(b) for b in data]).mean()
    assert abs(float(unquantized) - validated) > 1e-5


def test_attention_layers_that_stay_unquantized_are_named_with_the_reason(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    class _ZeroAttn(_Encoder):
        def __init__(self):
            super().__init__()
            self.extra = nn.MultiheadAttention(32, 4, add_zero_attn=True, batch_first=True)

        def loss(self, batch):
            x, y = batch
            return nn.functional.cross_entropy(self.head(self.extra(x, x, x)[0]).mean(1), y)

    data = DataLoader(TensorDataset(torch.randn(8, 6, 32), torch.randint(0, 8, (8,))), batch_size=8)
    trainer = _validating_trainer(tmp_path, FPQuantPrecision("paper", fmt="e2m1", block_size=16))
    with pytest.warns(UserWarning, match=r"stay in the compute dtype \(extra: add_zero_attn=True is not converted\)"):
        trainer.validate(_ZeroAttn(), data, verbose=False)
