"""``QuantLinear``: an ``nn.Linear`` whose three GEMMs see quantized operands, and the
in-place conversion of a model's linear layers.

Conversion is in place: :func:`convert_linears` swaps the ``__class__`` of each selected
``nn.Linear`` to :class:`QuantLinear`, so the module keeps the very same ``weight`` and
``bias`` ``Parameter`` objects (optimizer state, DDP buckets and FSDP2 sharding stay valid)
and the model's ``state_dict`` keys do not change. Every ``QuantLinear`` of a model holds the
same :class:`~lightning_fpq.state.QuantState` and asks it for its ``LayerSpec`` at each call,
so switching the state's recipe switches precision at the next batch without rebuilding
anything. The maths of one call is :func:`~lightning_fpq.linear_function.quant_linear`.

This module knows formats, recipes and the state, and nothing of Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .formats import FPFormat
from .linear_function import WeightCache, quant_linear
from .recipe import QuantRecipe, clean_module_name
from .spec import LayerSpec
from .state import QuantState

__all__ = [
    "QuantGemm",
    "QuantLinear",
    "convert_linears",
    "is_gemm_layer",
    "quantized_layers",
    "restore_linears",
    "tied_to_an_embedding",
]


class QuantGemm(nn.Module):
    """What every quantized layer does: ask the shared :class:`~lightning_fpq.state.QuantState`
    for its spec and run its GEMMs through :func:`~lightning_fpq.linear_function.quant_linear`.
    A layer class is this plus the class it converts (``nn.Linear``, Hugging Face's ``Conv1D``);
    :meth:`gemm_weight` gives its weight as ``(out_features, in_features)``."""

    weight: torch.Tensor
    bias: Any  # Optional[Tensor]; nn.Linear and Conv1D annotate it differently
    _fpq_state: QuantState
    _fpq_wcache: WeightCache
    _fpq_backend_state: dict
    _fpq_name: str
    #: whether forward's first argument is the GEMM's input and the gradient of its output is the
    #: GEMM's dY (an attention layer's output is not its in-projection's): what QuantizationHealth hooks
    module_io_is_gemm_io: bool = True

    def gemm_weight(self) -> torch.Tensor:
        return self.weight  # nn.Linear's layout: (out, in)

    def _attach(self, state: QuantState, name: str) -> None:
        # plain attributes (not submodules, buffers or parameters, see _ATTRIBUTES): the state_dict is unchanged
        object.__setattr__(self, "_fpq_state", state)
        object.__setattr__(self, "_fpq_name", clean_module_name(name))
        object.__setattr__(self, "_fpq_wcache", WeightCache())
        object.__setattr__(self, "_fpq_backend_state", {})  # a backend's per-layer objects (TE's hidden te.Linear)
        state.register(self._fpq_name)

    @property
    def spec(self) -> Optional[LayerSpec]:
        """The spec this layer uses now (``None``: not quantized by the active recipe)."""
        return self._fpq_state.layer_spec(self._fpq_name)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.quantized_gemm(input, self.gemm_weight(), self.bias, self._fpq_wcache, self._fpq_backend_state)

    def quantized_gemm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        cache: WeightCache,
        backend_state: dict,
    ) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` with the operands quantized as this layer's spec says;
        ``cache`` holds the quantized ``weight`` between calls, ``backend_state`` a backend's
        objects for it."""
        state = self._fpq_state
        spec = state.layer_spec(self._fpq_name)
        if spec is None or spec.is_identity:
            return F.linear(x, weight, bias)
        generator = state.generator(self._fpq_name, x.device) if spec.needs_generator else None
        return quant_linear(
            x,
            weight,
            bias,
            spec,
            generator=generator,
            backend=state.layer_backend(self._fpq_name, x.device),
            save_quantized_weight=state.save_quantized_weight,
            weight_cache=cache if state.cache_weights else None,
            backend_state=backend_state,
        )

    def extra_repr(self) -> str:
        spec = self.spec
        quant = f"quant={'off' if spec is None else spec.short_str()}"
        return ", ".join(part for part in (super().extra_repr(), quant) if part)


class QuantLinear(QuantGemm, nn.Linear):
    """``nn.Linear`` whose GEMM operands are quantized as the active recipe says.

    Build one directly (``QuantLinear(64, 32, recipe="paper", fmt="e2m1")``) or convert an
    existing model in place with :func:`convert_linears` / ``QuantLinear.from_linear``; either
    way the parameters are those of ``nn.Linear`` and the ``state_dict`` is identical.
    """

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
        state: Optional[QuantState] = None,
        name: str = "",
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if state is None:
            state = QuantState(QuantRecipe.coerce(recipe, fmt=fmt, block_size=block_size))
        self._attach(state, name)

    @classmethod
    def from_linear(cls, module: nn.Module, state: QuantState, name: str = "") -> QuantGemm:
        """Convert ``module`` (an ``nn.Linear`` or a Hugging Face ``Conv1D``) in place: its class
        changes, its Parameters stay; returns it."""
        new_cls = _quant_class_for(type(module))
        if new_cls is None:
            raise ValueError(
                f"cannot convert {type(module).__qualname__} {name!r}: only nn.Linear itself (plain or "
                "FSDP2-sharded) and Hugging Face's Conv1D are converted; a subclass may change forward, "
                "which QuantLinear would drop"
            )
        module.__class__ = new_cls
        converted: QuantGemm = module  # type: ignore[assignment]  # its class is a QuantGemm now
        converted._attach(state, name)
        return converted


def _transposed_weight(self: QuantGemm) -> torch.Tensor:
    return self.weight.t()  # Conv1D stores (in, out): a view, so gradients reach the Parameter


_QUANT_CLASSES: dict[type, type] = {}  # plain class -> its quantized class (FSDP2's and Conv1D's, made once)
# what _attach adds (and QuantMultiheadAttention's caches of its weight slices)
_ATTRIBUTES = ("_fpq_state", "_fpq_name", "_fpq_wcache", "_fpq_backend_state", "_fpq_slice_caches")


def is_hf_conv1d(cls: type) -> bool:
    """Hugging Face's ``transformers`` ``Conv1D`` (GPT-2's linear layer: weight ``(in, out)``,
    ``y = x @ W + b``), recognised by name so that transformers is not imported."""
    return cls.__name__ == "Conv1D" and cls.__module__.split(".")[0] == "transformers"


def is_gemm_layer(module: nn.Module) -> bool:
    """A layer this package converts: ``nn.Linear`` (and subclasses, refused with a reason),
    ``Conv1D`` or ``nn.MultiheadAttention`` (``lightning_fpq.attention``)."""
    return isinstance(module, (nn.Linear, nn.MultiheadAttention)) or is_hf_conv1d(type(module))


def _quant_class_for(cls: type) -> Optional[type]:
    """The class a module of class ``cls`` becomes: QuantLinear for nn.Linear; for FSDP2's
    per-module class ``FSDPLinear(FSDPModule, nn.Linear)`` a matching ``FSDPQuantLinear``; for
    Hugging Face's ``Conv1D`` a ``QuantConv1D``; for ``nn.MultiheadAttention`` a
    ``QuantMultiheadAttention`` and for its ``out_proj`` (an ``nn.Linear`` subclass that changes
    nothing) a ``QuantLinear`` of that class."""
    if cls is nn.Linear or issubclass(cls, QuantGemm):
        return QuantLinear if cls is nn.Linear else cls
    new = _QUANT_CLASSES.get(cls)
    if new is not None:
        return new
    if is_hf_conv1d(cls):
        new = type("QuantConv1D", (QuantGemm, cls), {"gemm_weight": _transposed_weight})
    elif cls is nn.MultiheadAttention:
        from .attention import QuantMultiheadAttention  # it imports this module

        new = QuantMultiheadAttention
    elif cls is NonDynamicallyQuantizableLinear:
        new = type(f"Quant{cls.__name__}", (QuantLinear, cls), {})
    else:
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # pragma: no cover - torch without distributed
            return None
        if not (issubclass(cls, FSDPModule) and cls.__bases__ == (FSDPModule, nn.Linear)):
            return None
        new = type(f"FSDP{QuantLinear.__name__}", (FSDPModule, QuantLinear), dict(cls.__dict__))
    _QUANT_CLASSES[cls] = new
    return new


def convert_linears(
    model: nn.Module,
    state: QuantState,
    *,
    only_included: bool = True,
    leave: Iterable[str] = (),
) -> tuple[list[str], list[str]]:
    """Convert, in place, every ``nn.Linear`` of ``model`` that the state's recipe includes
    (every one when ``only_included=False``), except the layers named in ``leave``. Returns
    ``(converted, skipped)`` names; ``skipped`` lists included layers whose class is an
    ``nn.Linear`` subclass that cannot be converted (the caller warns with their names).

    Idempotent: layers already converted are re-attached to ``state``.
    """
    converted, skipped = [], []
    recipe = state.recipe
    leave = set(leave)
    # an attention layer's out_proj: its forward runs only once the attention layer is converted
    attention_of = {id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    for name, module in list(model.named_modules()):
        if not is_gemm_layer(module) or clean_module_name(name) in leave:
            continue
        if only_included and not isinstance(module, QuantGemm) and not recipe.is_included(name):
            continue
        if isinstance(module, nn.MultiheadAttention) and _attention_unconvertible(module):
            continue  # named, with the reason, by unquantized_gemm_layers
        if id(module) in attention_of and not isinstance(attention_of[id(module)], QuantGemm):
            continue
        if _quant_class_for(type(module)) is None:
            skipped.append(clean_module_name(name))
            continue
        QuantLinear.from_linear(module, state, name)
        converted.append(clean_module_name(name))
    return converted, skipped


def _attention_unconvertible(module: nn.MultiheadAttention) -> Optional[str]:
    """Why this attention layer cannot be converted (``None``: it can)."""
    if type(module) is not nn.MultiheadAttention and not isinstance(module, QuantGemm):
        return "a subclass of nn.MultiheadAttention (its forward may differ) is not converted"
    from .attention import unconvertible_reason

    return unconvertible_reason(module)


#: layers that compute GEMMs this package leaves in the compute dtype, and why
_UNQUANTIZED_GEMMS: tuple[tuple[type, str], ...] = (
    (nn.modules.conv._ConvNd, "convolutions are not quantized"),
    (nn.Bilinear, "bilinear layers are not quantized"),
)
_ATTENTION_UNCONVERTED = "its q/k/v and output projections run inside F.multi_head_attention_forward"


def unquantized_gemm_layers(model: nn.Module) -> dict[str, str]:
    """``{name: why}`` of the layers of ``model`` that compute a GEMM and are not quantized: an
    ``nn.MultiheadAttention`` not (or not yet) converted, convolutions, ``nn.Bilinear``."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and not isinstance(module, QuantGemm):
            why: Optional[str] = _attention_unconvertible(module) or _ATTENTION_UNCONVERTED
        else:
            why = next((why for cls, why in _UNQUANTIZED_GEMMS if isinstance(module, cls)), None)
        if why is not None:
            found[clean_module_name(name)] = why
    return found


def tied_to_an_embedding(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` layers whose weight *is* an ``nn.Embedding``'s weight (an output
    head tied to the input embedding, as in BERT or GPT-2): left unquantized by default, like the
    other output heads."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [
        clean_module_name(name)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module.weight) in embedding_weights
    ]


def restore_linears(model: nn.Module) -> list[str]:
    """Turn every ``QuantLinear`` of ``model`` back into a plain ``nn.Linear``, in place (the same
    Parameters and state_dict keys), for export and inference; returns their names. A model
    restored this way computes exactly ``nn.Linear`` again, under any Trainer."""
    restored = []
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantGemm):
            module.__class__ = _plain_class_for(type(module))
            for attribute in _ATTRIBUTES:
                module.__dict__.pop(attribute, None)
            restored.append(clean_module_name(name))
    return restored


def _plain_class_for(cls: type) -> type:
    return next((plain for plain, quant in _QUANT_CLASSES.items() if quant is cls), nn.Linear)


def quantized_layers(model: nn.Module) -> Iterable[tuple[str, QuantGemm]]:
    """``(name, layer)`` for every quantized layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, QuantGemm):
            yield clean_module_name(name), module
