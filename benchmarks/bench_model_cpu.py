"""Training speed and early learning of the demo GPT on this CPU (not a test).

Prints, per config: parameters, steps/s and tokens/s of full training steps (forward,
backward, AdamW, LR schedule) at batch ``B x T``, and the training loss along the way, so
the demo's default size can be chosen to learn visibly within its time budget.

    .venv/bin/python benchmarks/bench_model_cpu.py --configs tiny demo --steps 300
    .venv/bin/python benchmarks/bench_model_cpu.py --configs demo --trainer   # through Lightning

Loss is mean nats per byte; ln(256) = 5.55 is a uniform guess.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch

from lightning_fpq.demo.data import ByteCorpusDataModule
from lightning_fpq.demo.model import GPT_CONFIGS, GPTConfig, GPTLightning, lm_loss


def _data(block_size: int, batch_size: int, steps: int, seed: int) -> ByteCorpusDataModule:
    dm = ByteCorpusDataModule(
        block_size=block_size,
        batch_size=batch_size,
        samples_per_epoch=steps * batch_size,
        val_samples=8 * batch_size,
        seed=seed,
    )
    dm.setup("fit")
    return dm


def bench_loop(cfg: GPTConfig, args: argparse.Namespace) -> None:
    """A plain PyTorch loop over the LightningModule's model and optimizer: the model's cost alone."""
    torch.manual_seed(args.seed)
    module = GPTLightning(cfg, lr=args.lr, warmup_steps=args.warmup, max_steps=args.steps)
    opt_cfg = module.configure_optimizers()
    optimizer, scheduler = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    dm = _data(cfg.block_size, args.batch_size, args.steps, args.seed)
    model = module.model.train()
    report = {1, args.steps} | set(range(args.every, args.steps + 1, args.every))
    window, t_window, tokens = [], time.perf_counter(), 0
    t_start, step_times = None, []
    for step, (x, y) in enumerate(dm.train_dataloader(), start=1):
        if step == args.skip + 1:
            t_start, tokens = time.perf_counter(), 0  # the first steps warm up allocators
            cpu_start = time.process_time()
        t_step = time.perf_counter()
        loss = lm_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        tokens += x.numel()
        if step > args.skip:
            step_times.append(time.perf_counter() - t_step)
        window.append(loss.item())
        if step in report:
            dt = time.perf_counter() - t_window
            print(
                f"  step {step:5d}  loss {sum(window) / len(window):.3f} (mean of last {len(window)})"
                f"  {len(window) / dt:6.2f} steps/s"
            )
            window, t_window = [], time.perf_counter()
    elapsed = time.perf_counter() - t_start
    cpu = time.process_time() - cpu_start
    timed = args.steps - args.skip
    # The median step is robust to other processes sharing the CPU; the mean is the wall clock.
    median = sorted(step_times)[len(step_times) // 2]
    tpb = args.batch_size * cfg.block_size
    print(
        f"  => mean {timed / elapsed:.2f} steps/s, {tokens / elapsed:,.0f} tokens/s; "
        f"median step {median * 1e3:.1f} ms = {1 / median:.2f} steps/s, {tpb / median:,.0f} tokens/s "
        f"({args.batch_size} x {cfg.block_size} tokens a step, steps {args.skip + 1}..{args.steps})"
    )
    # CPU seconds per step: with one thread, the wall time the step would take on an idle
    # core, whatever else runs on the machine (with more threads it sums them).
    print(
        f"  => CPU time {cpu / timed * 1e3:.1f} ms a step over {torch.get_num_threads()} thread(s)"
        + (f" = {timed / cpu:.2f} steps/s on an idle core" if torch.get_num_threads() == 1 else "")
    )
    model.eval()
    with torch.no_grad():
        val = [lm_loss(model(x), y).item() for x, y in dm.val_dataloader()]
    print(f"  val loss after {args.steps} steps: {sum(val) / len(val):.3f}")


def bench_trainer(cfg: GPTConfig, args: argparse.Namespace) -> None:
    """The same run through ``lightning.Trainer`` (what the demo does), timed end to end."""
    from lightning.pytorch import Callback, Trainer, seed_everything

    class _Timer(Callback):
        def __init__(self) -> None:
            self.t0 = self.t1 = self.cpu0 = self.cpu1 = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == args.skip:
                self.t0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.t1, self.cpu1 = time.perf_counter(), time.process_time()
            step = batch_idx + 1
            if step % args.every == 0 or step == 1:
                print(f"  step {step:5d}  loss {outputs['loss'].item():.3f}")

    seed_everything(args.seed, verbose=False)
    module = GPTLightning(cfg, lr=args.lr, warmup_steps=args.warmup, max_steps=args.steps)
    timer = _Timer()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    t = time.perf_counter()
    trainer.fit(module, datamodule=_data(cfg.block_size, args.batch_size, args.steps, args.seed))
    total = time.perf_counter() - t
    timed = args.steps - args.skip
    rate = timed / (timer.t1 - timer.t0)
    print(
        f"  => {rate:.2f} steps/s, {rate * args.batch_size * cfg.block_size:,.0f} tokens/s in the loop; "
        f"fit() took {total:.1f} s in all"
    )
    cpu = (timer.cpu1 - timer.cpu0) / timed
    print(f"  => CPU time {cpu * 1e3:.1f} ms a step over {torch.get_num_threads()} thread(s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "demo"], choices=sorted(GPT_CONFIGS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=None, help="default: the config's block_size")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--every", type=int, default=50, help="print the loss every N steps")
    p.add_argument("--skip", type=int, default=5, help="untimed warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--trainer", action="store_true", help="run through lightning.Trainer")
    args = p.parse_args()
    if args.skip >= args.steps:
        p.error(f"--skip ({args.skip}) must be smaller than --steps ({args.steps})")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; uniform loss ln 256 = {math.log(256):.3f}")
    for name in args.configs:
        cfg = GPTConfig.from_name(name)
        if args.block_size is not None:
            cfg = dataclasses.replace(cfg, block_size=args.block_size)
        print(f"{name}: {cfg.short_str()}, batch {args.batch_size} x {cfg.block_size}, lr {args.lr}")
        (bench_trainer if args.trainer else bench_loop)(cfg, args)


if __name__ == "__main__":
    main()
