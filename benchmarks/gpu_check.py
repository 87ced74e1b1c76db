#!/usr/bin/env python3
"""One-shot GPU check of lightning-fpq: exactness of every kernel on the device, and speed.

Runs from a checkout with what the machine has (no install, no package registry): the project
is imported from this checkout (``kernels/`` as ``lightning_fpq.kernels``, as the installed
package maps it); torchao and omegaconf may be missing, and the parts that need them say so and
are skipped. Each section has a time cap (the whole run stays under about 7 minutes on one
H200); a section that fails is reported and the others still run. The report lands in OUT_DIR:
``gpu_check.json`` (every figure) and ``gpu_check.txt`` (what was printed).

Sections:
  env        versions, device, the backend table, which backend ``auto`` picks per recipe, which
             ``gemm_fp4`` path and which layer GEMM (packed FP4 or fake quantization + the
             compute-dtype GEMM) the selection rules take on this device.
  exact      every kernel against the pure-torch reference, bit for bit: the fused quantizer
             (fake-quantized values; nearest and stochastic rounding, the reference drawing the
             same noise on the same device, from torch's generator and from the Philox stream
             of ``rng="philox"``) and the packer (codes and scales) for each named
             recipe's operands, with NaN/inf/subnormal inputs; ``gemm_fp4`` on every path of this
             GPU against the float64 product where fp32 sums are exact, paths against each other
             at K = 4096; host synchronisation of ``gemm_fp4(path="auto")``; the torchao backend
             on shapes ``torch._scaled_mm`` refuses.
  gemm       TFLOP/s at LLM shapes: bf16 ``torch.matmul``, FP8 ``torch._scaled_mm`` with and
             without fast accumulation, dequantize-then-bf16-matmul (what an MX emulation does),
             ``gemm_fp4`` on each path; ratios to bf16 and FP8.
  blackwell  on sm_100+ only: cuBLAS MXFP4 and NVFP4 through ``torch._scaled_mm`` (block scales).
  quant      GB/s of the quantize / pack kernels against ``x.clone()``.
  step       training-step throughput of a GPT per stage (BF16, FP8, FP4), ratios to BF16, with
             each stage's backend; the FP4 stage also with packed FP4 GEMMs forced.

    PYTHONPATH=. python3 benchmarks/gpu_check.py gpu-report                  # on the GPU machine
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_check.py --smoke /tmp/smoke  # CPU: logic only

``--smoke`` runs every section's logic on CPU under Triton's interpreter with tiny shapes; its
timings measure nothing. It prints; it asserts nothing (the exit status is 1 only when a kernel
was not bit-exact or a section raised).
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede triton's first import (docs/architecture.md)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sysconfig  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "exact", "gemm", "blackwell", "quant", "step")
CAPS_S = {"env": 15, "exact": 65, "gemm": 100, "blackwell": 25, "quant": 35, "step": 120}  # sum: 360 s


def use_checkout() -> bool:
    """Import lightning_fpq from this checkout; ``kernels/`` as ``lightning_fpq.kernels``, as the
    installed package maps it (pyproject's package-dir), without installing anything. Returns
    whether this function had to map it (no installed package did)."""
    sys.path.insert(0, str(ROOT))
    mapped = importlib.util.find_spec("lightning_fpq.kernels") is None
    if mapped:
        spec = importlib.util.spec_from_file_location(
            "lightning_fpq.kernels",
            ROOT / "kernels" / "__init__.py",
            submodule_search_locations=[str(ROOT / "kernels")],
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["lightning_fpq.kernels"] = module
        spec.loader.exec_module(module)
    importlib.import_module("lightning_fpq.kernels")
    return mapped


# ====================================================================== report
class Section:
    def __init__(self, name: str, cap_s: float, out: Callable[[str], None]):
        self.name, self.cap_s, self.out = name, cap_s, out
        self.t0 = time.perf_counter()
        self.data: dict[str, Any] = {"status": "ok", "rows": [], "notes": []}

    def over(self) -> bool:
        """Past the time cap: the caller skips what is left (and it is noted once)."""
        if time.perf_counter() - self.t0 < self.cap_s:
            return False
        if "time cap" not in " ".join(self.data["notes"]):
            self.data["status"] = "capped"  # some checks did not run: not "ok"
            self.note(f"time cap of {self.cap_s} s reached: the rest of this section was skipped")
        return True

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.out(f"  {text}")

    def row(self, text: str, **fields: Any) -> None:
        self.data["rows"].append(fields)
        self.out(f"  {text}")

    def skip(self, why: str) -> None:
        self.data["status"] = "skipped"
        self.note(f"skipped: {why}")


class Report:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.lines: list[str] = []
        self.sections: dict[str, dict] = {}
        self.failures: list[str] = []
        self.meta: dict[str, Any] = {}

    def print(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    @contextlib.contextmanager
    def section(self, name: str, cap_s: float):
        self.print(f"\n===== {name} (cap {cap_s:.0f} s)")
        sec = Section(name, cap_s, self.print)
        self.sections[name] = sec.data  # in the report while it runs: a kill keeps its rows
        sec.data["status"] = "running"
        self.write()
        try:
            yield sec
            if sec.data["status"] == "running":
                sec.data["status"] = "ok"
        except Exception:  # every section is independent: report and go on
            sec.data["status"] = "error"
            sec.note(f"section raised:\n{traceback.format_exc()[-3000:]}")
            self.failures.append(f"section {name} raised")
        finally:  # also on SIGTERM (main turns it into SystemExit)
            if sec.data["status"] == "running":
                sec.data["status"] = "interrupted"
            sec.data["seconds"] = round(time.perf_counter() - sec.t0, 1)
            self.print(f"----- {name}: {sec.data['status']}, {sec.data['seconds']} s")
            self.write()  # after every section: a run cut short still leaves what it measured

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        blob = {"meta": self.meta, "sections": self.sections, "failures": self.failures}
        for name, text in (("gpu_check.json", json.dumps(blob, indent=1, default=str)),
                           ("gpu_check.txt", "\n".join(self.lines) + "\n")):  # fmt: skip
            tmp = self.out_dir / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out_dir / name)  # atomic: a kill never leaves half a file


# ====================================================================== helpers
@dataclasses.dataclass
class Ctx:
    device: torch.device
    smoke: bool
    cc: Optional[tuple[int, int]]  # None on CPU

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def guarded(sec: Section, report: Optional[Report], what: str, fn: Callable[[], object]) -> bool:
    """Run one case; if it raises, record a failed row (and a failure) and go on with the next
    case instead of losing the rest of the section. Returns whether it ran."""
    try:
        fn()
        return True
    except Exception as exc:
        sec.row(f"{what}: FAILED {type(exc).__name__}: {str(exc)[:300]}", case=what, failed=True)
        if report is not None:
            report.failures.append(f"{what} raised")
        return False


def timed_ms(ctx: Ctx, fn: Callable[[], object], reps: int = 20, rounds: int = 5) -> float:
    """Milliseconds per call of ``fn``: the median over ``rounds`` of ``reps`` back-to-back calls
    between one pair of CUDA events, so that the GPU does not idle while Python launches the
    next call (a call whose host-side launch takes longer than its kernel is timed at its launch
    rate, which is what a training step gets). On CPU one call, where nothing is measured."""
    fn()
    if ctx.device.type != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, str]:
    """Equal bit for bit up to NaN payloads: dtype, shape, NaN positions, values, signs of zeros."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False, f"{a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return False, f"NaN positions differ ({int((na != nb).sum())})"
    x, y = a[~na], b[~nb]
    bad = (x != y) | (torch.signbit(x) != torch.signbit(y))
    if bad.any():
        return False, f"{int(bad.sum())} of {x.numel()} differ, e.g. {x[bad][:3].tolist()} vs {y[bad][:3].tolist()}"
    return True, ""


def edge_tensor(shape: tuple[int, int], seed: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Values over 40 binades with NaN, +-inf, +-0 and fp32 subnormals mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 20, shape, generator=g).float())
    flat = x.view(-1)
    flat[::17], flat[3::37], flat[1::29] = 0.0, -0.0, float("nan")
    flat[2::31], flat[4::43], flat[5::41] = float("-inf"), float("inf"), 1e-42
    return x.to(dtype).to(device)


def e2m1_operand(rows: int, k: int, block, seed: int, device, scale_format: str = "e8m0"):
    """Random E2M1 codes (all 16) with power-of-two scales 2**[-2, 2], random fp32 ones, or
    NVFP4 ones ("e4m3": E4M3 decode scales s in {1, 1.125, ..., 1.5} under the tensor scale
    t = 2**-3, for which unpack's q / S is exactly q * s * t)."""
    from lightning_fpq.formats import FPFormat
    from lightning_fpq.packing import PackedTensor

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows * k,), generator=g)
    packed = (codes[0::2] | (codes[1::2] << 4)).to(torch.uint8)
    nb = 1 if block == "channel" else k // block
    sbytes = tscale = None
    if scale_format == "e8m0":
        scales = torch.exp2(torch.randint(-2, 3, (rows, nb, 1), generator=g).float())
    elif scale_format == "e4m3":
        sbytes = torch.randint(0x38, 0x3D, (rows, nb, 1), generator=g).to(torch.uint8)
        tscale = torch.tensor([0.125])
        scales = torch.ones(()) / (FPFormat.parse("e4m3").decode(sbytes.long()).float() * tscale)
        sbytes, tscale = sbytes.to(device), tscale.to(device)
    else:
        scales = torch.rand((rows, nb, 1), generator=g) * 3 + 0.5
    shape = torch.Size((rows, k))
    e2m1 = FPFormat.parse("e2m1")
    return PackedTensor(
        packed.to(device), scales.to(device), shape, torch.float32, e2m1, block, 1, 0, scale_format, sbytes, tscale
    )


def recipe_operands():
    """(recipe, label, OperandSpec, axis) of every quantized operand of the named recipes."""
    from lightning_fpq.recipe import QuantRecipe

    out = []
    for name, kw in (("paper", {}), ("full", {}), ("fp8", {}), ("fp8", {"block_size": "channel"}), ("fp4", {}),
                     ("nvfp4", {}), ("mxfp4", {}), ("mxfp8", {})):  # fmt: skip
        spec = QuantRecipe.from_name(name, **kw).layer_spec("fc")
        for label, op, axis in zip(
            ("q1 X", "q2 W", "q3 dY", "q4 W", "q5 dY", "q6 X"), spec.operands, (-1, -1, -1, 0, 0, 0)
        ):
            if op is not None:
                out.append((f"{name}{kw or ''}", label, op, axis))
    return out


# ====================================================================== sections
def env(ctx: Ctx, sec: Section) -> None:
    sec.row(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    for name in ("triton", "torchao", "lightning", "omegaconf", "transformer_engine"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                version = getattr(importlib.import_module(name), "__version__", "?")
            sec.row(f"{name} {version}", package=name, version=version)
        except Exception as exc:
            sec.row(f"{name}: not importable ({type(exc).__name__}: {str(exc)[:120]})", package=name, version=None)
    # Triton builds each kernel's launcher with a C compiler and the Python headers on first use
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    sec.row(f"C compiler: {compiler or 'NONE (Triton cannot build its launchers)'}; Python.h: "
            f"{header if header.is_file() else 'MISSING (Triton cannot build its launchers)'}",
            c_compiler=compiler, python_h=header.is_file())  # fmt: skip
    if ctx.device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        sec.row(f"device {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB",
                device=p.name, cc=f"{p.major}.{p.minor}")  # fmt: skip
    else:
        sec.row(f"device CPU ({platform.machine()}), smoke run: Triton interpreter", device="cpu")
    from lightning_fpq import backends
    from lightning_fpq.backends.triton import packed_gemm_pays
    from lightning_fpq.kernels.gemm_fp4 import choose_path
    from lightning_fpq.recipe import QuantRecipe

    for line in backends.describe_backends(ctx.device).splitlines():
        sec.row(line)
    for name in ("fp8", "mxfp4", "nvfp4", "paper", "full"):
        spec = QuantRecipe.from_name(name).layer_spec("fc")
        chosen, why = backends.choose("auto", spec, ctx.device)
        sec.row(f"auto for {name:6s}: {chosen} ({why[:150]})", recipe=name, backend=chosen)
    for name in ("mxfp4", "nvfp4", "full"):
        op = QuantRecipe.from_name(name).layer_spec("fc").input
        block = op.block_size if isinstance(op.block_size, int) else 0
        path, why = choose_path(block, op.scale_format, ctx.cc)
        pays, reason = packed_gemm_pays(op, op, ctx.cc)
        sec.row(f"{name}: gemm_fp4 auto path {path} ({why}); layer GEMM {'packed' if pays else 'fake quant'}: {reason}",
                recipe=name, path=path, packed=pays)  # fmt: skip


def exact(ctx: Ctx, sec: Section, report: Report) -> None:
    # the GEMMs first: the quantizer cases compile one kernel each and may meet the time cap
    _exact_gemm(ctx, sec, report)
    _host_sync(ctx, sec)
    _torchao_shapes(ctx, sec)
    shape = (24, 80) if ctx.smoke else (512, 1024)
    ops = recipe_operands()
    if ctx.smoke:  # one recipe per scale format and block kind: the logic, at less interpreter time
        ops = [o for o in ops if o[0] in ("mxfp4", "nvfp4", "fp8{'block_size': 'channel'}", "full")]
    seen = set()
    for recipe, label, op, axis in ops:
        key = (op, axis)
        if key in seen or sec.over():
            continue
        seen.add(key)
        case = functools.partial(_exact_operand, ctx, sec, report, recipe, label, op, axis, shape, len(seen))
        guarded(sec, report, f"quantize/pack {recipe} {label} {op.short_str()} axis={axis}", case)


def _exact_operand(ctx: Ctx, sec: Section, report: Report, recipe, label, op, axis, shape, seed: int) -> None:
    """The fused quantizer and the packer on one operand of a named recipe, against the reference."""
    from lightning_fpq.kernels import pack_triton, quantize_triton
    from lightning_fpq.packing import pack
    from lightning_fpq.philox import PhiloxGenerator
    from lightning_fpq.quantize import quantize

    dev = ctx.device
    for dtype in (torch.float32 if " W" in label else torch.bfloat16,):  # as in training: fp32 master W
        x = edge_tensor(shape, seed=seed, dtype=dtype, device=dev)
        kw = dict(block_size=op.block_size, axis=axis, scale_format=op.scale_format, rounding=op.rounding)
        if op.rounding == "stochastic":  # the same draws: one seed, one device
            got = quantize_triton(x, op.fmt, generator=torch.Generator(dev).manual_seed(5), **kw)
            ref = quantize(x, op.fmt, backend="reference", generator=torch.Generator(dev).manual_seed(5), **kw)
        else:
            got = quantize_triton(x, op.fmt, **kw)
            ref = quantize(x, op.fmt, backend="reference", **kw)
        ok, why = bit_equal(got, ref)
        what = f"quantize {recipe} {label} {op.short_str()} axis={axis} {dtype}"
        sec.row(f"{what}: {'bit-exact' if ok else 'DIFFERS ' + why}", kernel="quantize", case=what, exact=ok)
        if not ok:
            report.failures.append(what)
        if op.rounding == "stochastic":  # rng="philox": the kernel's Philox draws against the reference's
            got = quantize_triton(x, op.fmt, generator=PhiloxGenerator(2**40 + 5), **kw)
            ref = quantize(x, op.fmt, backend="reference", generator=PhiloxGenerator(2**40 + 5), **kw)
            ok, why = bit_equal(got, ref)
            what = f"quantize {recipe} {label} {op.short_str()} axis={axis} {dtype} philox"
            sec.row(f"{what}: {'bit-exact' if ok else 'DIFFERS ' + why}", kernel="quantize", case=what, exact=ok)
            if not ok:
                report.failures.append(what)
        if op.fmt.bits <= 16 and op.rounding == "nearest" and op.block_size is not None:
            got_p = pack_triton(x, op.fmt, **kw)
            ref_p = pack(x, op.fmt, **{k: v for k, v in kw.items() if k != "rounding"})
            ok = torch.equal(got_p.codes.cpu(), ref_p.codes.cpu()) and torch.equal(
                got_p.scales.cpu(), ref_p.scales.cpu()
            )
            what = f"pack {recipe} {label} {op.short_str()} axis={axis} {dtype}"
            sec.row(f"{what}: {'bit-exact' if ok else 'DIFFERS'}", kernel="pack", case=what, exact=ok)
            if not ok:
                report.failures.append(what)


def _paths(ctx: Ctx, block, scale_format: str) -> list[str]:
    mx, nv = (block, scale_format) == (32, "e8m0"), (block, scale_format) == (16, "e4m3")
    if ctx.cc is None:  # the interpreter runs every path
        paths = ["bf16", "fp8"] if block == "channel" or block >= 32 else ["bf16"]
        return paths + (["dot_scaled"] if mx or nv else [])
    from lightning_fpq.kernels.gemm_fp4 import choose_path

    paths = ["bf16"]
    if (block == "channel" or block >= 32) and ctx.cc >= (8, 9):
        paths.append("fp8")
    if (mx and ctx.cc >= (9, 0)) or (nv and ctx.cc >= (10, 0)):  # NVFP4: the native MMA only
        paths.append("dot_scaled")
    auto = choose_path(block if isinstance(block, int) else 1 << 30, scale_format, ctx.cc)[0]
    assert auto in paths, (auto, paths)
    return paths


def _exact_gemm(ctx: Ctx, sec: Section, report: Report) -> None:
    from lightning_fpq.packing import unpack

    m, n = (40, 24) if ctx.smoke else (512, 384)
    for k, block, sfmt in ((128, 32, "e8m0"), (128, 16, "e8m0"), (128, 16, "e4m3"), (128, 128, "e8m0"),
                           (128, "channel", "e8m0"), (4096, 32, "e8m0"), (4096, 128, "fp32"),
                           (4096, 16, "fp32")):  # fmt: skip
        if ctx.smoke and k > 128 or sec.over():
            continue
        a = e2m1_operand(m, k, block, 1, ctx.device, sfmt)
        b = e2m1_operand(n, k, block, 2, ctx.device, sfmt)
        # K = 128 with power-of-two scales: every fp32 partial sum is exact, so the float64
        # product is the answer bit for bit; at K = 4096 paths are compared with each other
        ref = unpack(a).double().cpu() @ unpack(b).double().cpu().T
        outs: dict[str, torch.Tensor] = {}
        for path in _paths(ctx, block, sfmt):
            case = functools.partial(_exact_path, sec, report, a, b, ref, k, block, sfmt, path, outs)
            guarded(sec, report, f"gemm_fp4 K={k} B={block} {sfmt} path={path}", case)
        if "fp8" in outs and "bf16" in outs:
            same = torch.equal(outs["fp8"], outs["bf16"])
            sec.row(f"  K={k} B={block}: fp8 path == bf16 path bitwise: {same} (FP8 MMA accumulation promoted exactly)",
                    case=f"fp8==bf16 K={k} B={block}", exact=same)  # fmt: skip
            if not same:
                report.failures.append(f"gemm_fp4 fp8 != bf16 at K={k} B={block}")


def _exact_path(sec: Section, report: Report, a, b, ref, k, block, sfmt: str, path: str, outs: dict) -> None:
    """One gemm_fp4 path against the float64 product (and its bf16 epilogue where required)."""
    from lightning_fpq.kernels import gemm_fp4

    out = gemm_fp4(a, b, path=path).cpu()
    outs[path] = out
    rel = float((out.double() - ref).abs().max() / ref.abs().max())
    exact_ = torch.equal(out, ref.float())
    what = f"gemm_fp4 K={k} B={block} {sfmt} path={path}"
    must = k == 128 and sfmt in ("e8m0", "e4m3")  # e4m3: NVFP4 scales chosen exact
    sec.row(f"{what}: max rel err vs float64 {rel:.1e}, bit-exact {exact_}{' (required)' if must else ''}",
            kernel="gemm_fp4", case=what, exact=exact_, rel_err=rel)  # fmt: skip
    if must and not exact_:
        report.failures.append(what)
    if must:  # the bf16 epilogue: the exact fp32 sum rounded once, nearest-even
        out16 = gemm_fp4(a, b, path=path, out_dtype=torch.bfloat16).cpu()
        same = torch.equal(out16, ref.float().to(torch.bfloat16))
        sec.row(f"{what} out=bf16: bit-exact {same} (required)", kernel="gemm_fp4", case=f"{what} bf16", exact=same)
        if not same:
            report.failures.append(f"{what} out=bf16")
        # the layer's forward: a bf16 bias added to the fp32 sums in the epilogue, then one rounding
        bias = torch.linspace(-40.0, 40.0, ref.shape[1]).to(torch.bfloat16)
        out_b = gemm_fp4(a, b, path=path, out_dtype=torch.bfloat16, bias=bias.to(a.codes.device)).cpu()
        same = torch.equal(out_b, (ref.float() + bias.float()).to(torch.bfloat16))
        sec.row(f"{what} out=bf16 + bias: bit-exact {same} (required)", kernel="gemm_fp4", case=f"{what} bias",
                exact=same)  # fmt: skip
        if not same:
            report.failures.append(f"{what} out=bf16 + bias")


def _host_sync(ctx: Ctx, sec: Section) -> None:
    if ctx.device.type != "cuda":
        sec.note("host synchronisation: needs CUDA (not checked)")
        return
    from lightning_fpq.kernels import gemm_fp4, pack_triton

    x = torch.randn(256, 1024, device="cuda")
    a = pack_triton(x, "e2m1", block_size=32, scale_format="e8m0")
    gemm_fp4(a, a)
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        gemm_fp4(a, a)
        sec.row("gemm_fp4(path='auto'): no host synchronisation", host_sync=False)
    except RuntimeError as exc:
        sec.row(f"gemm_fp4(path='auto') synchronises the host: {str(exc).splitlines()[0][:200]}", host_sync=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _torchao_shapes(ctx: Ctx, sec: Section) -> None:
    from lightning_fpq import backends
    from lightning_fpq.linear import QuantLinear
    from lightning_fpq.recipe import QuantRecipe

    ok, why = backends.machine_available("torchao_float8")
    if not ok:
        sec.note(f"torchao backend on unaligned shapes: skipped ({why})")
        return
    for tokens, d_in, d_out in ((1000, 64, 48), (1024, 24, 48), (1024, 64, 40)):
        for block in ("tensor", "channel"):
            outs = {}
            try:
                for backend in ("emulated", "torchao_float8"):
                    torch.manual_seed(0)
                    layer = QuantLinear(d_in, d_out, recipe=QuantRecipe.from_name("fp8", block_size=block)).to(
                        ctx.device
                    )
                    layer._fpq_state.set_backend(backend)
                    x = torch.randn(tokens, d_in, device=ctx.device, requires_grad=True)
                    with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
                        y = layer(x)
                    y.float().sum().backward()
                    outs[backend] = (y.detach().float(), layer.weight.grad)
                rel = max(
                    float((a - b).abs().max() / b.abs().max()) for a, b in zip(outs["torchao_float8"], outs["emulated"])
                )
                sec.row(f"torchao fp8 {block} tokens={tokens} in={d_in} out={d_out}: ran; max rel diff to emulated {rel:.1e}",
                        case=f"torchao {block} {tokens}x{d_in}x{d_out}", crashed=False, rel_diff=rel)  # fmt: skip
            except Exception as exc:
                sec.row(f"torchao fp8 {block} tokens={tokens} in={d_in} out={d_out}: CRASH {type(exc).__name__}: {str(exc)[:200]}",
                        case=f"torchao {block} {tokens}x{d_in}x{d_out}", crashed=True)  # fmt: skip


def _dequant_bf16(p) -> torch.Tensor:
    """E2M1 codes + scales -> bf16 values (a table lookup and one multiply per block)."""
    lut = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], device=p.codes.device)
    rows = p.shape[0]  # packed along the last axis: one row of codes per row of the operand
    codes = p.codes.view(rows, -1)
    vals = torch.stack((lut[(codes & 0xF).long()], lut[(codes >> 4).long()]), dim=-1).view(rows, -1)
    scales = p.scales.reshape(rows, -1)
    return (vals.view(rows, scales.shape[1], -1) / scales[..., None]).view(rows, -1).to(torch.bfloat16)


def gemm(ctx: Ctx, sec: Section, shapes: list[tuple[int, int, int]]) -> None:
    from lightning_fpq.kernels import gemm_fp4, pack_triton

    dev = ctx.device
    if ctx.smoke:
        shapes = [(64, 48, 128)]
        sec.note("smoke run: timings measure nothing")
    for m, n, k in shapes:
        if sec.over():
            break
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
        fns: dict[str, Callable[[], object]] = {"torch.matmul bf16": lambda x=x, w=w: x @ w.T}
        if ctx.cc is not None and ctx.cc >= (8, 9):
            x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
            one = torch.ones((), device=dev)
            for fast in (False, True):
                fns[f"_scaled_mm fp8 fast_accum={fast}"] = lambda x8=x8, w8=w8, one=one, fast=fast: torch._scaled_mm(
                    x8, w8.T, one, one, out_dtype=torch.bfloat16, use_fast_accum=fast
                )
        for block, sfmt in ((32, "e8m0"), (16, "e4m3"), (128, "fp32")):
            a = pack_triton(x, "e2m1", block_size=block, scale_format=sfmt)
            b = pack_triton(w, "e2m1", block_size=block, scale_format=sfmt)
            fns[f"dequantize->bf16 matmul B={block} {sfmt}"] = lambda a=a, b=b: _dequant_bf16(a) @ _dequant_bf16(b).T
            for path in _paths(ctx, block, sfmt):
                fns[f"gemm_fp4 B={block} {sfmt} {path}"] = lambda a=a, b=b, path=path: gemm_fp4(
                    a, b, out_dtype=torch.bfloat16, path=path
                )
            if block != 128:  # the layer's forward with a bias: in the epilogue, against an fp32 output + a pass
                bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
                fns[f"gemm_fp4 B={block} {sfmt} auto + bias"] = lambda a=a, b=b, bias=bias: gemm_fp4(
                    a, b, out_dtype=torch.bfloat16, bias=bias
                )
                fns[f"gemm_fp4 B={block} {sfmt} auto fp32, + bias after"] = lambda a=a, b=b, bias=bias: (
                    gemm_fp4(a, b, out_dtype=torch.float32) + bias.float()
                ).to(torch.bfloat16)
        res = {}
        for name, fn in fns.items():
            if sec.over():
                break
            try:
                res[name] = timed_ms(ctx, fn)
            except Exception as exc:
                sec.row(
                    f"{name}: FAILED {type(exc).__name__}: {str(exc)[:200]}", shape=[m, n, k], name=name, failed=True
                )
        flops = 2 * m * n * k
        bf16, fp8 = res.get("torch.matmul bf16"), res.get("_scaled_mm fp8 fast_accum=False")
        sec.row(f"M={m} N={n} K={k}")
        for name, ms in res.items():
            tflops = flops / ms / 1e9
            vs = (f"x{bf16 / ms:5.2f} vs bf16" if bf16 else "") + (f"  x{fp8 / ms:5.2f} vs fp8" if fp8 else "")
            sec.row(f"  {name:40s} {ms:8.3f} ms {tflops:8.1f} TFLOP/s  {vs}", shape=[m, n, k], name=name, ms=ms,
                    tflops=tflops, vs_bf16=bf16 / ms if bf16 else None, vs_fp8=fp8 / ms if fp8 else None)  # fmt: skip


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """A (rows, cols) block-scale matrix in cuBLAS's swizzled layout: 128 x 4 tiles, each stored
    as 32 x 16 (rows padded to 128, cols to 4)."""
    rows, cols = scales.shape
    r, c = -(-rows // 128), -(-cols // 4)
    padded = torch.zeros((r * 128, c * 4), dtype=scales.dtype, device=scales.device)
    padded[:rows, :cols] = scales
    blocks = padded.view(r, 128, c, 4).permute(0, 2, 1, 3)
    return blocks.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16).flatten()


def blackwell(ctx: Ctx, sec: Section, shapes: list[tuple[int, int, int]]) -> None:
    from lightning_fpq.kernels import pack_triton

    native = ctx.cc is not None and ctx.cc >= (10, 0)
    if not native and not ctx.smoke:
        sec.skip("cuBLAS FP4 GEMMs need sm_100+" + (f"; this GPU is sm_{ctx.cc[0]}{ctx.cc[1]}" if ctx.cc else ""))
        return
    if ctx.smoke:
        shapes = [(128, 128, 128)]
    for m, n, k in shapes:
        x = torch.randn(m, k, device=ctx.device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=ctx.device, dtype=torch.bfloat16) / k**0.5
        for label, block, sfmt in (("MXFP4", 32, "e8m0"), ("NVFP4", 16, "e4m3")):
            if sec.over():
                return
            a = pack_triton(x, "e2m1", block_size=block, scale_format=sfmt)
            b = pack_triton(w, "e2m1", block_size=block, scale_format=sfmt)
            # cuBLAS takes the decode scales 1/S (E8M0: exact; E4M3: the block scale only, a
            # stand-in for timing, not the two-level values) in its swizzled layout
            inv_a, inv_b = (1.0 / p.scales.reshape(p.shape[0], -1) for p in (a, b))
            sdtype = torch.float8_e8m0fnu if sfmt == "e8m0" else torch.float8_e4m3fn
            sa, sb = to_blocked(inv_a.to(sdtype)), to_blocked(inv_b.to(sdtype))
            a4, b4 = (p.codes.view(p.shape[0], -1).view(torch.float4_e2m1fn_x2) for p in (a, b))
            if not native:
                sec.row(f"{label} M={m} N={n} K={k}: operands and swizzled scales built ({sa.numel()} scales); "
                        "the GEMM needs sm_100+")  # fmt: skip
                continue
            try:
                fn = lambda a4=a4, b4=b4, sa=sa, sb=sb: torch._scaled_mm(a4, b4.T, sa, sb, out_dtype=torch.bfloat16)  # noqa: E731
                ms = timed_ms(ctx, fn)
                tflops = 2 * m * n * k / ms / 1e9
                sec.row(f"cuBLAS {label} M={m} N={n} K={k}: {ms:.3f} ms {tflops:.1f} TFLOP/s", name=label,
                        shape=[m, n, k], ms=ms, tflops=tflops)  # fmt: skip
            except Exception as exc:
                sec.row(f"cuBLAS {label}: FAILED {type(exc).__name__}: {str(exc)[:300]}", name=label, failed=True)


def quant(ctx: Ctx, sec: Section) -> None:
    from lightning_fpq.kernels import pack_triton, quantize_triton
    from lightning_fpq.philox import PhiloxGenerator

    dev = ctx.device
    x = torch.randn((64, 128) if ctx.smoke else (8192, 4096), device=dev, dtype=torch.bfloat16)
    if ctx.smoke:
        sec.note("smoke run: timings measure nothing")
    n, e = x.numel(), x.element_size()
    g = torch.Generator(dev).manual_seed(0)
    philox = PhiloxGenerator(0)
    cases = {  # name: (fn, bytes moved)
        "x.clone() bf16": (lambda: x.clone(), 2 * n * e),
        "pack mxfp4 rows (q1)": (lambda: pack_triton(x, "e2m1", block_size=32, scale_format="e8m0"), n * e + n / 2 + n / 8),
        "pack mxfp4 cols (q6)": (lambda: pack_triton(x, "e2m1", block_size=32, axis=0, scale_format="e8m0"), n * e + n / 2 + n / 8),
        "pack nvfp4 rows": (lambda: pack_triton(x, "e2m1", block_size=16, scale_format="e4m3"), 2 * n * e + n / 2 + n / 4),
        "pack nvfp4 cols stochastic": (lambda: pack_triton(x, "e2m1", block_size=16, axis=0, scale_format="e4m3",
                                                           rounding="stochastic", generator=g), 2 * n * e + 4 * n + n / 2 + n / 4),
        # rng="philox": the draws computed in the kernel, no noise tensor written or read
        "pack nvfp4 cols stochastic philox": (lambda: pack_triton(x, "e2m1", block_size=16, axis=0, scale_format="e4m3",
                                                                  rounding="stochastic", generator=philox), 2 * n * e + n / 2 + n / 4),
        "fake mxfp4 rows": (lambda: quantize_triton(x, "e2m1", block_size=32, scale_format="e8m0"), 2 * n * e),
        "fake e4m3 tensor (fp8)": (lambda: quantize_triton(x, "e4m3", block_size="tensor"), 3 * n * e),
        "fake e4m3 channel cols (fp8 rowwise q6)": (lambda: quantize_triton(x, "e4m3", block_size="channel", axis=0), 2 * n * e),
    }  # fmt: skip
    base = None
    for name, (fn, nbytes) in cases.items():
        if sec.over():
            break
        try:
            ms = timed_ms(ctx, fn)
        except Exception as exc:  # one case failing must not lose the others
            sec.row(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:200]}", name=name, failed=True)
            continue
        base = base or ms
        sec.row(f"{name:42s} {ms:8.3f} ms {nbytes / ms / 1e6:8.0f} GB/s  clone/this {base / ms:5.2f}", name=name,
                ms=ms, gbps=nbytes / ms / 1e6, vs_clone=base / ms)  # fmt: skip


def step(ctx: Ctx, sec: Section, size: str) -> None:
    from lightning_fpq.backends import triton as triton_backend
    from lightning_fpq.demo.model import GPT, GPTConfig, lm_loss
    from lightning_fpq.linear import convert_linears
    from lightning_fpq.state import QuantState

    dev = ctx.device
    batch, seq = (1, 16) if ctx.smoke else (8, 1024)
    size = "tiny" if ctx.smoke else size
    config = dataclasses.replace(GPTConfig.from_name(size), block_size=seq)
    torch.manual_seed(0)
    model = GPT(config).to(dev)
    # the smoke run forces the triton backend (auto never picks the interpreter) to run its logic
    state = QuantState("bf16", backend="triton" if ctx.smoke else "auto")
    convert_linears(model, state)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    data = torch.randint(0, config.vocab_size, (batch, seq + 1), device=dev)
    stages = {
        "bf16": ("bf16", False),
        "fp8": ("fp8", False),
        "fp4": ("mxfp4", False),
        "fp4 packed (forced)": ("mxfp4", True),
    }
    if not triton_backend.machine_available()[0]:
        del stages["fp4 packed (forced)"]
    real_pays, real_gemm = triton_backend.packed_gemm_pays, triton_backend.gemm_packed
    packed_calls = {"n": 0}

    def counted_gemm(*args, **kwargs):  # how many GEMMs really ran packed (the layer looks it up per call)
        packed_calls["n"] += 1
        return real_gemm(*args, **kwargs)

    layer = state.layer_names[0]
    sec.row(f"GPT {size} ({config.num_params() / 1e6:.0f}M parameters), batch {batch} x {seq}, bf16 autocast")

    def run(recipe: str, forced: bool, steps: int) -> float:
        # forced: the packed FP4 GEMM wherever the kernel takes the operands, whatever the rule says
        triton_backend.packed_gemm_pays = (lambda a, b, cc: (True, "forced")) if forced else real_pays
        triton_backend.gemm_packed = counted_gemm
        try:
            state.set_recipe("bf16")  # a fresh choice of backends per stage
            state.set_recipe(recipe)
            state.resolve_backends(dev)
            ctx.sync()
            t = time.perf_counter()
            for _ in range(steps):
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    loss = lm_loss(model(data[:, :-1]), data[:, 1:])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            ctx.sync()
            return (time.perf_counter() - t) / max(steps, 1)
        finally:
            triton_backend.packed_gemm_pays, triton_backend.gemm_packed = real_pays, real_gemm

    for name, (recipe, forced) in list(stages.items()):  # warm-up: compiles outside the timing
        if sec.over():
            return
        packed_calls["n"] = 0
        # smoke: nothing to warm up (time is the interpreter's), one step to count the packed GEMMs
        if not guarded(sec, None, f"  {name} (warm-up)", lambda r=recipe, f=forced: run(r, f, 1 if ctx.smoke else 2)):
            del stages[name]  # a failing stage is reported, the others are still timed
            continue
        chosen = state.resolve_backends(dev)[layer] if recipe != "bf16" else ("unquantized", "")
        if recipe == "fp8" and chosen[0] not in ("torchao_float8", "transformer_engine"):
            note = " [no FP8 GEMM: fake quantization + bf16 GEMMs]"
        else:
            note = ""
        sec.row(f"  {name:20s} backend {chosen[0]}{note}; packed FP4 GEMM calls in the warm-up: {packed_calls['n']}; "
                f"{chosen[1][:120]}", stage=name, backend=chosen[0], packed_gemm_calls=packed_calls["n"],
                real_fp8_gemm=recipe != "fp8" or not note)  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(1 if ctx.smoke else 3):
        for name, (recipe, forced) in stages.items():
            if sec.over():
                break
            guarded(sec, None, f"  {name} (timing)", lambda n=name, r=recipe, f=forced: times[n].append(run(r, f, 1 if ctx.smoke else 5)))  # fmt: skip
    tokens = batch * seq
    base = statistics.median(times["bf16"]) if times["bf16"] else None
    for name, ts in times.items():
        if ts:
            t = statistics.median(ts)
            ratio = base / t if base else float("nan")
            sec.row(f"  {name:20s} {t * 1e3:9.1f} ms/step {tokens / t:11.0f} tokens/s  x{ratio:5.2f} vs bf16",
                    stage=name, ms=t * 1e3, tokens_per_s=tokens / t, vs_bf16=ratio)  # fmt: skip


# ====================================================================== main
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path, help="where gpu_check.json and gpu_check.txt go")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes: the logic only")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--shapes", default="8192x8192x8192,8192x14336x4096", help="MxNxK list for gemm/blackwell")
    ap.add_argument("--size", default="100m", help="GPT size of the step section (lightning_fpq.demo.model)")
    args = ap.parse_args(argv)
    mapped = use_checkout()
    warnings.filterwarnings("ignore", message=".*(Failed to load|TRITON_DEFAULT_FP_FUSION|overflow|divide|invalid).*")
    report = Report(args.out_dir)
    if not args.smoke and not torch.cuda.is_available():
        report.print(
            "gpu_check: cannot run here: no CUDA device (torch.cuda.is_available() is False); --smoke runs its logic on CPU"
        )
        return 0
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        report.print("gpu_check --smoke needs TRITON_INTERPRET=1 before triton is imported")
        return 2
    # run_gpu.sh's timeout sends SIGTERM: unwind (the section in progress is written) and exit 143
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    dev = torch.device("cpu" if args.smoke else "cuda")
    cc = torch.cuda.get_device_capability() if dev.type == "cuda" else None
    ctx = Ctx(dev, args.smoke, cc)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    report.meta = {"argv": sys.argv[1:] if argv is None else argv, "smoke": args.smoke, "torch": torch.__version__,
                   "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                   "kernels_mapped_by_script": mapped, "kernels_from": sys.modules["lightning_fpq.kernels"].__file__}  # fmt: skip
    t0 = time.perf_counter()
    kernels_ok = True
    try:
        from lightning_fpq.kernels import triton_available

        kernels_ok, why = triton_available()
    except Exception as exc:
        kernels_ok, why = False, repr(exc)
    for name in args.only:
        with report.section(name, CAPS_S[name]) as sec:
            # on a GPU the step section runs its BF16 and FP8 stages without Triton; the smoke
            # run forces the triton backend in every stage
            if not kernels_ok and (name not in ("env", "step") or (name == "step" and ctx.smoke)):
                sec.skip(f"the Triton kernels cannot run: {why}")
            elif name == "env":
                env(ctx, sec)
            elif name == "exact":
                exact(ctx, sec, report)
            elif name == "gemm":
                gemm(ctx, sec, shapes)
            elif name == "blackwell":
                blackwell(ctx, sec, shapes)
            elif name == "quant":
                quant(ctx, sec)
            else:
                step(ctx, sec, args.size)
    total = time.perf_counter() - t0
    report.print(f"\ngpu_check done in {total:.0f} s; {len(report.failures)} failure(s)" +
                 "".join(f"\n  {f}" for f in report.failures))  # fmt: skip
    report.meta["seconds"] = round(total, 1)
    report.write()
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
