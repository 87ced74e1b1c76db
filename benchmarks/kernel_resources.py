"""Every Triton kernel launch the wrappers make for the named recipes, compiled ahead of time for
real NVIDIA targets without a GPU, and what each compiled kernel costs: registers, spills, shared
memory, and whether its main loop is software-pipelined.

How (no GPU needed, only Triton's NVIDIA backend with its bundled ptxas):

1. *Capture.* The host wrappers (``quantize_triton``, ``pack_triton``, ``gemm_fp4``) run on CPU
   tensors for the operands of one training step of each named recipe at an LLM layer
   (tokens x d_in -> d_out, default 8192 x 4096 -> 14336), with the capability checks answering
   as a GPU of the target would, and ``torch.library.wrap_triton`` replaced by a recorder: each
   launch is kept (kernel, arguments), none runs. The blocked axis of each operand has its real
   length (it sets the tile constants); the other axis is short, which changes no constant.
2. *Specialise.* Triton's own binder turns each launch into the signature, constants and
   alignment attributes the JIT would compile at launch; identical ones are compiled once.
3. *Compile* with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``.
4. *Analyse* (this script only): ``ptxas -v`` (Triton's bundled one) on the PTX for registers and
   spill bytes; shared memory from the kernel's metadata; pipelining from the TTGIR (asynchronous
   global->shared copies or TMA) and tensor-core instructions from the PTX (mma.sync, wgmma,
   tcgen05.mma; ``tcgen05.b16`` where it is NVFP4's ``kind::mxf4nvf4.block_scale.block16``).

``tests/test_kernel_compile.py`` uses steps 1-3 to fail on any compile error.

    .venv/bin/python benchmarks/kernel_resources.py                     # sm_90 and sm_100, every launch
    .venv/bin/python benchmarks/kernel_resources.py --archs 89,90,100 --only gemm --json out.json

CPU only; it prints, it asserts nothing. Compiled kernels land in Triton's on-disk cache, so a
second run compiles nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

DEFAULT_ARCHS = (90, 100)
NVF4_BLOCK16 = r"kind::mxf4nvf4\.block_scale\.(?:block16|scale_vec::4X)"
LAYER = (8192, 4096, 14336)  # tokens, d_in, d_out
SHORT = 256  # the axis that is not blocked: >= every tile's slice count
NAMED = ("paper", "full", "fp8", "fp4", "nvfp4", "mxfp4", "mxfp8")  # bf16 quantizes nothing
EXTRA = (("fp8", {"block_size": "channel"}), ("full", {"fmt": "e2m1", "block_size": 128}))


@dataclasses.dataclass
class Launch:
    kernel: Any  # a triton JITFunction
    args: tuple
    kwargs: dict
    used_by: str  # what made it: recipe / operand / path


@dataclasses.dataclass
class Compiled:
    name: str
    arch: int
    used_by: list
    constants: dict
    kernel: Any = None  # triton's CompiledKernel
    error: Optional[str] = None
    seconds: float = 0.0


def cuda_backend_problem() -> Optional[str]:
    """Why kernels cannot be compiled for NVIDIA targets in this process (``None``: they can)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: the kernels are built for the interpreter in this process"
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except Exception as exc:  # triton missing, or without the ahead-of-time API
        return f"triton cannot compile ahead of time here: {type(exc).__name__}: {exc}"
    from triton import backends

    from lightning_fpq.kernels.capability import version_supported

    ok, reason = version_supported(triton.__version__)
    if not ok:
        return reason
    if "nvidia" not in getattr(backends, "backends", {}):
        return f"triton {triton.__version__} has no NVIDIA backend"
    path = ptxas_path(90)
    if path is None or not os.path.exists(path):
        return f"triton {triton.__version__} ships no ptxas (looked for {path})"
    return None


def ptxas_path(arch: int) -> Optional[str]:
    try:
        from triton.backends.nvidia import compiler
    except Exception:
        return None
    try:
        return compiler.get_ptxas(arch).path  # triton >= 3.5: a ptxas per architecture family
    except TypeError:
        return compiler.get_ptxas().path


# ------------------------------------------------------------------ 1. capture
@contextlib.contextmanager
def pretend_gpu(cc: tuple[int, int]) -> Iterator[tuple[list[Launch], dict]]:
    """Within: the wrappers run on CPU tensors as on a GPU of capability ``cc`` and record their
    launches instead of running them. Yields (the launches, a dict whose ``used_by`` labels the
    next ones)."""
    capability = importlib.import_module("lightning_fpq.kernels.capability")
    launches: list[Launch] = []
    context = {"used_by": ""}

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.kernel, args, kwargs, context["used_by"]))

    yes = (True, f"pretending sm_{cc[0]}{cc[1]} to capture launches")
    patches = {
        "kernel_launchable": lambda kernel: yes,
        "kernel_device": lambda: torch.device("cpu"),
        "triton_available": lambda: yes,
        "interpret_requested": lambda: False,
        "device_capability": lambda: cc,
        "fp8_tensor_cores_available": lambda: yes if cc >= (8, 9) else (False, "no fp8"),
        "dot_scaled_available": lambda: yes if cc >= (9, 0) else (False, "no dot_scaled"),
        "native_fp4_available": lambda: yes if cc >= (10, 0) else (False, "no fp4"),
    }
    saved = {name: getattr(capability, name) for name in patches}
    saved_wrap = torch.library.wrap_triton
    try:
        for name, fn in patches.items():
            setattr(capability, name, fn)
        torch.library.wrap_triton = Recorder  # the wrappers look it up at each call
        yield launches, context
    finally:
        torch.library.wrap_triton = saved_wrap
        for name, fn in saved.items():
            setattr(capability, name, fn)


def _operands(name: str, kw: dict):
    from lightning_fpq.backends.triton import fp4_gemms
    from lightning_fpq.recipe import QuantRecipe

    spec = QuantRecipe.from_name(name, **kw).layer_spec("fc")
    fwd, dgrad, wgrad = fp4_gemms(spec)
    tokens, d_in, d_out = LAYER
    p1, p2, p3, p4, p5, p6 = spec.operands
    # (label, spec, axis, length along it, dtype, packed): X and dY bf16 (autocast), W fp32 master
    return [
        ("X q1", p1, -1, d_in, torch.bfloat16, fwd),
        ("W q2", p2, -1, d_in, torch.float32, fwd),
        ("dY q3", p3, -1, d_out, torch.bfloat16, dgrad),
        ("W q4", p4, 0, d_out, torch.float32, dgrad),
        ("dY q5", p5, 0, tokens, torch.bfloat16, wgrad),
        ("X q6", p6, 0, tokens, torch.bfloat16, wgrad),
    ]


def capture(cc: tuple[int, int], only: str = "") -> list[Launch]:
    """Every launch the wrappers make for the named recipes' operands and FP4 GEMMs on ``cc``."""
    kernels = importlib.import_module("lightning_fpq.kernels")
    gemm = importlib.import_module("lightning_fpq.kernels.gemm_fp4")
    from lightning_fpq.philox import PhiloxGenerator

    g = torch.Generator().manual_seed(0)
    with pretend_gpu(cc) as (launches, context):
        if only != "gemm":
            for name, kw in [(n, {}) for n in NAMED] + list(EXTRA):
                for label, op, axis, length, dtype, packed in _operands(name, kw):
                    if op is None or op.fmt.bits > 32:
                        continue
                    shape = (SHORT, length) if axis == -1 else (length, SHORT)
                    x = torch.randn(shape, generator=g).to(dtype)
                    args = dict(block_size=op.block_size, axis=axis, scale_format=op.scale_format, rounding=op.rounding)
                    # stochastic rounding: torch's generator (a noise tensor), and rng="philox" (in-kernel draws)
                    sources = [("", torch.Generator().manual_seed(1)), (" philox", PhiloxGenerator(1))]
                    for tag, gen in sources if op.rounding == "stochastic" else [("", None)]:
                        if gen is not None:
                            args["generator"] = gen
                        context["used_by"] = f"{name}{kw or ''} {label} {op.short_str()} fake{tag}"
                        kernels.quantize_triton(x, op.fmt, **args)
                        if packed:  # the triton backend packs it where the GEMM can take it
                            context["used_by"] = f"{name}{kw or ''} {label} {op.short_str()} packed{tag}"
                            kernels.pack_triton(x, op.fmt, **args)
            # API modes the layer does not launch: Philox stochastic rounding, 16-bit codes
            x = torch.randn(SHORT, LAYER[1], generator=g).to(torch.bfloat16)
            context["used_by"] = "api quantize_triton(seed=) e2m1 B=32"
            kernels.quantize_triton(x, "e2m1", block_size=32, rounding="stochastic", seed=3)
            # rows whose length is not a multiple of 4: one Philox evaluation per element
            context["used_by"] = "api quantize_triton(seed=) e2m1 B=32, rows of 4095"
            kernels.quantize_triton(x[:, :-1], "e2m1", block_size=32, rounding="stochastic", seed=3)
            context["used_by"] = "api pack_triton e5m10 B=64"
            kernels.pack_triton(x, "e5m10", block_size=64)
        if only != "quantize":
            for block, sfmt in ((32, "e8m0"), (16, "e4m3"), (128, "fp32"), ("channel", "fp32")):
                context["used_by"] = f"gemm_fp4 operands: pack_triton e2m1 B={block} {sfmt}"
                a = kernels.pack_triton(
                    torch.randn(SHORT, LAYER[1], generator=g), "e2m1", block_size=block, scale_format=sfmt
                )
                b = kernels.pack_triton(
                    torch.randn(SHORT, LAYER[1], generator=g), "e2m1", block_size=block, scale_format=sfmt
                )
                block_len = LAYER[1] if block == "channel" else block
                auto = gemm.choose_path(block_len, sfmt, cc)[0]
                for path in gemm_paths(block_len, sfmt, cc):
                    for out_dtype in (torch.bfloat16, torch.float32):
                        tag = " (auto)" if path == auto else ""
                        context["used_by"] = f"gemm_fp4 B={block} {sfmt} path={path}{tag} out={out_dtype}"
                        kernels.gemm_fp4(a, b, out_dtype=out_dtype, path=path)
                    # the layer's forward: its bias added in the epilogue, bf16 out (autocast)
                    context["used_by"] = f"gemm_fp4 B={block} {sfmt} path={path}{tag} out=bf16 + bias"
                    bias = torch.randn(SHORT, generator=g).to(torch.bfloat16)
                    kernels.gemm_fp4(a, b, out_dtype=torch.bfloat16, path=path, bias=bias)
    return launches


def gemm_paths(block_len: int, scale_format: str, cc: tuple[int, int]) -> list[str]:
    """The paths ``gemm_fp4`` can take for these operands on ``cc`` (auto's and the forced ones)."""
    paths = ["bf16"]
    if block_len >= 32 and cc >= (8, 9):
        paths.append("fp8")
    if (block_len == 32 and scale_format == "e8m0" and cc >= (9, 0)) or (
        block_len == 16 and scale_format == "e4m3" and cc >= (10, 0)  # NVFP4: native MMA only
    ):
        paths.append("dot_scaled")
    return paths


# ------------------------------------------------------------------ 2. specialise, 3. compile
def _specialise(launch: Launch, backend) -> tuple:
    """(signature, constexprs, attrs, options) as the JIT makes them at this launch."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kernel, kwargs = launch.kernel, dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what JITFunction.run adds (by version)
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, specialization, options)


def distinct(launches: list[Launch], arch: int) -> list[tuple[Launch, list[str], tuple]]:
    """One (launch, what uses it, specialisation) per kernel the JIT would compile on ``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    groups: dict[str, tuple[Launch, list[str], tuple]] = {}
    for launch in launches:
        spec = _specialise(launch, backend)
        options, signature, constexprs, attrs = spec
        key = repr(
            (launch.kernel.fn.__name__, signature, sorted(constexprs.items()), attrs, sorted(vars(options).items()))
        )
        groups.setdefault(key, (launch, [], spec))[1].append(launch.used_by)
    return list(groups.values())


def compile_one(launch: Launch, used_by: list, spec: tuple, arch: int) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options, signature, constexprs, attrs = spec
    names = [p.name for p in launch.kernel.params]
    constants = {names[path[0]]: v for path, v in constexprs.items() if len(path) == 1}
    result = Compiled(launch.kernel.fn.__name__, arch, sorted(set(used_by)), constants)
    t0 = time.perf_counter()
    try:
        src = ASTSource(launch.kernel, signature, constexprs, attrs)
        result.kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=vars(options))
    except Exception as exc:  # reported per kernel; the caller decides what a failure means
        result.error = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-4000:]
    result.seconds = time.perf_counter() - t0
    return result


def compile_all(archs=DEFAULT_ARCHS, only: str = "", select=None, on_result=None) -> list[Compiled]:
    """Capture and compile for each arch; ``select(name, constants, used_by)`` may thin the set."""
    results = []
    for arch in archs:
        cc = (arch // 10, arch % 10)
        for launch, used_by, spec in distinct(capture(cc, only), arch):
            if select is not None:
                names = [p.name for p in launch.kernel.params]
                consts = {names[p[0]]: v for p, v in spec[2].items() if len(p) == 1}
                if not select(launch.kernel.fn.__name__, consts, used_by):
                    continue
            result = compile_one(launch, used_by, spec, arch)
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results


# ------------------------------------------------------------------ 4. analyse
_SHOWN = ("DOT_MODE", "BLOCK_M", "BLOCK_N", "BLOCK_K", "OUT_KIND", "BIAS_KIND", "MBITS", "EBITS", "SCALE_MODE", "ROUND_MODE",
          "PHILOX_GROUP", "IN_KIND", "CODE_BITS", "BLOCK_V", "NB", "N_CHUNKS")  # fmt: skip
_PHILOX_MUL_HI = 20  # mul.hi.u32 of one Philox4x32-10 evaluation: two a round, ten rounds


def analyse(result: Compiled) -> dict:
    ck = result.kernel
    ptx = ck.asm["ptx"]
    ttgir = ck.asm.get("ttgir", "")
    row = {
        "shared_bytes": getattr(ck.metadata, "shared", None),
        "num_warps": ck.metadata.num_warps,
        "num_stages": ck.metadata.num_stages,
        "mma.sync": len(re.findall(r"\bmma\.sync", ptx)),
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "tcgen05.mma": len(re.findall(r"\btcgen05\.mma", ptx)),
        # NVFP4's native MMA: E2M1 x E2M1 with an E4M3 scale per 16 elements (triton 3.9
        # writes .block16, 3.6 the older spelling of the same, .scale_vec::4X)
        "nvf4.block16": len(re.findall(NVF4_BLOCK16, ptx)),
        "cp.async": len(re.findall(r"\bcp\.async\b(?!\.bulk)", ptx)),
        "tma": len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
        "ld.global.v4": len(re.findall(r"\bld\.global(?:\.[a-z0-9_]+)*\.v4", ptx)),
        "div.rn.f32": len(re.findall(r"\bdiv\.rn(?:\.ftz)?\.f32", ptx)),
        # the main loop streams tiles asynchronously into shared memory ahead of the MMA
        "pipelined": "async_copy_global_to_local" in ttgir or "async_tma_copy" in ttgir or "tma_load" in ttgir,
    }
    if result.constants.get("ROUND_MODE") == 2:  # Philox draws in the kernel: evaluations per element
        c = result.constants
        per_thread = c["BLOCK_V"] * c["NB"] * c["BLOCK_K"] / (32 * ck.metadata.num_warps)
        row["philox_per_element"] = len(re.findall(r"\bmul\.hi\.u32", ptx)) / _PHILOX_MUL_HI / per_thread
    row.update(_ptxas_usage(ptx, result.arch))
    return row


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from Triton's bundled ``ptxas -v`` on this PTX."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    ptxas = ptxas_path(arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(ptx)
        proc = subprocess.run(
            [ptxas, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.o")],
            capture_output=True,
            text=True,
        )
    log = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spills.group(1)) if spills else None,
        "spill_loads": int(spills.group(2)) if spills else None,
    }


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default=",".join(map(str, DEFAULT_ARCHS)), help="comma-separated sm numbers")
    ap.add_argument("--only", choices=("", "gemm", "quantize"), default="")
    ap.add_argument("--json", help="write every row here as JSON")
    args = ap.parse_args(argv)
    problem = cuda_backend_problem()
    if problem:
        print(f"kernel_resources cannot run here: {problem}")
        return 0
    import triton

    archs = [int(a) for a in args.archs.split(",")]
    print(
        f"triton {triton.__version__}, torch {torch.__version__}; targets {archs}; layer tokens x in -> out = {LAYER}"
    )
    header = f"{'arch':>4} {'kernel':<22} {'regs':>4} {'spill st/ld':>11} {'shared':>7} {'pipe':>4} {'mma':>9} {'s':>5}  constants / used by"
    print(header)
    rows: list[dict] = []
    t0 = time.perf_counter()

    def report(result: Compiled) -> None:
        row = {"arch": result.arch, "kernel": result.name, "compile_s": round(result.seconds, 2)}
        row["constants"] = {k: v for k, v in result.constants.items() if k in _SHOWN}
        row["used_by"] = result.used_by
        if result.error:
            row["error"] = result.error
            print(f"{result.arch:>4} {result.name:<22} COMPILE ERROR: {result.error.splitlines()[-1][:200]}")
        else:
            row.update(analyse(result))
            mma = (
                "wgmma" if row["wgmma"] else "tcgen05" if row["tcgen05.mma"] else "mma.sync" if row["mma.sync"] else "-"
            )
            if row["nvf4.block16"]:
                mma += ".b16"  # tcgen05 ... kind::mxf4nvf4.block_scale.block16
            consts = " ".join(f"{k}={v}" for k, v in row["constants"].items())
            if "philox_per_element" in row:
                consts += f" philox/elem={row['philox_per_element']:.2f}"
            print(
                f"{result.arch:>4} {result.name:<22} {row['registers']!s:>4} {row['spill_stores']!s:>5}/{row['spill_loads']!s:<5} "
                f"{row['shared_bytes']!s:>7} {'yes' if row['pipelined'] else 'no':>4} {mma:>9} {result.seconds:5.1f}  "
                f"{consts} | {result.used_by[0]}{f' (+{len(result.used_by) - 1})' if len(result.used_by) > 1 else ''}",
                flush=True,
            )
        rows.append(row)

    compile_all(archs, args.only, on_result=report)
    errors = sum("error" in r for r in rows)
    print(f"{len(rows)} kernels, {errors} compile errors, {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
