"""Two-process DDP (gloo): stochastic rounding generators survive a checkpoint per rank.

Phase "train": 2 steps of nvfp4 (stochastic rounding on dY), a checkpoint, and each rank's
generator states written to OUT_DIR/train<rank>.json. Phase "resume": a new run restores that
checkpoint and writes the restored states to OUT_DIR/resume<rank>.json.

Usage: python ddp_rng_resume.py OUT_DIR train|resume [torch|philox]  (the plugin's rng, default torch)
"""

import hashlib
import json
import sys
from pathlib import Path

from lightning.pytorch import Trainer, seed_everything

from lightning_fpq import FPQuantPrecision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TinyLM, exit_cleanly, token_loader  # noqa: E402


def main(out_dir: Path, phase: str, rng: str) -> None:
    seed_everything(0)
    plugin = FPQuantPrecision(recipe="nvfp4", rng=rng)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        plugins=[plugin],
    )
    model = TinyLM(log_loss=False)
    data = token_loader(8, 4, 16)
    ckpt = out_dir / "ckpt.ckpt"
    if phase == "train":
        trainer.fit(model, data)
        trainer.save_checkpoint(ckpt)
    else:
        trainer.fit(model, data, ckpt_path=ckpt)
    rng = plugin.state.state_dict()["rng"]  # this rank's generators, by layer@device
    states = {key: hashlib.sha256(state.numpy().tobytes()).hexdigest() for key, state in sorted(rng.items())}
    (out_dir / f"{phase}{trainer.global_rank}.json").write_text(json.dumps(states))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "torch")
    exit_cleanly()
