"""The ``triton`` layer backend: the fused Triton quantize kernel for every operand (blocks
along rows or columns, no transposed copy; the reference for formats wider than fp32) and, for
every GEMM whose two operands are both E2M1 with one block length, the packed FP4 GEMM kernel
(``lightning_fpq.kernels.gemm_fp4``) where that pays on the GPU (:func:`packed_gemm_pays`); the
other GEMMs run on the fake-quantized operands in the compute dtype. CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1`` (tests)."""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..formats import FPFormat
from ..packing import PackedTensor
from ..philox import NoiseGenerator
from ..spec import LayerSpec, OperandSpec
from .hardware import Capability

QUANTIZER = "auto"  # the fused kernel for CUDA tensors in formats that fit fp32, else the reference
GEMM = "packed FP4 where both operands are E2M1, else the compute dtype"
_E2M1 = FPFormat.parse("e2m1")
GEMM_NAMES = ("forward", "dgrad", "wgrad")


def machine_available() -> Capability:
    """The fused Triton kernels of ``lightning_fpq.kernels`` (cached there)."""
    from ..kernels import capability

    return capability.triton_available()


def device_available(device_type: str) -> Capability:
    ok, reason = machine_available()
    if not ok:
        return ok, reason
    from ..kernels import capability

    device = capability.kernel_device()  # cuda, or cpu under the interpreter
    if device is None or device.type != device_type:
        where = "no device" if device is None else f"{device.type!r} tensors"
        return False, f"the Triton kernels run on {where} here, not {device_type!r} ({reason})"
    return ok, reason


def _fp4_pair(a: Optional[OperandSpec], b: Optional[OperandSpec]) -> bool:
    """Whether a GEMM with operand specs ``a`` and ``b`` can run on the packed FP4 kernel:
    both E2M1, one block length (a power of two from 16, "channel" or "tensor"). Scale
    formats and rounding may differ: the kernel reads each operand's own scales."""
    if a is None or b is None or a.fmt != _E2M1 or b.fmt != _E2M1 or a.block_size != b.block_size:
        return False
    block = a.block_size
    return block in ("channel", "tensor") or (isinstance(block, int) and block >= 16 and block & (block - 1) == 0)


@functools.lru_cache(maxsize=256)
def fp4_gemms(spec: LayerSpec) -> tuple[bool, bool, bool]:
    """Which of (forward, dgrad, wgrad) run on the packed FP4 GEMM, for any shape."""
    return (
        _fp4_pair(spec.input, spec.weight),
        _fp4_pair(spec.grad_output, spec.weight_for_grad_input),
        _fp4_pair(spec.grad_output_for_grad_weight, spec.input_for_grad_weight),
    )


@functools.lru_cache(maxsize=256)
def packed_gemm_pays(a: OperandSpec, b: OperandSpec, cc: Optional[tuple[int, int]]) -> Capability:
    """Whether a GEMM of E2M1 operands ``a`` and ``b`` should run packed on ``gemm_fp4`` on a GPU
    of compute capability ``cc`` (``None``: the interpreter), rather than on their fake-quantized
    values with the compute-dtype GEMM (cuBLAS). The rule, so that the layer never takes a path
    expected to be slower than fake quantization plus the bf16 GEMM:

    - interpreter (tests): packed, to exercise the kernel;
    - sm_100+ where ``gemm_fp4`` runs the GEMM on ``tl.dot_scaled`` (the FP4 tensor cores):
      MXFP4 operands (32-element blocks, e8m0 scales) and NVFP4 ones (16-element blocks, e4m3
      scales on both operands); packed;
    - everything else, sm_90 included: fake-quantized operands and the compute-dtype GEMM. On
      Hopper the best FP4 path (``tl.dot_scaled``: bf16 upcast + wgmma) does the bf16 GEMM's
      tensor-core work plus the decoding, so it cannot be expected to beat cuBLAS; the fp8/bf16
      decode paths are far slower (docs/gpu.md). No GPU has measured this rule yet.
    """
    if cc is None:
        return True, "interpreter: the packed kernel is exercised (tests)"
    from ..kernels.gemm_fp4 import choose_path

    sfmt = a.scale_format if a.scale_format == b.scale_format else "fp32"
    block = a.block_size if isinstance(a.block_size, int) else 0
    path, why = choose_path(block, sfmt, cc)
    if path == "dot_scaled" and cc >= (10, 0):
        return True, why
    return False, (
        f"on sm_{cc[0]}{cc[1]} the packed FP4 GEMM would take its {path!r} path, not expected to beat "
        "fake quantization + the compute-dtype GEMM: fake-quantized operands"
    )


@functools.cache  # one GPU kind per process; asked at every layer call
def _device_cc() -> Optional[tuple[int, int]]:
    from ..kernels import capability

    return capability.device_capability()


def fp4_plan(spec: LayerSpec, shape: tuple[int, int, int]) -> tuple[bool, bool, bool]:
    """:func:`fp4_gemms` for one call of shape ``(tokens, in_features, out_features)`` on this
    device: a GEMM takes packed operands when its reduction length packs two codes a byte and
    :func:`packed_gemm_pays` on this GPU."""
    n_tokens, d_in, d_out = shape
    if min(shape) == 0:
        return False, False, False
    cc = _device_cc()

    def fits(op: Optional[OperandSpec], length: int) -> bool:
        return op is not None and (isinstance(op.block_size, int) or length % 2 == 0)

    def pays(a: Optional[OperandSpec], b: Optional[OperandSpec]) -> bool:
        return a is not None and b is not None and packed_gemm_pays(a, b, cc)[0]

    fwd, dgrad, wgrad = fp4_gemms(spec)
    return (
        fwd and fits(spec.input, d_in) and pays(spec.input, spec.weight),
        dgrad and fits(spec.grad_output, d_out) and pays(spec.grad_output, spec.weight_for_grad_input),
        wgrad
        and fits(spec.grad_output_for_grad_weight, n_tokens)
        and pays(spec.grad_output_for_grad_weight, spec.input_for_grad_weight),
    )


def supports(spec: LayerSpec, shape: Optional[tuple[int, int, int]] = None) -> Capability:
    gemms = fp4_gemms(spec) if shape is None else fp4_plan(spec, shape)
    if any(gemms):
        names = [n for n, on in zip(GEMM_NAMES, gemms) if on]
        where = " where it pays (sm_100+ MXFP4 and NVFP4)" if shape is None else ""
        return True, f"fused quantizer; packed FP4 GEMM for {'/'.join(names)}{where}"
    return True, "fused quantizer; GEMMs in the compute dtype"


def worth_auto(device: torch.device) -> Capability:
    from ..kernels import capability

    if capability.interpreting():
        return False, "Triton runs in its interpreter here (tests only, far slower than emulation)"
    return True, ""


@torch.compiler.disable
def pack_operand(x: torch.Tensor, spec: OperandSpec, axis: int, generator: Optional[NoiseGenerator]) -> PackedTensor:
    """E2M1 codes and block scales of ``x`` along ``axis`` (the Triton kernel; its values are
    the reference's, and stochastic rounding draws the reference's noise from ``generator``)."""
    from ..kernels import pack_triton

    return pack_triton(
        x,
        spec.fmt,
        block_size=spec.block_size,
        axis=axis,
        scale_format=spec.scale_format,
        rounding=spec.rounding,
        generator=generator if spec.rounding == "stochastic" else None,
    )


@torch.compiler.disable
def gemm_packed(
    a: PackedTensor, b: PackedTensor, out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``unpack(a) @ unpack(b).T (+ bias)`` on the packed FP4 kernel, fp32 accumulation; the
    bias joins the fp32 sums before the one rounding to ``out_dtype``."""
    from ..kernels import gemm_fp4

    return gemm_fp4(a, b, out_dtype=out_dtype, bias=bias)
