"""``QuantLinear``: an ``nn.Linear`` whose three GEMMs see quantized operands.

One autograd function (:class:`_QuantLinearFn`) quantizes each of the six GEMM operands along
its own reduction dimension (SCIENCE.md section 3, arXiv 2501.02423 eq. 8)::

    forward   Y  = q1(X)  @ q2(W).T  (+ b)        q1, q2 blocked along in_features
    dgrad     dX = q3(dY) @ q4(W)                 q3, q4 blocked along out_features
    wgrad     dW = q5(dY).T @ q6(X)               q5, q6 blocked along tokens

Gradients pass straight through the quantizers (STE), except where the recipe asks for the
differentiable gradient estimator (DGE) or outlier clamping and compensation (OCC) of
arXiv 2501.17116 (SCIENCE.md section 6). Products are computed in the compute dtype (the
autocast dtype when autocast is on, else the input's dtype); each operand is quantized from
the tensor it is made of (the fp32 master weight, the incoming activation, the incoming
gradient) and the quantized values are then cast to the compute dtype.

Conversion is in place: :func:`convert_linears` swaps the ``__class__`` of each selected
``nn.Linear`` to :class:`QuantLinear`, so the module keeps the very same ``weight`` and
``bias`` ``Parameter`` objects (optimizer state, DDP buckets and FSDP2 sharding stay valid)
and the model's ``state_dict`` keys do not change. Every ``QuantLinear`` of a model holds the
same :class:`RecipeHolder` and asks it for its ``LayerSpec`` at each call, so replacing the
holder's recipe switches precision at the next batch without rebuilding anything.

This module knows formats, recipes and backends, and nothing of Lightning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
import zlib
from typing import Iterable, NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends
from .formats import FPFormat
from .quantize import PackedTensor, _blocks_last, _unblock, block_scales, finite_absmax, quantize
from .recipe import LayerSpec, OperandSpec, QuantRecipe, clean_module_name

__all__ = ["QuantLinear", "RecipeHolder", "convert_linears", "quant_linear", "dge_factor", "occ_threshold"]


# ------------------------------------------------------------------------- holder
class RecipeHolder:
    """The one mutable object of quantized training: the active recipe, shared by every
    ``QuantLinear`` of a model (the precision plugin owns it).

    ``set_recipe`` replaces the recipe; layers read their resolved ``LayerSpec`` from a dict
    that is rebuilt at that moment, so the per-call cost is one dict lookup and
    ``torch.compile`` sees a constant (it recompiles once after a switch).

    Args:
        recipe: the initial recipe (a ``QuantRecipe``, a name or a YAML path).
        backend: "auto" or a layer backend of :mod:`lightning_fpq.backends` ("emulated",
            "compiled", "triton", "torchao_float8", "transformer_engine"); a forced backend
            this machine cannot run raises ``backends.BackendUnavailableError``.
        seed: base seed of the stochastic-rounding generators (one per layer and device,
            seeded from ``seed``, ``rank`` and the layer's name); ``None`` takes
            ``torch.initial_seed()`` when the first generator is made.
        rank: mixed into the seed so that data-parallel ranks draw different noise.
        save_quantized_weight: save q4(W) for the backward pass (computed in forward while
            W is read anyway). ``False`` saves W itself and quantizes it again in backward:
            less memory under FSDP2, where the saved q4(W) would be a full unsharded copy.
        cache_weights: keep each layer's q2(W) and q4(W) until W changes, so that gradient
            accumulation micro-batches and validation batches quantize W once per optimizer
            step. Costs two W-sized tensors per layer between steps; off by default. Valid when
            weights change through in-place ops on the Parameter or by replacement (optimizers,
            ``load_state_dict``), which bump its version counter; writes through ``.data`` do not.
    """

    def __init__(
        self,
        recipe: Union[QuantRecipe, str] = "paper",
        *,
        backend: str = "auto",
        seed: Optional[int] = None,
        rank: int = 0,
        save_quantized_weight: bool = True,
        cache_weights: bool = False,
    ) -> None:
        self.backend = backends.check_backend(backend)
        backends.require(self.backend)  # a forced backend this machine cannot run: say so now
        self.cache_weights = cache_weights
        self.seed = seed
        self.rank = rank
        self.save_quantized_weight = save_quantized_weight
        self.version = 0
        self._names: dict[str, None] = {}  # ordered set of registered layer names
        self._specs: dict[str, Optional[LayerSpec]] = {}
        self._generators: dict[tuple[str, str], torch.Generator] = {}
        self._backends: dict[tuple[str, str], str] = {}
        self.warn_fallbacks = True  # the plugin warns itself (on rank zero) and turns this off
        self._recipe = QuantRecipe.coerce(recipe)
        self._resolve()

    # -------------------------------------------------------------------- recipe
    @property
    def recipe(self) -> QuantRecipe:
        return self._recipe

    def set_recipe(self, recipe: Union[QuantRecipe, str]) -> QuantRecipe:
        """Make ``recipe`` the active recipe; every layer uses it from its next call on."""
        self._recipe = QuantRecipe.coerce(recipe)
        self.version += 1
        self._resolve()
        return self._recipe

    def register(self, name: str) -> Optional[LayerSpec]:
        """Remember a layer's name (so switches resolve it too) and return its spec."""
        name = clean_module_name(name)
        if name not in self._names:
            self._names[name] = None
            specs = dict(self._specs)
            specs[name] = self._recipe.layer_spec(name)
            self._specs = specs  # a new dict: compiled graphs guard on it
        return self._specs[name]

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def _resolve(self) -> None:
        self._specs = {name: self._recipe.layer_spec(name) for name in self._names}
        self._backends = {}

    def layer_backend(self, name: str, device: torch.device) -> str:
        """The backend that runs layer ``name`` on ``device`` now (cached until the next switch)."""
        if self.backend == "emulated":
            return "emulated"
        hit = self._backends.get((name, device.type))
        return hit if hit is not None else self._choose_backend(name, device)

    @torch.compiler.disable
    def _choose_backend(self, name: str, device: torch.device) -> str:
        backend, reason = self.backend_choice(name, device)
        if self.warn_fallbacks and self.backend != "auto" and backend != self.backend:
            warnings.warn(f"layer {name!r}: {reason}; the recipe is unchanged", stacklevel=3)
        self._remember_backends({name: backend}, device)
        return backend

    def _remember_backends(self, chosen: dict[str, str], device: torch.device) -> None:
        # a new dict, not an update in place: compiled graphs guard on the one they saw
        backends_ = dict(self._backends)
        backends_.update({(name, device.type): backend for name, backend in chosen.items()})
        self._backends = backends_

    @torch.compiler.disable
    def resolve_backends(self, device: torch.device) -> dict[str, tuple[str, str]]:
        """Choose, and cache, the backend of every registered layer on ``device`` now:
        ``{layer: (backend, reason)}``. Called outside compiled code after a recipe switch, so
        that a ``torch.compile``'d model finds every choice made (no graph break in forward)."""
        choices = {name: self.backend_choice(name, device) for name in self._names}
        self._remember_backends({n: b for n, (b, _) in choices.items() if b != "unquantized"}, device)
        return choices

    def backend_choice(self, name: str, device: torch.device) -> tuple[str, str]:
        """``(backend, reason)`` for layer ``name`` on ``device`` under the active recipe.

        Raises ``backends.BackendUnavailableError`` when a forced backend cannot run there."""
        spec = self.layer_spec(name)
        if spec is None or spec.is_identity:
            return "unquantized", "the active recipe leaves this layer in the compute dtype"
        return backends.choose(self.backend, spec, device)

    def set_backend(self, backend: str) -> None:
        backend = backends.check_backend(backend)
        backends.require(backend)
        self.backend = backend
        self._backends = {}

    def layer_spec(self, name: str) -> Optional[LayerSpec]:
        """The active spec of the layer called ``name`` (``None``: not quantized)."""
        spec = self._specs.get(name, _MISSING)
        if spec is _MISSING:
            spec = self._register_uncompiled(name)
        return spec

    @torch.compiler.disable
    def _register_uncompiled(self, name: str) -> Optional[LayerSpec]:
        return self.register(name)

    # --------------------------------------------------------------- generators
    def generator(self, name: str, device: torch.device) -> torch.Generator:
        """The stochastic-rounding generator of layer ``name`` on ``device`` (reproducible:
        seeded from the holder's seed, the rank and the name)."""
        key = (name, str(device))
        gen = self._generators.get(key)
        if gen is None:
            if self.seed is None:
                self.seed = torch.initial_seed() % (2**63)
            gen = torch.Generator(device=device)
            gen.manual_seed((self.seed + 1_000_003 * self.rank + zlib.crc32(name.encode())) % (2**63))
            self._generators[key] = gen
        return gen

    def rng_state(self) -> dict[str, torch.Tensor]:
        """Generator states by ``name@device`` (for checkpoints)."""
        return {f"{name}@{dev}": gen.get_state() for (name, dev), gen in self._generators.items()}

    def load_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            name, _, dev = key.rpartition("@")
            self.generator(name, torch.device(dev)).set_state(value)

    def __repr__(self) -> str:
        return f"RecipeHolder({self._recipe.short_str()}, backend={self.backend!r}, layers={len(self._names)})"


_MISSING = object()


# ------------------------------------------------------------------------- maths
def occ_threshold(x: torch.Tensor, quantile: float) -> torch.Tensor:
    """The clamp threshold of OCC: the ``quantile`` of |x| by nearest rank (the
    ``ceil(quantile * n)``-th smallest |x|), a 0-dim tensor of x's dtype (arXiv 2501.17116).

    Exact, and on large CPU tensors ~10x cheaper than one ``kthvalue`` over all of |x|: a
    strided sample gives a lower bound ``lb`` a little below the quantile; when fewer than k
    elements lie below ``lb``, the k-th smallest is the ``(k - below)``-th smallest of the few
    elements at or above ``lb``. Otherwise (adversarial layouts) the full ``kthvalue`` runs.
    """
    a = x.detach().abs().reshape(-1).float()
    n = a.numel()
    k = min(max(1, math.ceil(quantile * n)), n)
    if n >= 1 << 16 and a.device.type == "cpu" and not torch.compiler.is_compiling():
        sample = a[:: n // 4096]  # ~4096 evenly spaced elements
        j = max(1, math.floor((k / n - 0.01) * sample.numel()))  # one percentile of margin
        lb = sample.kthvalue(j).values
        keep = a >= lb
        candidates = a[keep]  # about (1 - quantile + margin) * n elements
        below = n - candidates.numel()
        if below < k:
            return candidates.kthvalue(k - below).values.to(x.dtype)
    return a.kthvalue(k).values.to(x.dtype)


def dge_factor(weight: torch.Tensor, spec: OperandSpec, *, k: float, clamp: float) -> torch.Tensor:
    """DGE: the derivative of the smooth quantizer of arXiv 2501.17116 at each weight, float32.

    With y = w * S (S the block scale of the weight's P2 quantization) lying in the grid
    interval [lo, lo + delta], ``f'(y) = (1/k) * |2 (|y| - lo) / delta - 1| ** (1/k - 1)``,
    clamped at ``clamp`` (their code clamps at 3). |y| is saturated at the format's max first
    (the block's absmax element can land one ulp above it), so the max itself gets 1/k.
    """
    fmt = spec.fmt
    w32 = weight.detach().to(torch.float32)
    if spec.block_size is None:
        y = w32
    else:
        blocks, pad = _blocks_last(w32, spec.block_size, -1)
        scale = block_scales(finite_absmax(blocks), fmt, spec.scale_format)
        y = _unblock(blocks * scale, w32.shape, -1 % w32.dim(), pad, spec.block_size)
    a = torch.clamp(y.abs(), max=fmt.max)  # saturation first: an absmax one ulp above max is at max
    if fmt.emin - fmt.mbits >= -126:
        # floor(log2 a) from the fp32 exponent field (fp32 subnormals and 0 read -127 and clamp
        # to emin), and the step 2**(e - mbits) built from bits: exact, and torch.compile-able
        e = ((a.view(torch.int32) >> 23) & 0xFF) - 127
        e = torch.clamp(e, min=fmt.emin)  # subnormals share emin's step
        delta = ((e - fmt.mbits + 127) << 23).view(torch.float32)  # the grid step around |y|
    else:  # E8 formats: steps below 2**-126 are fp32 subnormals
        _, e = torch.frexp(a)  # a = m * 2**e with m in [0.5, 1): floor(log2 a) = e - 1
        delta = torch.ldexp(torch.ones_like(a), torch.clamp(e - 1, min=fmt.emin) - fmt.mbits)
    lo = torch.floor(a / delta) * delta  # the grid point at or below |y|
    t = 2.0 * (a - lo) / delta - 1.0  # position inside [lo, lo + delta], in [-1, 1)
    factor = (1.0 / k) * t.abs().pow(1.0 / k - 1.0)
    return torch.clamp(factor, max=clamp)


def _q(x: torch.Tensor, spec: Optional[OperandSpec], axis: int, generator: Optional[torch.Generator],
       quantizer: str = "auto") -> torch.Tensor:
    """Fake-quantize one operand along ``axis`` (``x`` itself when the spec is None) with the
    ``quantize`` backend ``quantizer`` (every one is bit-identical to the reference)."""
    if spec is None:
        return x
    if spec.rounding == "stochastic":
        return _quantize_stochastic(x, spec, axis, generator, quantizer)
    block = "none" if spec.block_size is None else str(spec.block_size)
    return torch.ops.lightning_fpq.fake_quantize(x, spec.fmt.name, block, axis, spec.scale_format, quantizer)


@torch.library.custom_op("lightning_fpq::fake_quantize", mutates_args=())
def _fake_quantize(x: torch.Tensor, fmt: str, block_size: str, axis: int, scale_format: str, backend: str) -> torch.Tensor:
    """``quantize`` (nearest rounding) as an opaque op: ``torch.compile`` puts it in the graph
    as one node and runs the quantizer's own fast path, instead of tracing its float64 code."""
    block = None if block_size == "none" else int(block_size) if block_size.isdigit() else block_size
    return quantize(x, fmt, block_size=block, axis=axis, scale_format=scale_format, backend=backend).contiguous()


@_fake_quantize.register_fake
def _(x, fmt, block_size, axis, scale_format, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.compiler.disable
def _quantize_stochastic(x: torch.Tensor, spec: OperandSpec, axis: int, generator: Optional[torch.Generator],
                         quantizer: str) -> torch.Tensor:
    # eager (a graph break under torch.compile): the draws come from the layer's own generator
    return quantize(x, spec.fmt, block_size=spec.block_size, axis=axis, scale_format=spec.scale_format,
                    rounding="stochastic", generator=generator, backend=quantizer)


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


def _plan(backend: str, spec: LayerSpec, n_tokens: int, d_in: int, d_out: int) -> Plan:
    quantizer = backends.QUANTIZER[backend]
    if backend != "triton":
        return Plan(quantizer)
    fwd, dgrad, wgrad = backends.fp4_gemms(spec)

    def fits(op: OperandSpec, length: int) -> bool:  # two codes a byte along the reduction
        return length > 0 and (isinstance(op.block_size, int) or length % 2 == 0)

    if min(n_tokens, d_in, d_out) == 0:
        return Plan(quantizer)
    return Plan(quantizer, (fwd and fits(spec.p1, d_in), dgrad and fits(spec.p3, d_out), wgrad and fits(spec.p5, n_tokens)))


@torch.compiler.disable
def _pack(x: torch.Tensor, spec: OperandSpec, axis: int, generator: Optional[torch.Generator]) -> PackedTensor:
    """E2M1 codes and block scales of ``x`` along ``axis`` (the Triton kernel; its values are
    the reference's, and stochastic rounding draws the reference's noise from ``generator``)."""
    from .kernels import pack_triton

    return pack_triton(x, spec.fmt, block_size=spec.block_size, axis=axis, scale_format=spec.scale_format,
                       rounding=spec.rounding, generator=generator if spec.rounding == "stochastic" else None)


@torch.compiler.disable
def _gemm_fp4(a: PackedTensor, b: PackedTensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``unpack(a) @ unpack(b).T`` on the packed FP4 kernel, fp32 accumulation."""
    from .kernels import gemm_fp4

    return gemm_fp4(a, b, out_dtype=out_dtype)


def _operand(x: torch.Tensor, spec: Optional[OperandSpec], axis: int, generator: Optional[torch.Generator],
             quantizer: str, packed: bool) -> Union[torch.Tensor, PackedTensor]:
    return _pack(x, spec, axis, generator) if packed else _q(x, spec, axis, generator, quantizer)


def quantize_pair(
    x: torch.Tensor,
    first: Optional[OperandSpec],
    second: Optional[OperandSpec],
    generator: Optional[torch.Generator] = None,
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
        self.key, self.wq2, self.wq4 = None, None, None

    def clear(self) -> None:
        self.key, self.wq2, self.wq4 = None, None, None


def _weight_operands(weight, spec: LayerSpec, generator, need_wq4: bool, cache: Optional[WeightCache], plan: Plan):
    """(q2(W), q4(W) or None), from the cache when W has not changed since it was filled."""
    packed = plan.fp4[:2]  # q2 feeds the forward GEMM, q4 the dgrad GEMM
    usable = (cache is not None and not torch.compiler.is_compiling()
              and all(op is None or op.rounding == "nearest" for op in (spec.p2, spec.p4)))
    if not usable:
        return quantize_pair(weight, spec.p2, spec.p4, generator, need_second=need_wq4, quantizer=plan.quantizer,
                             packed=packed)
    key = (weight._version, weight.data_ptr(), tuple(weight.shape), weight.dtype, spec.p2, spec.p4, packed)
    if cache.key == key and (not need_wq4 or cache.wq4 is not None):
        return cache.wq2, cache.wq4
    wq2, wq4 = quantize_pair(weight, spec.p2, spec.p4, generator, need_second=need_wq4, quantizer=plan.quantizer,
                             packed=packed)
    cache.key, cache.wq2, cache.wq4 = key, wq2, wq4
    return wq2, wq4


def _dense(t, cd: torch.dtype):
    return t if isinstance(t, PackedTensor) else t.to(cd)


def _split_packed(t, cd: torch.dtype):
    """A saved operand as (tensor, scales, layout): dense values in ``cd`` with no scales or
    layout, or a PackedTensor's codes and scales plus the rest of it (shape, format, blocks)."""
    if t is None:
        return None, None, None
    if isinstance(t, PackedTensor):
        return t.codes, t.scales, dataclasses.replace(t, codes=None, scales=None)
    return t.to(cd), None, None


def _join_packed(values, scales, layout):
    return values if layout is None else dataclasses.replace(layout, codes=values, scales=scales)


# ------------------------------------------------------------------ autograd fn
def _forward(x2d, weight, bias, spec: LayerSpec, cd: torch.dtype, generator, *, need_xq6: bool, need_wq4: bool,
             plan: Plan = Plan(), cache: Optional[WeightCache] = None):
    """The forward GEMM ``q1(X) @ q2(W).T + b`` (plus OCC's compensation), and, from the same
    reads of X and W, the operands the backward GEMMs will need: q6(X) and q4(W)."""
    fwd_fp4, _, wgrad_fp4 = plan.fp4
    if spec.occ:
        tau = occ_threshold(x2d, spec.occ_quantile)
        x_clamped = torch.clamp(x2d, -tau, tau)
        xq1 = _dense(_operand(x_clamped, spec.p1, -1, generator, plan.quantizer, fwd_fp4), cd)
        xq6 = _operand(x2d, spec.p6, 0, generator, plan.quantizer, wgrad_fp4) if need_xq6 else None
        residual = (x2d - x_clamped).to(cd)  # sparse: the outliers beyond the quantile
    else:
        xq1, xq6 = quantize_pair(x2d, spec.p1, spec.p6, generator, need_second=need_xq6, quantizer=plan.quantizer,
                                 packed=(fwd_fp4, wgrad_fp4))
        xq1 = _dense(xq1, cd)
        residual = None
    # W does not change between forward and backward: q4(W) comes from this same read of W
    wq2, wq4 = _weight_operands(weight, spec, generator, need_wq4, cache, plan)
    if fwd_fp4 and bias is not None:
        # the bias joins the fp32 sums before the one rounding to cd, as in F.linear's epilogue
        y = (_gemm_fp4(xq1, wq2, torch.float32) + bias.to(cd).float()).to(cd)
    elif fwd_fp4:
        y = _gemm_fp4(xq1, wq2, cd)
    else:
        y = F.linear(xq1, wq2.to(cd), bias.to(cd) if bias is not None else None)  # (N, out)
    if residual is not None:
        y = y + F.linear(residual, weight.to(cd))  # OCC compensation in the compute dtype
    return y, xq6, wq4


class _QuantLinearFn(torch.autograd.Function):
    """Y = q1(X) @ q2(W).T + b, with q3..q6 in the backward GEMMs (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec: LayerSpec, compute_dtype: torch.dtype,
                generator: Optional[torch.Generator], save_quantized_weight: bool, cache: Optional[WeightCache],
                plan: Plan):
        x2d = x.reshape(-1, x.shape[-1])  # (N, in)
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cd = compute_dtype
        keep_wq4 = need_dx and save_quantized_weight
        y, xq6, wq4 = _forward(x2d, weight, bias, spec, cd, generator, need_xq6=need_dw, need_wq4=keep_wq4,
                               plan=plan, cache=cache)

        ctx.spec, ctx.cd, ctx.generator, ctx.plan = spec, cd, generator, plan
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        ctx.has_bias = bias is not None
        ctx.wq4_saved = keep_wq4
        # packed operands go through save_for_backward as codes + scales (so saved-tensor hooks,
        # activation checkpointing and retain_graph see them); their layout stays on ctx
        x_codes, x_scales, ctx.x_layout = _split_packed(xq6 if need_dw else None, cd)
        w_codes, w_scales, ctx.w_layout = _split_packed(wq4 if keep_wq4 else None, cd)
        ctx.save_for_backward(x_codes, x_scales, weight, w_codes, w_scales)  # the weight Parameter costs no memory
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x_codes, x_scales, weight, w_codes, w_scales = ctx.saved_tensors
        saved_x = _join_packed(x_codes, x_scales, ctx.x_layout)  # q6(X): values in cd, or packed
        saved_wq4 = _join_packed(w_codes, w_scales, ctx.w_layout)  # q4(W) likewise
        spec, cd, plan = ctx.spec, ctx.cd, ctx.plan
        _, dgrad_fp4, wgrad_fp4 = plan.fp4
        dy2d = grad_out.reshape(-1, grad_out.shape[-1]).to(cd)  # (N, out)
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dyq3, dyq5 = None, None
        if need_dx:
            dyq3, dyq5 = quantize_pair(dy2d, spec.p3, spec.p5, ctx.generator, need_second=need_dw,
                                       quantizer=plan.quantizer, packed=(dgrad_fp4, wgrad_fp4))
        elif need_dw:
            dyq5 = _operand(dy2d, spec.p5, 0, ctx.generator, plan.quantizer, wgrad_fp4)

        dx = dw = db = None
        if need_dx:
            if ctx.wq4_saved:
                wq4 = saved_wq4
            else:
                wq4 = _dense(_operand(weight, spec.p4, 0, ctx.generator, plan.quantizer, dgrad_fp4), cd)
            dx = _gemm_fp4(dyq3, wq4, cd) if dgrad_fp4 else dyq3 @ wq4  # (N, out) @ (out, in)
            dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        if need_dw:
            # (out, N) @ (N, in); packed: dY and X blocked along tokens stand for dY.T and X.T
            dw = _gemm_fp4(dyq5, saved_x, cd) if wgrad_fp4 else dyq5.t() @ saved_x
            if spec.dge:
                dw = dw * dge_factor(weight, spec.p2, k=spec.dge_k, clamp=spec.dge_clamp).to(dw.dtype)
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
    generator: Optional[torch.Generator] = None,
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
        from .backends.torchao_float8 import torchao_float8_linear

        return torchao_float8_linear(x, weight, bias, spec, compute_dtype, autocast_on)
    if backend == "transformer_engine":
        from .backends.transformer_engine import te_linear

        out = te_linear(x, weight, bias, spec, compute_dtype, autocast_on, slot=backend_state)
        if out is not None:
            return out
        # a shape TE's FP8 GEMMs refuse: the same quantized operands on the fused quantizer
        backend = "triton" if backends.available("triton", device_type)[0] else "emulated"
    plan = _plan(backend, spec, x.numel() // max(x.shape[-1], 1), weight.shape[1], weight.shape[0])
    with torch.autocast(device_type, enabled=False) if autocast_on else contextlib.nullcontext():
        if not torch.is_grad_enabled():
            # validation / inference: only the forward GEMM (autograd.Function would still see
            # needs_input_grad=True for the weight and prepare q4(W), q6(X) for nothing)
            x2d = x.reshape(-1, x.shape[-1])  # (N, in)
            y, _, _ = _forward(x2d, weight, bias, spec, compute_dtype, generator, need_xq6=False, need_wq4=False,
                               plan=plan, cache=weight_cache)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return _QuantLinearFn.apply(x, weight, bias, spec, compute_dtype, generator, save_quantized_weight,
                                    weight_cache, plan)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor parameter (tensor parallelism) gathered to its full value, differentiably:
    blocks must see whole reduction dimensions. FSDP2 already hands forward full tensors."""
    if type(t).__name__ == "DTensor" and hasattr(t, "full_tensor"):
        return t.full_tensor()
    return t


# ------------------------------------------------------------------------ module
class QuantLinear(nn.Linear):
    """``nn.Linear`` whose GEMM operands are quantized as the active recipe says.

    Build one directly (``QuantLinear(64, 32, recipe="paper", fmt="e2m1")``) or convert an
    existing model in place with :func:`convert_linears` / ``QuantLinear.from_linear``; either
    way the parameters are those of ``nn.Linear`` and the ``state_dict`` is identical.
    """

    _fpq_holder: RecipeHolder
    _fpq_name: str

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        recipe: Union[QuantRecipe, str] = "paper",
        fmt: Optional[Union[str, FPFormat]] = None,
        block_size=None,
        holder: Optional[RecipeHolder] = None,
        name: str = "",
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if holder is None:
            holder = RecipeHolder(QuantRecipe.coerce(recipe, fmt=fmt, block_size=block_size))
        self._attach(holder, name)

    def _attach(self, holder: RecipeHolder, name: str) -> None:
        # plain attributes (not submodules, buffers or parameters): the state_dict is unchanged
        object.__setattr__(self, "_fpq_holder", holder)
        object.__setattr__(self, "_fpq_name", clean_module_name(name))
        object.__setattr__(self, "_fpq_wcache", WeightCache())
        object.__setattr__(self, "_fpq_backend_state", {})  # a backend's per-layer objects (TE's hidden te.Linear)
        holder.register(self._fpq_name)

    @classmethod
    def from_linear(cls, module: nn.Linear, holder: RecipeHolder, name: str = "") -> "QuantLinear":
        """Convert ``module`` in place (its class changes, its Parameters stay) and return it."""
        new_cls = _quant_class_for(type(module))
        if new_cls is None:
            raise ValueError(
                f"cannot convert {type(module).__qualname__} {name!r}: only nn.Linear itself (plain or "
                "FSDP2-sharded) is converted; a subclass may change forward, which QuantLinear would drop"
            )
        module.__class__ = new_cls
        module._attach(holder, name)
        return module

    @property
    def spec(self) -> Optional[LayerSpec]:
        """The spec this layer uses now (``None``: not quantized by the active recipe)."""
        return self._fpq_holder.layer_spec(self._fpq_name)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        holder = self._fpq_holder
        spec = holder.layer_spec(self._fpq_name)
        if spec is None or spec.is_identity:
            return F.linear(input, self.weight, self.bias)
        generator = holder.generator(self._fpq_name, input.device) if spec.needs_generator else None
        return quant_linear(
            input, self.weight, self.bias, spec, generator=generator,
            backend=holder.layer_backend(self._fpq_name, input.device),
            save_quantized_weight=holder.save_quantized_weight,
            weight_cache=self._fpq_wcache if holder.cache_weights else None,
            backend_state=self._fpq_backend_state,
        )

    def extra_repr(self) -> str:
        spec = self.spec
        return f"{super().extra_repr()}, quant={'off' if spec is None else spec.short_str()}"


_FSDP_QUANT_CLASSES: dict[type, type] = {}


def _quant_class_for(cls: type) -> Optional[type]:
    """The class a module of class ``cls`` becomes: QuantLinear for nn.Linear; for FSDP2's
    per-module class ``FSDPLinear(FSDPModule, nn.Linear)`` a matching ``FSDPQuantLinear``."""
    if cls is nn.Linear or issubclass(cls, QuantLinear):
        return QuantLinear if cls is nn.Linear else cls
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    if issubclass(cls, FSDPModule) and cls.__bases__ == (FSDPModule, nn.Linear):
        new = _FSDP_QUANT_CLASSES.get(cls)
        if new is None:
            new = type(f"FSDP{QuantLinear.__name__}", (FSDPModule, QuantLinear), dict(cls.__dict__))
            _FSDP_QUANT_CLASSES[cls] = new
        return new
    return None


def convert_linears(
    model: nn.Module,
    holder: RecipeHolder,
    *,
    only_included: bool = True,
) -> tuple[list[str], list[str]]:
    """Convert, in place, every ``nn.Linear`` of ``model`` that the holder's recipe includes
    (every one when ``only_included=False``). Returns ``(converted, skipped)`` names;
    ``skipped`` lists included layers whose class is an ``nn.Linear`` subclass that cannot be
    converted (the caller warns with their names).

    Idempotent: layers already converted are re-attached to ``holder``.
    """
    converted, skipped = [], []
    recipe = holder.recipe
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        if only_included and not isinstance(module, QuantLinear) and not recipe.is_included(name):
            continue
        if _quant_class_for(type(module)) is None:
            skipped.append(clean_module_name(name))
            continue
        QuantLinear.from_linear(module, holder, name)
        converted.append(clean_module_name(name))
    return converted, skipped


def quantized_layers(model: nn.Module) -> Iterable[tuple[str, QuantLinear]]:
    """``(name, layer)`` for every ``QuantLinear`` of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield clean_module_name(name), module


def _warn(message: str) -> None:  # pragma: no cover - used by callers without Lightning
    warnings.warn(message, stacklevel=3)
