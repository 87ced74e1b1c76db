"""Two-process DDP run on CPU (gloo): each rank writes what it saw to OUT_DIR/rank<N>.json.

Usage: python ddp_progressive.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from lightning_fpq import CriticalDataMonitor, FPQuantPrecision, ProgressivePrecision
from lightning_fpq.lightning.tokens import TokenCounter

BATCH, SEQ = 4, 8


class TinyLM(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)
        self.hidden = torch.nn.Linear(16, 32)
        self.lm_head = torch.nn.Linear(32, 32)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.lm_head(torch.relu(self.hidden(self.emb(x))))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out_dir: Path) -> None:
    seed_everything(0)
    x = torch.randint(0, 32, (2 * 12 * BATCH, SEQ))
    data = DataLoader(TensorDataset(x, x.roll(1, -1)), batch_size=BATCH)
    # global tokens per step = 2 ranks x 32 = 64; switch after 5 and 9 steps
    progressive = ProgressivePrecision(["e2m1", "e4m3", "bf16"], [5 * 64, 9 * 64])
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=12, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        plugins=[FPQuantPrecision(recipe="paper", fmt="e2m1", block_size=16)],
        callbacks=[CriticalDataMonitor(plateau_window=0), progressive],
    )
    trainer.fit(TinyLM(), data)
    counter = next(c for c in trainer.callbacks if isinstance(c, TokenCounter))
    report = {
        "rank": trainer.global_rank,
        "tokens_seen": counter.tokens_seen,
        "history": progressive.history,
        "final_recipe": trainer.precision_plugin.recipe.short_str(),
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
