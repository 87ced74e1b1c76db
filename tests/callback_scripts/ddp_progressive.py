"""Two-process DDP run on CPU (gloo): each rank writes what it saw to OUT_DIR/rank<N>.json.

Usage: python ddp_progressive.py OUT_DIR
"""

import json
import sys
from pathlib import Path

from lightning.pytorch import Trainer, seed_everything

from lightning_fpq import CriticalDataMonitor, FPQuantPrecision, ProgressivePrecision
from lightning_fpq.lightning.tokens import TokenCounter

# tests/ holds the shared test model; every DDP rank re-runs this file, so each adds it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TinyLM, exit_cleanly, token_loader  # noqa: E402

BATCH, SEQ = 4, 8


def main(out_dir: Path) -> None:
    seed_everything(0)
    data = token_loader(2 * 12, BATCH, SEQ)
    # global tokens per step = 2 ranks x 32 = 64; switch after 5 and 9 steps
    progressive = ProgressivePrecision(["e2m1", "e4m3", "bf16"], [5 * 64, 9 * 64])
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=12,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        plugins=[FPQuantPrecision(recipe="paper", fmt="e2m1", block_size=16)],
        callbacks=[CriticalDataMonitor(plateau_window=0), progressive],
    )
    trainer.fit(TinyLM(log_loss=False), data)
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
    exit_cleanly()
