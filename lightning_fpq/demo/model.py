"""The demo's model: a small decoder-only GPT (nanoGPT-style) and its LightningModule.

Why our own model: Lightning's demo ``Transformer`` lets the decoder see the token it
predicts, so its loss falls for the wrong reason. This GPT is causal (tested: changing token
``t`` leaves the logits at positions ``< t`` unchanged).

Built from plain ``nn.Linear`` layers so a quantization plugin can convert them by name:
``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``, ``blocks.{i}.mlp.fc``, ``blocks.{i}.mlp.proj``;
the classifier is a separate, untied ``lm_head`` so rules can leave it in high precision.
The embeddings are ``tok_emb`` and ``pos_emb``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Union

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from .. import _config


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a :class:`GPT`. ``GPTConfig.from_name("demo")`` gives a named size (:data:`GPT_CONFIGS`)."""

    vocab_size: int = 256
    block_size: int = 128  # longest sequence (position embeddings)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in the Linears and LayerNorms (lm_head never has one)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "dropout":
                _config.number(value, what="dropout", low=0.0, high=1.0, high_open=True)
            elif f.name == "bias":
                _config.flag(value, what="bias")
            else:
                _config.integer(value, what=f.name, low=1)
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"valid n_head values: {[h for h in range(1, self.n_embd + 1) if self.n_embd % h == 0]}"
            )

    @classmethod
    def from_name(cls, name: Union[str, GPTConfig, Mapping[str, Any]]) -> GPTConfig:
        """A named size (case-insensitive), ``name`` itself if it is already a config, or a config
        built from a mapping of its fields (what a logger can save as hyperparameters)."""
        if isinstance(name, GPTConfig):
            return name
        if isinstance(name, Mapping):
            return _config.from_mapping(cls, name, what="GPT config")
        key = str(name).lower()
        if key not in GPT_CONFIGS:
            raise ValueError(f"unknown GPT config {name!r}; valid names: {sorted(GPT_CONFIGS)}")
        return GPT_CONFIGS[key]

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count of the model this config builds, without building it.

        ``non_embedding=True`` leaves out ``tok_emb`` and ``pos_emb`` (lookups, not matmuls),
        the ``N`` of Kaplan-style scaling laws; the untied ``lm_head`` is a matmul and counts.
        """
        c, v, t, b = self.n_embd, self.vocab_size, self.block_size, int(self.bias)
        layer_norm = c + c * b
        per_block = (
            2 * layer_norm  # ln_1, ln_2
            + 3 * c * c
            + 3 * c * b  # attn.qkv
            + c * c
            + c * b  # attn.proj
            + 4 * c * c
            + 4 * c * b  # mlp.fc
            + 4 * c * c
            + c * b  # mlp.proj
        )
        total = self.n_layer * per_block + layer_norm + v * c  # blocks, ln_f, lm_head
        return total if non_embedding else total + v * c + t * c

    def short_str(self) -> str:
        return (
            f"GPT {self.n_layer}L x {self.n_embd}d x {self.n_head}h, T={self.block_size}, "
            f"V={self.vocab_size}, {self.num_params() / 1e6:.2f}M params"
        )


# Checkpoints store the config in hparams; Trainer.fit(ckpt_path=...) loads with
# weights_only=True, which accepts only allow-listed classes.
torch.serialization.add_safe_globals([GPTConfig])

# Named sizes. tiny: unit tests; demo: trains visibly on a laptop CPU in minutes; small:
# a longer CPU run; 100m / 1b: GPU benchmarks only (never instantiate them in tests).
GPT_CONFIGS: dict[str, GPTConfig] = {
    "micro": GPTConfig(block_size=64, n_layer=2, n_head=1, n_embd=32),  # the D_crit experiment's model
    "tiny": GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=48),
    "demo": GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128),
    "small": GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),
    "100m": GPTConfig(block_size=1024, n_layer=14, n_head=12, n_embd=768),
    "1b": GPTConfig(block_size=2048, n_layer=20, n_head=16, n_embd=2048),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        # is_causal=True: position t attends to positions <= t only.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(x))  # (B, T, 4C)
        return self.dropout(self.proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT(nn.Module):
    """Decoder-only transformer: ``forward(idx)`` maps ``(B, T)`` token ids to ``(B, T, V)`` logits."""

    def __init__(self, config: GPTConfig | str = "demo") -> None:
        super().__init__()
        self.config = config = GPTConfig.from_name(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale the init of the projections that write into the residual stream by
        # 1/sqrt(2 * n_layer), so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Counted from the parameters; see :meth:`GPTConfig.num_params` for the definition."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        return n

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds the model's block_size {self.config.block_size}; "
                "crop the input or build the model with a larger block_size"
            )
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        return self.lm_head(self.ln_f(x))  # (B, T, V)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` ``(B, T)``; returns ``(B, T + max_new_tokens)``."""
        _config.number(temperature, what="temperature", low=0.0, low_open=True)
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]  # (B, <=block_size)
            logits = self(context)[:, -1, :] / temperature  # (B, V)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)  # (B, V)
            nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)  # (B, T + 1)
        return idx


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats, computed in fp32: ``(B, T, V)`` vs ``(B, T)``."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def cosine_with_warmup(step: int, warmup_steps: int, max_steps: int | None, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, cosine decay to ``min_lr_ratio`` at ``max_steps``, then flat.

    ``max_steps=None`` (unknown length): constant 1 after warmup.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if max_steps is None or max_steps <= warmup_steps:
        return 1.0 if max_steps is None else min_lr_ratio
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class GPTLightning(LightningModule):
    """Next-byte language modelling with :class:`GPT`, AdamW and a warmup + cosine schedule.

    Args:
        config: a :class:`GPTConfig` or a name from :data:`GPT_CONFIGS`.
        lr: peak learning rate.
        weight_decay: AdamW decay, applied to matrices and embeddings only (not to biases
            or LayerNorm parameters).
        warmup_steps: optimizer steps of linear warmup.
        max_steps: where the cosine reaches ``min_lr_ratio * lr``; ``None``: the trainer's
            estimate of its total optimizer steps.
        betas: AdamW betas.
        min_lr_ratio: final learning rate as a fraction of ``lr``.

    Logs ``train/loss`` every step and ``val/loss`` per validation epoch (mean nats per byte).
    """

    def __init__(
        self,
        config: Union[GPTConfig, str, Mapping[str, Any]] = "demo",
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 50,
        max_steps: int | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        _config.number(lr, what="lr", low=0.0, low_open=True)
        _config.number(weight_decay, what="weight_decay", low=0.0)
        _config.integer(warmup_steps, what="warmup_steps", low=0)
        _config.integer(max_steps, what="max_steps", low=1, optional=True)
        _config.number(min_lr_ratio, what="min_lr_ratio", low=0.0, high=1.0)
        self.save_hyperparameters()
        self.config = GPTConfig.from_name(config)
        self.model = GPT(self.config)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)  # (B, T, V)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch  # (B, T), (B, T)
        loss = lm_loss(self.model(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch  # (B, T), (B, T)
        loss = lm_loss(self.model(x), y)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        max_steps = hp.max_steps
        if max_steps is None:
            estimate = self.trainer.estimated_stepping_batches
            max_steps = int(estimate) if math.isfinite(estimate) else None
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: cosine_with_warmup(step, hp.warmup_steps, max_steps, hp.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


__all__ = [
    "GPT",
    "GPTConfig",
    "GPTLightning",
    "GPT_CONFIGS",
    "cosine_with_warmup",
    "lm_loss",
]
