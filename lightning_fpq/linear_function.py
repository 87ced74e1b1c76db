"""The autograd function of a quantized linear layer: its three GEMMs on quantized operands.

One autograd function (:class:`_QuantLinearFn`) quantizes each of the six GEMM operands along
its own reduction dimension (docs/science.md section 3, arXiv 2501.02423 eq. 8)::

    forward   Y  = q1(X)  @ q2(W).T  (+ b)        q1, q2 blocked along in_features
    dgrad     dX = q3(dY) @ q4(W)                 q3, q4 blocked along out_features
    wgrad     dW = q5(dY).T @ q6(X)               q5, q6 blocked along tokens

Gradients pass straight through the quantizers (STE), except where the spec asks for the
differentiable gradient estimator (DGE) or outlier clamping and compensation (OCC) of
arXiv 2501.17116 (:mod:`lightning_fpq.fp4_estimators`). Products are computed in the compute
dtype (the autocast dtype when autocast is on, else the input's dtype); each operand is
quantized from the tensor it is made of (the fp32 master weight, the incoming activation, the
incoming gradient) and the quantized values are then cast to the compute dtype.

:func:`quant_linear` is the entry point: it resolves the layer backend
(:mod:`lightning_fpq.backends`) and runs the call on its quantizer and GEMM. This module knows
formats, specs and backends, and nothing of modules, recipes or Lightning.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from . import backends
from .backends import triton as triton_backend
from .fp4_estimators import dge_factor, occ_threshold
from .packing import PackedTensor
from .philox import NoiseGenerator
from .quantize import quantize
from .spec import LayerSpec, OperandSpec

__all__ = ["quant_linear", "quantize_pair", "WeightCache", "Plan"]


def _q(
    x: torch.Tensor,
    spec: Optional[OperandSpec],
    axis: int,
    generator: Optional[NoiseGenerator],
    quantizer: str = "auto",
) -> torch.Tensor:
    """Fake-quantize one operand along ``axis`` (``x`` itself when the spec is None) with the
    ``quantize`` backend ``quantizer`` (every one is bit-identical to the reference)."""
    if spec is None:
        return x
    if spec.rounding == "stochastic":
        return _quantize_stochastic(x, spec, axis, generator, quantizer)
    block = "none" if spec.block_size is None else str(spec.block_size)
    return torch.ops.lightning_fpq.fake_quantize(x, spec.fmt.name, block, axis, spec.scale_format, quantizer)


@torch.library.custom_op("lightning_fpq::fake_quantize", mutates_args=())
def _fake_quantize(
    x: torch.Tensor, fmt: str, block_size: str, axis: int, scale_format: str, backend: str
) -> torch.Tensor:
    """``quantize`` (nearest rounding) as an opaque op: ``torch.compile`` puts it in the graph
    as one node and runs the quantizer's own fast path, instead of tracing its float64 code."""
    block = None if block_size == "none" else int(block_size) if block_size.isdigit() else block_size
    return quantize(x, fmt, block_size=block, axis=axis, scale_format=scale_format, backend=backend).contiguous()


@_fake_quantize.register_fake
def _(x, fmt, block_size, axis, scale_format, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.compiler.disable
def _quantize_stochastic(
    x: torch.Tensor, spec: OperandSpec, axis: int, generator: Optional[NoiseGenerator], quantizer: str
) -> torch.Tensor:
    # eager (a graph break under torch.compile): the draws come from the layer's own generator
    return quantize(
        x,
        spec.fmt,
        block_size=spec.block_size,
        axis=axis,
        scale_format=spec.scale_format,
        rounding="stochastic",
        generator=generator,
        backend=quantizer,
    )


def _same_on_any_axis(a: Optional[OperandSpec], b: Optional[OperandSpec]) -> bool:
    """Whether q_a along one axis equals q_b along another: same spec, scaling that does not
    depend on the axis (none or one tensor scale), deterministic rounding."""
    return a is not None and a == b and a.block_size in (None, "tensor") and a.rounding == "nearest"


class Plan(NamedTuple):
    """How one call of a fake-quantizing backend runs: the ``quantize`` backend of its dense
    operands, and which GEMMs (forward, dgrad, wgrad) take packed E2M1 operands and the FP4
    GEMM kernel instead."""

    quantizer: str = "reference"
    fp4: tuple[bool, bool, bool] = (False, False, False)


EMULATED_PLAN = Plan()  # the reference quantizer, no packed GEMM


def _plan(backend: str, spec: LayerSpec, shape: tuple[int, int, int]) -> Plan:
    """The quantizer of ``backend``'s dense operands and, on ``triton``, which GEMMs of this call
    (``shape`` = tokens, in, out) take packed FP4 operands."""
    quantizer = backends.REGISTRY[backend].QUANTIZER
    if backend != "triton":
        return Plan(quantizer)
    return Plan(quantizer, triton_backend.fp4_plan(spec, shape))


def _operand(
    x: torch.Tensor,
    spec: Optional[OperandSpec],
    axis: int,
    generator: Optional[NoiseGenerator],
    quantizer: str,
    packed: bool,
) -> Union[torch.Tensor, PackedTensor]:
    return triton_backend.pack_operand(x, spec, axis, generator) if packed else _q(x, spec, axis, generator, quantizer)


def quantize_pair(
    x: torch.Tensor,
    first: Optional[OperandSpec],
    second: Optional[OperandSpec],
    generator: Optional[NoiseGenerator] = None,
    *,
    need_second: bool = True,
    quantizer: str = "auto",
    packed: tuple[bool, bool] = (False, False),
) -> tuple[Union[torch.Tensor, PackedTensor], Optional[Union[torch.Tensor, PackedTensor]]]:
    """Both quantizations of a 2-D operand that the recipe asks for: ``first`` along its rows
    (axis -1, the forward / dgrad reduction) and ``second`` along its columns (axis 0).

    X gives (q1, q6), W gives (q2, q4), dY gives (q3, q5). When the two specs quantize alike on
    any axis, the second is the first (quantized once); ``need_second=False`` skips it.
    ``packed`` asks for E2M1 codes plus scales (``PackedTensor``) instead of fake-quantized
    values; the quantizations happen in the same order either way (stochastic rounding draws
    the same noise).
    """
    a = _operand(x, first, -1, generator, quantizer, packed[0])
    if not need_second:
        return a, None
    if not any(packed) and _same_on_any_axis(first, second):
        return a, a
    return a, _operand(x, second, 0, generator, quantizer, packed[1])


class WeightCache:
    """One layer's quantized weights, valid while the weight is unchanged (see ``cache_weights``)."""

    __slots__ = ("key", "wq2", "wq4")

    def __init__(self) -> None:
        self.key: Optional[tuple] = None  # what W and the specs were when filled
        self.wq2: Union[torch.Tensor, PackedTensor, None] = None
        self.wq4: Union[torch.Tensor, PackedTensor, None] = None


def _weight_operands(weight, spec: LayerSpec, generator, need_wq4: bool, cache: Optional[WeightCache], plan: Plan):
    """(q2(W), q4(W) or None), from the cache when W has not changed since it was filled."""
    packed = plan.fp4[:2]  # q2 feeds the forward GEMM, q4 the dgrad GEMM

    def quantized():
        return quantize_pair(
            weight,
            spec.weight,
            spec.weight_for_grad_input,
            generator,
            need_second=need_wq4,
            quantizer=plan.quantizer,
            packed=packed,
        )

    usable = not torch.compiler.is_compiling() and all(
        op is None or op.rounding == "nearest" for op in (spec.weight, spec.weight_for_grad_input)
    )
    if cache is None or not usable:
        return quantized()
    key = (
        weight._version,
        weight.data_ptr(),
        tuple(weight.shape),
        weight.dtype,
        spec.weight,
        spec.weight_for_grad_input,
        packed,
    )
    if cache.key == key and (not need_wq4 or cache.wq4 is not None):
        return cache.wq2, cache.wq4
    wq2, wq4 = quantized()
    cache.key, cache.wq2, cache.wq4 = key, wq2, wq4
    return wq2, wq4


def _dense(t, cd: torch.dtype):
    return t if isinstance(t, PackedTensor) else t.to(cd)


#: the tensors of a PackedTensor: they go through save_for_backward, the rest stays on ctx
_PACKED_TENSORS = ("codes", "scales", "scale_bytes", "tensor_scale")


def _split_packed(t, cd: torch.dtype) -> tuple[tuple, Any]:
    """A saved operand as (its tensors, its layout): dense values in ``cd`` with no layout, or a
    PackedTensor's tensors (codes, scales and, for E4M3 scales, their bytes and the tensor
    scale) plus the rest of it (shape, format, blocks), which holds no tensor."""
    if t is None:
        return (None,) * len(_PACKED_TENSORS), None
    if isinstance(t, PackedTensor):
        tensors = tuple(getattr(t, name) for name in _PACKED_TENSORS)
        return tensors, dataclasses.replace(t, **dict.fromkeys(_PACKED_TENSORS))  # type: ignore[arg-type]
    return (t.to(cd),) + (None,) * (len(_PACKED_TENSORS) - 1), None


def _join_packed(tensors: tuple, layout: Any):
    return tensors[0] if layout is None else dataclasses.replace(layout, **dict(zip(_PACKED_TENSORS, tensors)))


# ------------------------------------------------------------------ autograd fn
def _forward(
    x2d,
    weight,
    bias,
    spec: LayerSpec,
    cd: torch.dtype,
    generator,
    *,
    need_xq6: bool,
    need_wq4: bool,
    plan: Plan = EMULATED_PLAN,
    cache: Optional[WeightCache] = None,
):
    """The forward GEMM ``q1(X) @ q2(W).T + b`` (plus OCC's compensation), and, from the same
    reads of X and W, the operands the backward GEMMs will need: q6(X) and q4(W)."""
    fwd_fp4, _, wgrad_fp4 = plan.fp4
    if spec.fp4.occ:
        tau = occ_threshold(x2d, spec.fp4.occ_quantile)
        x_clamped = torch.clamp(x2d, -tau, tau)
        xq1 = _dense(_operand(x_clamped, spec.input, -1, generator, plan.quantizer, fwd_fp4), cd)
        xq6 = _operand(x2d, spec.input_for_grad_weight, 0, generator, plan.quantizer, wgrad_fp4) if need_xq6 else None
        residual = (x2d - x_clamped).to(cd)  # sparse: the outliers beyond the quantile
    else:
        xq1, xq6 = quantize_pair(
            x2d,
            spec.input,
            spec.input_for_grad_weight,
            generator,
            need_second=need_xq6,
            quantizer=plan.quantizer,
            packed=(fwd_fp4, wgrad_fp4),
        )
        xq1 = _dense(xq1, cd)
        residual = None
    # W does not change between forward and backward: q4(W) comes from this same read of W
    wq2, wq4 = _weight_operands(weight, spec, generator, need_wq4, cache, plan)
    if fwd_fp4:
        # the kernel adds the bias to the fp32 sums before the one rounding to cd, as F.linear does
        y = triton_backend.gemm_packed(xq1, wq2, cd, bias=bias.to(cd) if bias is not None else None)
    else:
        y = F.linear(xq1, wq2.to(cd), bias.to(cd) if bias is not None else None)  # (N, out)
    if residual is not None:
        y = y + F.linear(residual, weight.to(cd))  # OCC compensation in the compute dtype
    return y, xq6, wq4


class _QuantLinearFn(torch.autograd.Function):
    """Y = q1(X) @ q2(W).T + b, with q3..q6 in the backward GEMMs (see the module docstring)."""

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        spec: LayerSpec,
        compute_dtype: torch.dtype,
        generator: Optional[NoiseGenerator],
        save_quantized_weight: bool,
        cache: Optional[WeightCache],
        plan: Plan,
    ):
        x2d = x.reshape(-1, x.shape[-1])  # (N, in)
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cd = compute_dtype
        keep_wq4 = need_dx and save_quantized_weight
        y, xq6, wq4 = _forward(
            x2d, weight, bias, spec, cd, generator, need_xq6=need_dw, need_wq4=keep_wq4, plan=plan, cache=cache
        )

        ctx.spec, ctx.cd, ctx.generator, ctx.plan = spec, cd, generator, plan
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        ctx.has_bias = bias is not None
        ctx.wq4_saved = keep_wq4
        # packed operands go through save_for_backward as their tensors (so saved-tensor hooks,
        # activation checkpointing and retain_graph see them); their layout stays on ctx
        x_saved, ctx.x_layout = _split_packed(xq6 if need_dw else None, cd)
        w_saved, ctx.w_layout = _split_packed(wq4 if keep_wq4 else None, cd)
        ctx.save_for_backward(weight, *x_saved, *w_saved)  # the weight Parameter costs no memory
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        weight, *saved = ctx.saved_tensors
        n = len(_PACKED_TENSORS)
        saved_x = _join_packed(tuple(saved[:n]), ctx.x_layout)  # q6(X): values in cd, or packed
        saved_wq4 = _join_packed(tuple(saved[n:]), ctx.w_layout)  # q4(W) likewise
        spec, cd, plan = ctx.spec, ctx.cd, ctx.plan
        _, dgrad_fp4, wgrad_fp4 = plan.fp4
        dy2d = grad_out.reshape(-1, grad_out.shape[-1]).to(cd)  # (N, out)
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dyq3, dyq5 = None, None
        if need_dx:
            dyq3, dyq5 = quantize_pair(
                dy2d,
                spec.grad_output,
                spec.grad_output_for_grad_weight,
                ctx.generator,
                need_second=need_dw,
                quantizer=plan.quantizer,
                packed=(dgrad_fp4, wgrad_fp4),
            )
        elif need_dw:
            dyq5 = _operand(dy2d, spec.grad_output_for_grad_weight, 0, ctx.generator, plan.quantizer, wgrad_fp4)

        dx = dw = db = None
        if need_dx:
            if ctx.wq4_saved:
                wq4 = saved_wq4
            else:
                wq4 = _dense(
                    _operand(weight, spec.weight_for_grad_input, 0, ctx.generator, plan.quantizer, dgrad_fp4), cd
                )
            dx = triton_backend.gemm_packed(dyq3, wq4, cd) if dgrad_fp4 else dyq3 @ wq4  # (N, out) @ (out, in)
            dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        if need_dw:
            # (out, N) @ (N, in); packed: dY and X blocked along tokens stand for dY.T and X.T
            dw = triton_backend.gemm_packed(dyq5, saved_x, cd) if wgrad_fp4 else dyq5.t() @ saved_x  # type: ignore[union-attr]
            if spec.fp4.dge:
                dw = dw * dge_factor(weight, spec.weight, k=spec.fp4.dge_k, clamp=spec.fp4.dge_clamp).to(dw.dtype)
            dw = dw.to(ctx.w_dtype)
        if need_db and ctx.has_bias:
            db = dy2d.sum(0).to(ctx.b_dtype)
        return dx, dw, db, None, None, None, None, None, None


def quant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    spec: Optional[LayerSpec],
    *,
    generator: Optional[NoiseGenerator] = None,
    backend: str = "emulated",
    save_quantized_weight: bool = True,
    weight_cache: Optional[WeightCache] = None,
    backend_state: Optional[dict] = None,
) -> torch.Tensor:
    """``F.linear`` with the operands quantized as ``spec`` says (``None``: plain ``F.linear``).

    ``backend`` is a layer backend of :mod:`lightning_fpq.backends` ("auto" chooses one for
    ``spec`` and ``x``'s device). ``backend_state`` is the calling layer's dict for a
    backend's per-layer objects (Transformer Engine's hidden ``te.Linear``). Under autocast the compute dtype is the autocast dtype of
    ``x``'s device type (autocast is then switched off inside: the quantized operands are cast
    explicitly); otherwise it is ``x.dtype``.
    """
    if spec is None or spec.is_identity:
        return F.linear(x, weight, bias)
    backend = backends.check_backend(backend)
    if backend == "auto":
        backend = backends.choose("auto", spec, x.device)[0]
    weight = _full(weight)
    bias = _full(bias) if bias is not None else None
    device_type = x.device.type
    autocast_on = torch.is_autocast_enabled(device_type)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast_on else x.dtype
    if backend == "torchao_float8":
        return backends.torchao_float8.torchao_float8_linear(x, weight, bias, spec, compute_dtype, autocast_on)
    if backend == "transformer_engine":
        out = backends.transformer_engine.te_linear(
            x, weight, bias, spec, compute_dtype, autocast_on, slot=backend_state
        )
        if out is not None:
            return out
        # a shape TE's FP8 GEMMs refuse: the same quantized operands on the fused quantizer
        backend = "triton" if backends.available("triton", device_type)[0] else "emulated"
    plan = _plan(backend, spec, (x.numel() // max(x.shape[-1], 1), weight.shape[1], weight.shape[0]))
    with torch.autocast(device_type, enabled=False) if autocast_on else contextlib.nullcontext():
        if not torch.is_grad_enabled():
            # validation / inference: only the forward GEMM (autograd.Function would still see
            # needs_input_grad=True for the weight and prepare q4(W), q6(X) for nothing)
            x2d = x.reshape(-1, x.shape[-1])  # (N, in)
            y, _, _ = _forward(
                x2d,
                weight,
                bias,
                spec,
                compute_dtype,
                generator,
                need_xq6=False,
                need_wq4=False,
                plan=plan,
                cache=weight_cache,
            )
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return _QuantLinearFn.apply(
            x, weight, bias, spec, compute_dtype, generator, save_quantized_weight, weight_cache, plan
        )


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor parameter (tensor parallelism) gathered to its full value, differentiably:
    blocks must see whole reduction dimensions. FSDP2 already hands forward full tensors."""
    if type(t).__name__ == "DTensor" and hasattr(t, "full_tensor"):
        return t.full_tensor()
    return t
