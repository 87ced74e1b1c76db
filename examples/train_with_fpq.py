"""Add lightning-fpq to your own LightningModule: three lines in the Trainer.

Run: python examples/train_with_fpq.py [--steps 300]
Your module needs nothing special: its nn.Linear layers are quantized in place (same
Parameters, same state_dict keys); embeddings and the output head `lm_head` stay as they are.
"""

import argparse

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything

from lightning_fpq import CriticalDataMonitor, FPQuantPrecision, ProgressivePrecision
from lightning_fpq.demo.data import ByteCorpusDataModule


class MyByteLM(LightningModule):
    """A deliberately plain model: a causal convolution-free MLP over a context window."""

    def __init__(self, context: int = 64, width: int = 128) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, 32)
        self.pos = torch.nn.Parameter(torch.zeros(context, 32))
        self.mix = torch.nn.Linear(32, width)
        self.hidden = torch.nn.Linear(width, width)
        self.lm_head = torch.nn.Linear(width, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]  # (B, T, 32)
        h = torch.cumsum(h, dim=1) / torch.arange(1, x.shape[1] + 1, device=x.device).unsqueeze(-1)  # causal mean
        h = torch.nn.functional.gelu(self.mix(h))  # (B, T, width)
        h = h + torch.nn.functional.gelu(self.hidden(h))
        return self.lm_head(h)  # (B, T, 256)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    seed_everything(0)
    trainer = Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        plugins=[FPQuantPrecision(recipe="paper", fmt="e2m1", block_size=32)],
        callbacks=[
            CriticalDataMonitor(),  # the paper's law; pass law="my_law.yaml" after `lightning-fpq fit`
            ProgressivePrecision(["e2m1", "e4m3", "bf16"], switch_at=[0.4, 0.75], unit="budget"),
        ],
    )
    data = ByteCorpusDataModule(block_size=64, batch_size=16, samples_per_epoch=args.steps * 16, max_bytes=500_000)
    trainer.fit(MyByteLM(), datamodule=data)
    progressive = next(c for c in trainer.callbacks if isinstance(c, ProgressivePrecision))
    for switch in progressive.history:
        print(f"step {switch['step']}: {switch['from']} -> {switch['to']} at {switch['tokens']:,} tokens")
    print(f"final train loss {trainer.callback_metrics['train/loss']:.4f}")


if __name__ == "__main__":
    main()
