"""Two CPU processes over gloo: FPQuantPrecision under DDP or ModelParallelStrategy (FSDP2).

Usage: python tests/scripts/train_distributed.py {ddp,fsdp2} OUT.json

Each rank checks what the plugin promises and rank 0 writes the findings as JSON:
- the converted layers are QuantLinear and keep the very Parameter objects they had before
  conversion (DDP) / their DTensor shards (FSDP2), and the optimizer holds those Parameters;
- under FSDP2 the layers see full, unsharded weights in forward (recorded by a forward hook);
- a recipe switch at step 3 happens on every rank and training goes on (DDP buckets valid);
- after training the ranks hold identical weights, and the losses are finite.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/: helpers.exit_cleanly

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from fpq_helpers import LossRecorder, datamodule, model, quiet, trainer  # noqa: E402
from helpers import exit_cleanly  # noqa: E402
from lightning_fpq.demo.model import GPTLightning  # noqa: E402
from lightning_fpq.lightning.precision import FPQuantPrecision  # noqa: E402
from lightning_fpq.linear import QuantLinear  # noqa: E402
from lightning_fpq.recipe import QuantRecipe  # noqa: E402

STEPS = 6
SWITCH_AT = 3
FIRST = QuantRecipe.from_name("paper", fmt="e2m1", block_size=32)
SECOND = QuantRecipe.from_name("full", fmt="e4m3", block_size=32)


class ShardedGPT(GPTLightning):
    """The demo GPT with FSDP2 applied per block and at the root (ModelParallelStrategy)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


class Probe(L.Callback):
    def __init__(self) -> None:
        self.found: dict = {}
        self.forward_weights: list = []

    def on_fit_start(self, trainer, pl_module) -> None:
        # after configure_model and convert_module: record the Parameters the layers hold now
        layer = pl_module.model.blocks[0].mlp.fc
        self.param_ids = {n: id(p) for n, p in pl_module.named_parameters()}
        self.found["converted"] = sorted(n for n, m in pl_module.named_modules() if isinstance(m, QuantLinear))
        self.found["weight_type"] = type(layer.weight).__name__
        self.found["save_quantized_weight"] = trainer.precision_plugin.state.save_quantized_weight

        def hook(mod, inp):
            w = mod.weight
            self.forward_weights.append((type(w).__name__, tuple(w.shape)))

        self.handle = layer.register_forward_pre_hook(hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == SWITCH_AT:
            trainer.precision_plugin.set_recipe(SECOND)

    def on_train_end(self, trainer, pl_module) -> None:
        self.handle.remove()
        opt = trainer.optimizers[0]
        opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
        self.found["params_kept"] = all(id(p) == self.param_ids[n] for n, p in pl_module.named_parameters())
        self.found["optimizer_holds_params"] = all(id(p) in opt_ids for p in pl_module.parameters())
        self.found["active_recipe"] = trainer.precision_plugin.recipe.short_str()
        self.found["forward_weights"] = sorted(set(self.forward_weights))
        # identical weights on every rank: compare a checksum of the full tensors
        sums = []
        for p in pl_module.parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            sums.append(full.detach().double().sum())
        local = torch.stack(sums)
        gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        self.found["ranks_agree"] = all(torch.equal(g, gathered[0]) for g in gathered)


def main() -> None:
    kind, out = sys.argv[1], Path(sys.argv[2])
    quiet()
    warnings.simplefilter("ignore")
    L.seed_everything(0)
    probe, losses = Probe(), LossRecorder()
    plugin = FPQuantPrecision(FIRST)
    if kind == "ddp":
        strategy, module = "ddp", model(steps=STEPS)
        before = {n: id(p) for n, p in module.named_parameters()}
    elif kind == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        module = ShardedGPT(model(steps=STEPS).config, warmup_steps=1, max_steps=STEPS)
        before = None
    else:
        raise SystemExit(f"unknown kind {kind!r}: expected ddp or fsdp2")
    t = trainer(STEPS, plugin, [probe, losses], devices=2, strategy=strategy)
    t.fit(module, datamodule())
    found = dict(probe.found)
    found["losses"] = losses.losses
    if before is not None:  # DDP: the objects built before fit are the ones trained
        found["params_kept_from_construction"] = all(id(p) == before[n] for n, p in module.named_parameters())
    found["world_size"] = t.world_size
    if t.global_rank == 0:
        out.write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
    exit_cleanly()
