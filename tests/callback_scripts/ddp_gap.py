"""Two-process DDP (gloo): QuantizationGap averages the ranks' held-out losses, the same on every rank.

Each rank holds out a different batch; after training, each rank writes to OUT_DIR/gap<rank>.json
the callback's history and its own held-out losses with the final weights (measured here by hand).

Usage: python ddp_gap.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything

from lightning_fpq import FPQuantPrecision, QuantizationGap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TinyLM, exit_cleanly, token_loader  # noqa: E402


def loss_fn(module, batch):
    x, y = batch
    h = torch.relu(module.hidden(module.emb(x)))
    return F.cross_entropy(module.lm_head(h).flatten(0, 1), y.flatten())


class PerRankGap(QuantizationGap):
    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        self._batch = next(iter(token_loader(1, 8, 8, seed=10 + trainer.global_rank)))  # each rank its own


def main(out_dir: Path) -> None:
    seed_everything(0)
    plugin = FPQuantPrecision(recipe="full", fmt="e2m1", block_size=16)
    gap = PerRankGap(loss_fn, every_n_steps=2)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        plugins=[plugin],
        callbacks=[gap],
    )
    model = TinyLM(log_loss=False)
    trainer.fit(model, token_loader(8, 4, 8, seed=1))
    model.eval()
    with torch.no_grad():
        quantized = float(loss_fn(model, gap._batch))
        with plugin.state.unquantized():
            unquantized = float(loss_fn(model, gap._batch))
    out = {"history": gap.history, "quantized": quantized, "unquantized": unquantized}
    (out_dir / f"gap{trainer.global_rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    exit_cleanly()
