"""Throughput of the Triton kernels on a CUDA GPU, as ratios measured in the same run (not a test).

- Quantize (``quantize_triton`` / ``pack_triton``): GB/s of bytes the kernel must move (read
  x, write the output or the codes plus scales), and the ratio to ``x.clone()`` of the same
  tensor (read + write every element once: the memory-traffic limit of fake quantization).
- FP4 GEMM (``gemm_fp4``): TFLOP/s (2*M*N*K / time) for LLM shapes, M = 8192 tokens and
  K = N from 2048 to 8192, against ``torch.matmul`` in bf16 and ``torch._scaled_mm`` in FP8
  E4M3 (per-tensor scales; sm_89+). Each GEMM's output is checked against dequantize-then-
  matmul before it is timed.

Every figure is the median of ``--repeats`` timings (``triton.testing.do_bench``, CUDA
events, L2 flushed between calls), methods interleaved round by round.

    .venv/bin/python benchmarks/bench_kernels.py
    .venv/bin/python benchmarks/bench_kernels.py --quick        # smaller shapes

Without a CUDA device (or without triton) it prints why it cannot run and exits 0: the
interpreter (TRITON_INTERPRET=1) says nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from collections.abc import Callable
from typing import Optional


def _cannot_run() -> Optional[str]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1: the interpreter runs the kernels on the CPU and its timings mean nothing; unset it on a GPU machine"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False): these benchmarks time GPU kernels"
    from lightning_fpq.kernels import triton_available

    ok, reason = triton_available()
    return None if ok else reason


def _versions() -> str:
    import torch
    import triton

    props = torch.cuda.get_device_properties(0)
    cap = torch.cuda.get_device_capability()
    return (
        f"device: {props.name} (sm_{cap[0]}{cap[1]}, {props.total_memory / 2**30:.0f} GiB, "
        f"{props.multi_processor_count} SMs)\n"
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
        f"python {platform.python_version()}"
    )


def _bench(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each function, interleaved round by round."""
    from triton.testing import do_bench

    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(do_bench(fn, warmup=5, rep=20, return_mode="median"))
    return {name: statistics.median(t) for name, t in times.items()}


def bench_quantize(rows: int, cols: int, repeats: int) -> None:
    import torch

    from lightning_fpq.kernels import pack_triton, quantize_triton
    from lightning_fpq.quantize import quantize

    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    n = x.numel()
    elem = x.element_size()
    cases: dict[str, tuple[Callable[[], object], float]] = {
        "clone (bf16)": (lambda: x.clone(), 2 * n * elem),
        "fake e2m1 B=32 fp32 scales, rows": (lambda: quantize_triton(x, "e2m1", block_size=32), 2 * n * elem),
        "fake e2m1 B=32 fp32 scales, columns": (
            lambda: quantize_triton(x, "e2m1", block_size=32, axis=0),
            2 * n * elem,
        ),
        "fake e2m1 B=16 e4m3 scales (NVFP4)": (
            lambda: quantize_triton(x, "e2m1", block_size=16, scale_format="e4m3"),
            3 * n * elem,
        ),  # + amax pass
        "fake e4m3 B=128 fp32 scales": (lambda: quantize_triton(x, "e4m3", block_size=128), 2 * n * elem),
        "fake e2m1 B=32 stochastic (seed)": (
            lambda: quantize_triton(x, "e2m1", block_size=32, rounding="stochastic", seed=1),
            2 * n * elem,
        ),
        "pack e2m1 B=32 e8m0 scales": (
            lambda: pack_triton(x, "e2m1", block_size=32, scale_format="e8m0"),
            n * elem + n / 2 + 4 * n / 32,
        ),
        "pack e2m1 B=32 e8m0 scales, columns": (
            lambda: pack_triton(x, "e2m1", block_size=32, axis=0, scale_format="e8m0"),
            n * elem + n / 2 + 4 * n / 32,
        ),
    }
    # Correctness before speed: the kernel against the reference on the same data.
    ref = quantize(x, "e2m1", block_size=32, backend="reference")
    if not torch.equal(quantize_triton(x, "e2m1", block_size=32), ref):
        print("!! quantize_triton differs from the reference on this device: timings below are of a wrong kernel")
    ms = _bench({name: fn for name, (fn, _) in cases.items()}, repeats)
    base = ms["clone (bf16)"]
    print(f"\nquantize, x: ({rows}, {cols}) bf16 ({n * elem / 2**20:.0f} MiB)")
    print(f"{'':44s} {'ms':>8s} {'GB/s':>8s} {'clone/this':>11s}")
    for name, (_, nbytes) in cases.items():
        print(f"{name:44s} {ms[name]:8.3f} {nbytes / ms[name] / 1e6:8.0f} {base / ms[name]:11.2f}")


def bench_gemm(m: int, sizes: list[int], repeats: int) -> None:
    import torch

    from lightning_fpq.kernels import fp8_tensor_cores_available, gemm_fp4, pack_triton
    from lightning_fpq.kernels.gemm_fp4 import choose_path
    from lightning_fpq.packing import unpack

    fp8_ok, fp8_reason = fp8_tensor_cores_available()
    print(f"\nFP4 GEMM, M = {m}; FP8 tensor cores: {fp8_reason}")
    header = f"{'K = N':>6s} {'method':34s} {'ms':>8s} {'TFLOP/s':>8s} {'vs bf16':>8s} {'vs fp8':>8s}"
    print(header)
    for kn in sizes:
        k = n = kn
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        fns: dict[str, Callable[[], object]] = {"torch.matmul bf16": lambda x=x, w=w: x @ w.T}
        if fp8_ok:
            x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
            one = torch.ones((), device="cuda")
            fns["torch._scaled_mm fp8 e4m3"] = lambda x8=x8, w8=w8, one=one: torch._scaled_mm(
                x8, w8.T, one, one, out_dtype=torch.bfloat16
            )
        for block, sf in ((32, "e8m0"), (128, "fp32"), (16, "e4m3")):
            # Packed from fp32 copies so that unpack() dequantizes in fp32 for the check
            # (the codes and scales are the same as from the bf16 tensors).
            a = pack_triton(x.float(), "e2m1", block_size=block, scale_format=sf)
            b = pack_triton(w.float(), "e2m1", block_size=block, scale_format=sf)
            path = choose_path(block, sf, torch.cuda.get_device_capability())[0]
            out = gemm_fp4(a, b, out_dtype=torch.float32)
            exp = unpack(a) @ unpack(b).T
            rel = float((out - exp).abs().max() / exp.abs().max())
            del exp
            if rel > 1e-4:
                print(f"!! gemm_fp4 B={block} ({path}) differs from dequantize-then-matmul by {rel:.2e} (relative)")
            fns[f"gemm_fp4 B={block} {sf} ({path})"] = lambda a=a, b=b: gemm_fp4(a, b, out_dtype=torch.bfloat16)
            if path != "bf16":
                fns[f"gemm_fp4 B={block} {sf} (bf16)"] = lambda a=a, b=b: gemm_fp4(
                    a, b, out_dtype=torch.bfloat16, path="bf16"
                )
        ms = _bench(fns, repeats)
        flops = 2 * m * n * k
        bf16 = ms["torch.matmul bf16"]
        fp8 = ms.get("torch._scaled_mm fp8 e4m3")
        for name, t in ms.items():
            vs_fp8 = f"{fp8 / t:8.2f}" if fp8 else f"{'-':>8s}"
            print(f"{kn:6d} {name:34s} {t:8.3f} {flops / t / 1e9:8.1f} {bf16 / t:8.2f} {vs_fp8}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    reason = _cannot_run()
    if reason is not None:
        print(f"bench_kernels: cannot run here: {reason}")
        return 0
    print(_versions())
    from lightning_fpq.kernels import dot_scaled_available, fp8_tensor_cores_available, triton_available

    for check in (triton_available, fp8_tensor_cores_available, dot_scaled_available):
        print(f"{check.__name__}: {check()}")
    repeats = 3 if args.quick else args.repeats
    if args.quick:
        bench_quantize(4096, 4096, repeats)
        bench_gemm(2048, [2048], repeats)
    else:
        bench_quantize(8192, 8192, repeats)
        bench_gemm(8192, [2048, 4096, 8192], repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
