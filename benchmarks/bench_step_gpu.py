"""Training-step throughput of a GPT per precision stage (BF16, FP8, FP4), as ratios to BF16.

One model and one optimizer; the stages are the recipe switches that ``ProgressivePrecision``
makes (``QuantState.set_recipe``: no module rebuilt, no Parameter replaced), so every stage
times the very same weights and data. A step is forward + backward + fused AdamW under bf16
autocast; stages are interleaved round by round and the median round is reported, in tokens/s
and as a ratio to the BF16 stage measured in the same run. The backend each stage runs on
(``backend="auto"`` unless ``--backend`` forces one) is printed with the reason.

    .venv/bin/python benchmarks/bench_step_gpu.py --size 1b               # H100: ~1B parameters
    .venv/bin/python benchmarks/bench_step_gpu.py --size 100m --compile   # torch.compile the step
    .venv/bin/python benchmarks/bench_step_gpu.py --device cpu --size tiny --steps 1 --rounds 1   # smoke run

Without a CUDA device it says so and exits 0 (unless ``--device cpu`` asks for the smoke run).
Not a test: it prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_fpq import backends  # noqa: E402
from lightning_fpq.demo.model import GPT, GPTConfig, lm_loss  # noqa: E402
from lightning_fpq.linear import convert_linears
from lightning_fpq.state import QuantState  # noqa: E402

# stage label -> named recipe (ProgressivePrecision's FP4 -> FP8 -> BF16 schedule)
STAGES = {"bf16": "bf16", "fp8": "fp8", "fp4": "mxfp4", "nvfp4": "nvfp4"}
# per size: (batch, sequence length)
SHAPES = {"tiny": (4, 64), "demo": (8, 128), "small": (8, 256), "100m": (16, 1024), "1b": (8, 2048)}


def versions(device: torch.device) -> str:
    lines = [f"torch {torch.__version__}, python {platform.python_version()}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        cap = torch.cuda.get_device_capability(device)
        lines.insert(
            0,
            f"device: {props.name} (sm_{cap[0]}{cap[1]}, {props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}",
        )
    else:
        lines.insert(
            0, f"device: CPU ({platform.processor() or platform.machine()}), threads={torch.get_num_threads()}"
        )
    for name in ("triton", "torchao", "transformer_engine"):
        try:
            module = __import__(name)
            lines.append(f"{name} {getattr(module, '__version__', '?')}")
        except Exception as err:  # not installed, or no GPU for it
            lines.append(f"{name}: not importable ({type(err).__name__})")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", default="100m", choices=sorted(SHAPES), help="GPT size (lightning_fpq.demo.model.GPT_CONFIGS)"
    )
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--stages", nargs="+", default=["bf16", "fp8", "fp4"], choices=sorted(STAGES))
    parser.add_argument("--backend", default="auto", help=f"layer backend for every stage, one of {backends.BACKENDS}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per stage and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu (smoke run)")
    args = parser.parse_args(argv)
    backend = backends.check_backend(args.backend)
    if args.device is None and not torch.cuda.is_available():
        print(
            "bench_step_gpu: cannot run here: no CUDA device (torch.cuda.is_available() is False); "
            "--device cpu runs a smoke run"
        )
        return 0
    device = torch.device(args.device or "cuda")
    warnings.filterwarnings("ignore", message=".*Failed to load.*")

    batch, seq = SHAPES[args.size]
    batch, seq = args.batch or batch, args.seq or seq
    config = dataclasses.replace(GPTConfig.from_name(args.size), block_size=seq)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    state = QuantState("bf16", backend=backend)
    converted, _ = convert_linears(model, state)  # every block's Linear; lm_head stays unquantized
    assert converted and "lm_head" not in converted, converted
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    forward = torch.compile(model) if args.compile else model
    g = torch.Generator(device="cpu").manual_seed(0)
    data = [torch.randint(0, config.vocab_size, (batch, seq + 1), generator=g).to(device) for _ in range(4)]

    def step(i: int) -> torch.Tensor:
        idx = data[i % len(data)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = lm_loss(forward(idx[:, :-1]), idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()  # no host sync here: read once a round is timed

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    print(versions(device))
    print(
        f"model: {config.short_str()}, batch {batch} x {seq} tokens, "
        f"bf16 autocast, fused AdamW={fused}, torch.compile={args.compile}; {args.rounds} rounds x {args.steps} steps"
    )

    layer = state.layer_names[0]
    print(f"\nbackend of {layer} (every block Linear alike) per stage:")
    for stage in args.stages:
        state.set_recipe(STAGES[stage])
        chosen, reason = state.resolve_backends(device)[layer]
        print(f"  {stage:<6} {STAGES[stage]:<6} {chosen:<19} {reason}")

    # warm-up: compiles (torch.compile, Triton autotuning, the CPU quantizer) outside the timing
    losses: dict[str, float] = {}

    def switch(stage: str) -> None:
        # as the plugin does at a switch: every layer's backend chosen outside compiled code
        state.set_recipe(STAGES[stage])
        state.resolve_backends(device)

    for stage in args.stages:
        switch(stage)
        for i in range(2):
            losses[stage] = float(step(i))
    sync()
    times: dict[str, list[float]] = {stage: [] for stage in args.stages}
    memory: dict[str, float] = {}
    for _ in range(args.rounds):
        for stage in args.stages:
            switch(stage)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            t = time.perf_counter()
            for i in range(args.steps):
                loss = step(i)
            sync()
            times[stage].append((time.perf_counter() - t) / args.steps)
            losses[stage] = float(loss)
            if device.type == "cuda":
                memory[stage] = torch.cuda.max_memory_allocated(device) / 2**30
    tokens = batch * seq
    base = statistics.median(times[args.stages[0]])
    print(
        f"\n{'stage':<7} {'ms/step':>9} {'tokens/s':>11} {'vs ' + args.stages[0]:>8} {'peak GiB':>9} {'last loss':>10}   (ms min..max)"
    )
    for stage in args.stages:
        t = statistics.median(times[stage])
        mem = f"{memory[stage]:9.1f}" if stage in memory else f"{'-':>9}"
        print(
            f"{stage:<7} {t * 1e3:9.1f} {tokens / t:11.0f} {base / t:8.2f} {mem} {losses[stage]:10.3f}   "
            f"({min(times[stage]) * 1e3:.1f}..{max(times[stage]) * 1e3:.1f})"
        )
    if args.compile:
        from torch._dynamo.utils import counters

        breaks = sum(counters["graph_break"].values())
        print(
            f"\ntorch.compile: {breaks} graph break(s), {counters['stats'].get('unique_graphs', 0)} graph(s) compiled "
            f"(a stage that falls back to eager would show here)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
