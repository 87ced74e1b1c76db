"""``nn.MultiheadAttention`` whose projections are quantized like every other linear layer.

PyTorch runs the q/k/v in-projection and the output projection of ``nn.MultiheadAttention``
inside ``F.multi_head_attention_forward``, on its weights directly: converting its
``out_proj`` would change nothing, because that module's ``forward`` is never called.
:class:`QuantMultiheadAttention` (the class a converted layer takes, its Parameters and
``state_dict`` unchanged) computes the same attention with its two GEMMs through
:func:`~lightning_fpq.linear_function.quant_linear`:

- the in-projection is the layer itself (its name, e.g. ``layers.0.self_attn``, is what recipe
  rules match): one GEMM on the packed ``in_proj_weight`` for self-attention, as PyTorch does,
  or its query and key/value slices for cross-attention;
- the output projection is ``out_proj``, converted to a :class:`~lightning_fpq.linear.QuantLinear`
  of its own (``layers.0.self_attn.out_proj``) and called as a module.

Between the two, the attention is PyTorch's, step for step (the same mask handling, the same
``scaled_dot_product_attention`` call, or the explicit softmax when the weights are asked
for), so that with unquantized projections the result is bit-identical to
``nn.MultiheadAttention`` (``tests/test_attention.py``). Layers with separate key/value
widths (``kdim``/``vdim``), ``add_bias_kv`` or ``add_zero_attn`` are not converted:
:func:`unconvertible_reason` says why, and the precision plugin names them in its warning.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .linear import QuantGemm
from .linear_function import WeightCache


def unconvertible_reason(module: nn.MultiheadAttention) -> Optional[str]:
    """Why ``module`` stays unquantized (``None``: it can be converted)."""
    if not module._qkv_same_embed_dim:
        return "separate key/value widths (kdim/vdim) are not converted"
    if module.bias_k is not None:
        return "add_bias_kv=True is not converted"
    if module.add_zero_attn:
        return "add_zero_attn=True is not converted"
    return None


class QuantMultiheadAttention(QuantGemm, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with its in-projection quantized as the active recipe says
    for this layer's name and its ``out_proj`` a quantized layer of its own (module docstring)."""

    # forward's query is the in-projection's input (for self-attention), but the gradient of the
    # attention output is not the in-projection's dY
    module_io_is_gemm_io = False

    def gemm_weight(self) -> torch.Tensor:
        return self.in_proj_weight  # (3 E, E): the in-projection's GEMM weight

    def _project(self, x: torch.Tensor, part: slice) -> torch.Tensor:
        """``x @ W[part].T + b[part]`` with the in-projection's operands quantized."""
        weight = self.in_proj_weight[part]
        bias = self.in_proj_bias[part] if self.in_proj_bias is not None else None
        # the quantized-weight cache and a backend's per-layer objects are per weight slice
        key = (part.start, part.stop)
        caches = self.__dict__.setdefault("_fpq_slice_caches", {})
        cache = self._fpq_wcache if part == slice(None) else caches.setdefault(key, WeightCache())
        return self.quantized_gemm(x, weight, bias, cache, self._fpq_backend_state.setdefault(key, {}))

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        # PyTorch's own checks and messages for the shapes and masks (private helpers of
        # torch.nn.functional, present from torch 2.0 on)
        batched = F._mha_shape_check(  # type: ignore[attr-defined]
            query, key, value, key_padding_mask, attn_mask, self.num_heads
        )
        same_kv, self_attention = key is value, query is key and key is value
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        heads = self.num_heads
        head_dim = embed_dim // heads
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal=True needs attn_mask (nn.Transformer.generate_square_subsequent_mask)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask,
                mask_name="attn_mask",
                other_type=None,
                other_name="",
                target_type=query.dtype,
                check_other=False,
            )
            if key_padding_mask is not None:
                is_causal = False

        # the in-projection: one GEMM for self-attention, else query and key/value slices
        e = embed_dim
        if self_attention:
            q, k, v = self._project(query, slice(None)).unflatten(-1, (3, e)).unbind(-2)
        elif same_kv:
            q = self._project(query, slice(0, e))
            k, v = self._project(key, slice(e, 3 * e)).unflatten(-1, (2, e)).unbind(-2)
        else:
            q, k, v = (self._project(t, slice(i * e, (i + 1) * e)) for i, t in enumerate((query, key, value)))

        if attn_mask is not None and attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(f"attn_mask has shape {tuple(attn_mask.shape)}, expected {(tgt_len, src_len)}")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask is not None and attn_mask.shape != (bsz * heads, tgt_len, src_len):
            raise RuntimeError(
                f"attn_mask has shape {tuple(attn_mask.shape)}, expected {(tgt_len, src_len)} or "
                f"{(bsz * heads, tgt_len, src_len)}"
            )
        # (length, batch, E) -> (batch * heads, length, head_dim), contiguous as PyTorch makes them
        q = q.contiguous().view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.contiguous().view(src_len, bsz * heads, head_dim).transpose(0, 1)
        v = v.contiguous().view(src_len, bsz * heads, head_dim).transpose(0, 1)
        if key_padding_mask is not None:
            padding = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
            padding = padding.reshape(bsz * heads, 1, src_len)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            scores = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                scores = torch.baddbmm(attn_mask, scores, k.transpose(-2, -1))
            else:
                scores = torch.bmm(scores, k.transpose(-2, -1))
            weights = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(tgt_len * bsz, embed_dim)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            if attn_mask is not None:
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, heads, -1, src_len)
            q = q.view(bsz, heads, tgt_len, head_dim)
            k = k.view(bsz, heads, src_len, head_dim)
            v = v.view(bsz, heads, src_len, head_dim)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            out = out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, embed_dim)
            weights = None

        out = self.out_proj(out).view(tgt_len, bsz, -1)  # a QuantLinear of its own
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights
