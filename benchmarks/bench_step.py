"""Cost of quantized training: a small GPT training step on CPU, unquantized vs each recipe.

    .venv/bin/python benchmarks/bench_step.py                 # timing table (about 3M parameters)
    .venv/bin/python benchmarks/bench_step.py --losses 300    # plus held-out losses per recipe (tiny GPT)

One step = forward + backward + AdamW step on a batch of the demo corpus (stdlib source bytes),
in a plain PyTorch loop (no Trainer overhead). Every variant is timed in the same process, in
interleaved rounds (variant A, B, C, ... then again), and the median over rounds is reported,
so that a machine shared with other jobs slows all variants alike. Ratios are against the
unquantized model (plain ``nn.Linear``). Not a test: it prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_fpq.demo.data import load_corpus  # noqa: E402
from lightning_fpq.demo.model import GPT, GPTConfig, lm_loss  # noqa: E402
from lightning_fpq.linear import convert_linears
from lightning_fpq.recipe import QuantRecipe  # noqa: E402
from lightning_fpq.state import QuantState  # noqa: E402

# name, (recipe name, recipe arguments[, the stochastic-rounding rng: "torch" unless given])
VARIANTS = [
    ("paper e2m1 B=128", ("paper", dict(fmt="e2m1", block_size=128))),
    ("full e4m3 B=128", ("full", dict(fmt="e4m3", block_size=128))),
    ("fp8 tensorwise", ("fp8", {})),
    ("fp4 (DGE+OCC)", ("fp4", {})),
    ("nvfp4", ("nvfp4", {})),
    ("nvfp4 rng=philox", ("nvfp4", {}, "philox")),  # its P3/P5 draws computed in the quantizer
    ("mxfp4", ("mxfp4", {})),
    ("mxfp8", ("mxfp8", {})),
]


def batches(data: torch.Tensor, batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        idx = torch.stack([data[s : s + seq + 1] for s in starts.tolist()]).long()
        yield idx[:, :-1], idx[:, 1:]  # (B, T), (B, T)


def build(config: GPTConfig, recipe, seed: int = 0, backend: str = "auto"):
    torch.manual_seed(seed)
    model = GPT(config)
    if recipe is not None:
        name, kwargs, *rng = recipe
        state = QuantState(QuantRecipe.from_name(name, **kwargs), backend=backend, rng=rng[0] if rng else "torch")
        convert_linears(model, state)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    return model, opt


def step(model, opt, x, y) -> float:
    loss = lm_loss(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def timing(args) -> None:
    config = GPTConfig(block_size=args.seq, n_layer=args.layers, n_head=4, n_embd=args.width)
    data = load_corpus(1_000_000)
    variants = [("unquantized", None)] + [v for v in VARIANTS if args.only is None or any(o in v[0] for o in args.only)]
    runs = {}
    for name, recipe in variants:
        for backend in args.backends if recipe is not None else ["auto"]:
            label = name if len(args.backends) == 1 or recipe is None else f"{name} [{backend}]"
            runs[label] = build(config, recipe, backend=backend)
    n_params = sum(p.numel() for p in runs["unquantized"][0].parameters())
    print(
        f"device: CPU ({platform.processor() or platform.machine()}), threads={torch.get_num_threads()}, "
        f"torch {torch.__version__}, python {platform.python_version()}"
    )
    print(
        f"model: GPT {config.n_layer}x{config.n_embd}, {n_params / 1e6:.2f}M parameters, "
        f"batch {args.batch}x{args.seq} tokens; {args.rounds} rounds x {args.steps} steps, median"
    )
    stream = batches(data, args.batch, args.seq)
    fixed = [next(stream) for _ in range(args.steps)]
    t0 = time.perf_counter()
    for model, opt in runs.values():  # warm-up: compiles the quantizer's kernels
        for x, y in fixed[:2]:
            step(model, opt, x, y)
    print(f"warm-up (includes compiling the quantizer): {time.perf_counter() - t0:.1f} s")
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (model, opt) in runs.items():
            t, c = time.perf_counter(), time.process_time()
            for x, y in fixed:
                step(model, opt, x, y)
            wall[name].append((time.perf_counter() - t) / len(fixed) * 1e3)
            cpu[name].append((time.process_time() - c) / len(fixed) * 1e3)
    base_wall, base_cpu = statistics.median(wall["unquantized"]), statistics.median(cpu["unquantized"])
    print("wall: elapsed ms per step; cpu: process CPU ms per step (robust on a shared machine when threads=1)")
    width = max(20, max(len(name) for name in runs))
    print(f"{'variant':<{width}} {'wall ms':>9} {'ratio':>6} {'cpu ms':>9} {'ratio':>6}   (wall min..max over rounds)")
    for name in runs:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(
            f"{name:<{width}} {w:9.1f} {w / base_wall:6.2f} {c:9.1f} {c / base_cpu:6.2f}   "
            f"({min(wall[name]):.1f}..{max(wall[name]):.1f})"
        )


def losses(args) -> None:
    """Held-out loss per recipe after training a tiny GPT (reported, not compared)."""
    config = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64)
    data = load_corpus(1_200_000)
    train, held_out = data[:1_000_000], data[1_000_000:]
    evals = [next(batches(held_out, 64, 64, seed=s)) for s in range(4)]  # 4 x 64 x 64 tokens
    seeds = list(range(args.seeds))
    print(
        f"\nheld-out loss (nats/byte) after {args.losses} steps: tiny GPT {config.n_layer}x{config.n_embd}, "
        f"batch 16x64, AdamW lr 3e-3, init seeds {seeds}; evaluated with the recipe's forward quantization"
    )
    for name, recipe in [("unquantized", None)] + VARIANTS:
        held = []
        for seed in seeds:
            model, opt = build(config, recipe, seed=seed)
            for group in opt.param_groups:
                group["lr"] = 3e-3
            stream = batches(train, 16, 64, seed=1)
            for _ in range(args.losses):
                step(model, opt, *next(stream))
            with torch.no_grad():
                held.append(statistics.fmean(lm_loss(model(x), y).item() for x, y in evals))
        spread = f"  (min {min(held):.3f}, max {max(held):.3f})" if len(held) > 1 else ""
        print(f"  {name:<20} {statistics.fmean(held):.3f}{spread}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="steps per round and variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", nargs="*", default=None, help="substrings of variant names to time")
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["auto"],
        help="layer backends to time each recipe on (e.g. emulated compiled), default: auto",
    )
    parser.add_argument("--losses", type=int, default=0, help="also train each recipe this many steps")
    parser.add_argument("--seeds", type=int, default=3, help="initialisation seeds per recipe for --losses")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if not args.no_timing:
        timing(args)
    if args.losses:
        losses(args)


if __name__ == "__main__":
    main()
