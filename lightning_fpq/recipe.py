"""Quantization recipes: which linear layers are quantized, and how each of their six GEMM
operands is (the operands, their roles and P numbers: :mod:`lightning_fpq.spec`).

A :class:`QuantRecipe` is one model: a ``default`` :class:`~lightning_fpq.spec.LayerSpec` for
every included layer, plus per-layer selection (``include``/``exclude`` fnmatch patterns on
fully qualified module names) and ``rules`` that give matching layers another spec. Its
``fmt`` and ``block_size`` (what the scaling law is asked about) are derived from the default
spec, never stored apart. Named recipes come from :meth:`QuantRecipe.from_name`; a recipe that
carries a name always holds exactly that named recipe's spec (anything else is ``"custom"``).
Recipes round-trip through YAML and dicts (:meth:`to_dict` / :meth:`from_dict`).

This module knows formats and specs, and nothing of Lightning or of the layers that consume it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from . import _config
from ._config import BlockSize
from .formats import FormatLike, FPFormat
from .named_recipes import SCHEMES, RecipeName, check_admits, named_spec, sibling_for
from .spec import FP4_OPTION_NAMES, P_NUMBERS, ROLE_OF, ROLES, FP4Options, LayerSpec, OperandSpec

__all__ = [
    "QuantRecipe",
    "LayerRule",
    "RecipeName",
    "OperandSpec",
    "LayerSpec",
    "DEFAULT_EXCLUDE",
    "DEFAULT_INCLUDE",
    "clean_module_name",
    "named_recipes",
]

#: Layers left unquantized unless a recipe says otherwise (the paper quantizes the linear layers
#: of the transformer blocks only: not the embeddings, which are not ``nn.Linear`` anyway, and not
#: the output classifier). Patterns are fnmatch'ed against the fully qualified module name as
#: ``model.named_modules()`` gives it, e.g. ``"model.lm_head"`` inside a LightningModule, so each
#: head is listed bare and under a parent. Heads are matched by their last name component only,
#: so a block's inner ``attention.output.dense`` (BERT) is *not* excluded.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "lm_head",
    "*.lm_head",  # GPT-style language-model heads
    "*classifier*",  # HF / torchvision classifiers
    "head",
    "*.head",  # timm ViT heads
    "output",
    "*.output",  # "output" projections used as the model's last layer
    "score",
    "*.score",  # HF sequence-classification heads
)
DEFAULT_INCLUDE: tuple[str, ...] = ("*",)
CUSTOM = "custom"
UNQUANTIZED = (FPFormat.parse("bf16"), FPFormat.parse("fp32"))


# ----------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class LayerRule:
    """Layers whose name matches ``pattern`` (fnmatch) use another spec.

    ``recipe``: a named recipe for those layers (its own default format and block size unless
    ``fmt``/``block_size`` are given); ``None``: the parent recipe at ``fmt``/``block_size``
    (:meth:`QuantRecipe.with_format`). ``block_size=None`` keeps the block size, ``"none"`` asks
    for no scaling. Example: keep the first block in FP8 while the rest runs FP4:
    ``LayerRule("model.blocks.0.*", fmt="e4m3")``; keep it unquantized:
    ``LayerRule("model.blocks.0.*", recipe="bf16")``.
    """

    pattern: str
    recipe: Optional[str] = None
    fmt: Optional[FPFormat] = None
    block_size: Union[int, str, None] = None  # None: inherit; "none": no scaling (the YAML form)

    def __post_init__(self) -> None:
        what = f"LayerRule({self.pattern!r})"
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"LayerRule pattern={self.pattern!r} is not valid: expected a non-empty fnmatch pattern")
        if self.recipe is not None:
            object.__setattr__(self, "recipe", RecipeName.from_name(self.recipe).value)
        if self.fmt is not None:
            try:
                object.__setattr__(self, "fmt", FPFormat.parse(self.fmt))
            except ValueError as err:
                raise ValueError(f"{what} fmt: {err}") from None
        if self.block_size is not None:
            block = _config.block_size(self.block_size, what=f"{what} block_size")
            object.__setattr__(self, "block_size", _config.block_size_yaml(block))
        if self.recipe is None and self.fmt is None and self.block_size is None:
            raise ValueError(f"{what} changes nothing: give recipe=, fmt= or block_size=")

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)

    def short_str(self) -> str:
        bits = [b for b in (self.recipe, self.fmt and self.fmt.name, self.block_size and f"B={self.block_size}") if b]
        return f"{self.pattern}->{','.join(bits)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "recipe": self.recipe,
            "fmt": self.fmt.name if self.fmt else None,
            "block_size": self.block_size,
        }

    @classmethod
    def coerce(cls, value: Any, *, what: str = "rule") -> LayerRule:
        if isinstance(value, LayerRule):
            return value
        if isinstance(value, Mapping):
            return _config.from_mapping(cls, value, what=what)
        raise ValueError(
            f"{what}={value!r} is not valid: expected a LayerRule or a mapping with keys {_config.field_names(cls)}"
        )


# ---------------------------------------------------------------------------- recipe
#: the keys of a recipe's YAML/dict form: the named recipe and its parameters, the default
#: spec's operands and FP4 options (flat, as ``QuantRecipe(dge=True)`` takes them), and the
#: layer selection
DOCUMENT_KEYS = (
    "name",
    "fmt",
    "block_size",
    "operands",
    *FP4_OPTION_NAMES,
    "include",
    "exclude",
    "default_exclude",
    "rules",
)


@dataclass(frozen=True, init=False)
class QuantRecipe:
    """Which GEMM operands of which linear layers are quantized, and how.

    Build one with :meth:`from_name` (``QuantRecipe.from_name("paper", fmt="e3m2", block_size=64)``),
    from YAML (:meth:`from_yaml`), or operand by operand:
    ``QuantRecipe(weight=OperandSpec("e4m3"))`` (P numbers work too: ``p2=...``).

    Args:
        name: a named recipe (:class:`RecipeName`) or "custom". A named recipe given without a
            spec gets that name's defaults; given with one, the spec must be exactly that named
            recipe's at the spec's format and block size (a contradiction is an error).
        default: the :class:`LayerSpec` of every included layer no rule matches.
        include, exclude: fnmatch patterns on fully qualified module names. A linear layer is
            quantized when it matches an include pattern and no exclude pattern. ``exclude``
            adds to the output heads of :data:`DEFAULT_EXCLUDE`, which stay excluded unless
            ``default_exclude=False``.
        default_exclude: keep the patterns of :data:`DEFAULT_EXCLUDE` in ``exclude``.
        rules: :class:`LayerRule` overrides, first match wins.
        **layer: instead of ``default``: operands by P number or role, FP4 options by name
            (``dge=True``) or as ``fp4=FP4Options(...)`` (:meth:`LayerSpec.build`).

    The default spec's fields read through the recipe: ``recipe.p2``, ``recipe.weight``,
    ``recipe.dge``.
    """

    name: str
    default: LayerSpec
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    rules: tuple[LayerRule, ...]

    def __init__(
        self,
        name: Union[str, RecipeName] = CUSTOM,
        default: Optional[LayerSpec] = None,
        *,
        include: Iterable[str] = DEFAULT_INCLUDE,
        exclude: Iterable[str] = (),
        default_exclude: bool = True,
        rules: Union[Iterable[Union[LayerRule, Mapping]], LayerRule, Mapping] = (),
        **layer: Any,
    ) -> None:
        for word in ("fmt", "block_size"):
            if word in layer:
                raise ValueError(
                    f"QuantRecipe({word}={layer[word]!r}) is not valid: a recipe's {word} is derived from its "
                    f"operands; use QuantRecipe.from_name(name, {word}=...) or give each operand its own"
                )
        name = self._check_name(name)
        if default is not None and layer:
            raise ValueError(f"QuantRecipe: give default= or operand/option keywords {sorted(layer)}, not both")
        if default is None:
            base = (
                None
                if name == CUSTOM
                else named_spec(
                    RecipeName(name), SCHEMES[RecipeName(name)].default_fmt, SCHEMES[RecipeName(name)].default_block
                )
            )
            default = LayerSpec.build(base, what="QuantRecipe", **layer)
        elif not isinstance(default, LayerSpec):
            raise ValueError(f"QuantRecipe default={default!r} is not valid: expected a LayerSpec")
        if name != CUSTOM:
            self._check_named(RecipeName(name), default)
        if isinstance(rules, (LayerRule, Mapping)):
            rules = (rules,)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "default", default)
        object.__setattr__(self, "include", _config.patterns(include, what="QuantRecipe include"))
        exclude = _config.patterns(exclude, what="QuantRecipe exclude")
        if _config.flag(default_exclude, what="QuantRecipe default_exclude"):
            exclude = tuple(dict.fromkeys(DEFAULT_EXCLUDE + exclude))  # the heads first, each pattern once
        object.__setattr__(self, "exclude", exclude)
        object.__setattr__(self, "rules", tuple(LayerRule.coerce(r, what=f"rules[{i}]") for i, r in enumerate(rules)))

    @staticmethod
    def _check_name(name: Any) -> str:
        valid = [m.value for m in RecipeName] + [CUSTOM]
        text = name.value if isinstance(name, RecipeName) else name
        if not isinstance(text, str) or text.strip().lower() not in valid:
            raise ValueError(f"QuantRecipe name={name!r} is not valid: expected one of {valid}")
        return text.strip().lower()

    @staticmethod
    def _check_named(name: RecipeName, spec: LayerSpec) -> None:
        """A named recipe's spec must be that name's at the spec's own format and block size."""
        nominal = spec.nominal
        fmt = nominal.fmt if nominal is not None else SCHEMES[name].default_fmt
        check_admits(name, fmt)
        expected = named_spec(name, fmt, nominal.block_size if nominal is not None else None)
        if expected != spec:
            raise ValueError(
                f"recipe name {name.value!r} contradicts its spec ({spec.short_str()}): {name.value!r} at "
                f"{fmt.name} is {expected.short_str()}; call the recipe 'custom'"
            )

    # ------------------------------------------------------------ derived values
    @property
    def default_exclude(self) -> bool:
        """Whether the output heads of :data:`DEFAULT_EXCLUDE` are all excluded."""
        return set(DEFAULT_EXCLUDE) <= set(self.exclude)

    def __getattr__(self, name: str) -> Any:
        # the default spec's operands (by role or P number) and FP4 options read through the recipe
        if name in ROLE_OF or name in FP4_OPTION_NAMES or name == "fp4":
            return getattr(self.default, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def fmt(self) -> FPFormat:
        """The recipe's nominal format: its first quantized operand's, weights first (bf16 when
        nothing is quantized)."""
        nominal = self.default.nominal
        return nominal.fmt if nominal is not None else UNQUANTIZED[0]

    @property
    def block_size(self) -> BlockSize:
        """The nominal operand's block size (``None``: no scaling, or nothing quantized)."""
        nominal = self.default.nominal
        return nominal.block_size if nominal is not None else None

    # -------------------------------------------------------------- construction
    @classmethod
    def from_name(
        cls,
        name: Union[str, RecipeName],
        *,
        fmt: Optional[FormatLike] = None,
        block_size: Union[BlockSize, str] = None,
        include: Optional[Iterable[str]] = None,
        exclude: Iterable[str] = (),
        default_exclude: bool = True,
        rules: Iterable[Union[LayerRule, Mapping]] = (),
    ) -> QuantRecipe:
        """A named recipe (see :class:`RecipeName`) at a format and block size.

        ``fmt``/``block_size`` default to the recipe's own (``None``); ``block_size="none"``
        asks for no scaling. A format the name does not admit is an error
        (``from_name("fp8", fmt="e2m1")``).
        """
        member = RecipeName.from_name(name)
        scheme = SCHEMES[member]
        try:
            fmt_ = scheme.default_fmt if fmt is None else FPFormat.parse(fmt)
        except ValueError as err:
            raise ValueError(f"recipe {member.value!r} fmt: {err}") from None
        check_admits(member, fmt_)
        if block_size is None or member is RecipeName.BF16:
            block = scheme.default_block
        else:
            block = _config.block_size(block_size, what=f"recipe {member.value!r} block_size")
        return cls(
            member,
            named_spec(member, fmt_, block),
            include=DEFAULT_INCLUDE if include is None else include,
            exclude=exclude,
            default_exclude=default_exclude,
            rules=rules,
        )

    @classmethod
    def coerce(
        cls,
        recipe: Union[str, os.PathLike, QuantRecipe],
        *,
        fmt: Optional[FormatLike] = None,
        block_size: Union[BlockSize, str] = None,
    ) -> QuantRecipe:
        """A ``QuantRecipe``, a recipe name or a YAML path -> ``QuantRecipe``; ``fmt``/``block_size``
        re-parameterise it (:meth:`with_format`)."""
        if isinstance(recipe, QuantRecipe):
            out = recipe
        elif isinstance(recipe, os.PathLike) or (
            isinstance(recipe, str) and recipe.strip().lower().endswith((".yaml", ".yml"))
        ):
            out = cls.from_yaml(recipe)
        elif isinstance(recipe, str):
            return cls.from_name(recipe, fmt=fmt, block_size=block_size)
        else:
            raise ValueError(
                f"recipe={recipe!r} is not valid: expected a QuantRecipe, a YAML path or one of {[m.value for m in RecipeName]}"
            )
        if fmt is not None or block_size is not None:
            out = out.with_format(fmt if fmt is not None else out.fmt, block_size=block_size)
        return out

    def with_format(self, fmt: FormatLike, *, block_size: Union[BlockSize, str] = None) -> QuantRecipe:
        """The same recipe at another format (and block size): what a precision switch asks for.

        A named recipe is rebuilt by name when its name admits ``fmt`` (so ``full`` gets its E5M2
        gradients back at FP8), or as the sibling of its family that does (``mxfp4`` at e4m3 is
        ``mxfp8``); otherwise, and for a custom recipe, every quantized operand gets ``fmt`` and
        every operand with an int block gets ``block_size`` (a "custom" recipe). ``"bf16"`` gives
        the bf16 recipe; the bf16 recipe at a format is ``paper``. Layer selection is kept.
        """
        fmt_ = FPFormat.parse(fmt)
        keep: dict[str, Any] = {
            "include": self.include,
            "exclude": self.exclude,
            "default_exclude": self.default_exclude,
            "rules": self.rules,
        }
        if fmt_ in UNQUANTIZED:
            return QuantRecipe.from_name(RecipeName.BF16, **keep)
        block = None if block_size is None else _config.block_size(block_size, what="with_format block_size")
        if self.name == RecipeName.BF16.value:
            return QuantRecipe.from_name(RecipeName.PAPER, fmt=fmt_, block_size=block_size, **keep)
        named = sibling_for(RecipeName(self.name), fmt_) if self.name != CUSTOM else None
        if named is not None:
            new_block = self.block_size if block_size is None else block
            return QuantRecipe.from_name(named, fmt=fmt_, block_size=_config.block_size_text(new_block), **keep)

        def swap(op: Optional[OperandSpec]) -> Optional[OperandSpec]:
            if op is None:
                return None
            new_block = op.block_size if (block_size is None or not isinstance(op.block_size, int)) else block
            return dataclasses.replace(op, fmt=fmt_, block_size=new_block)

        swapped: dict[str, Any] = {role: swap(getattr(self.default, role)) for role in ROLES}
        spec = LayerSpec.build(self.default, **swapped)
        return QuantRecipe(CUSTOM, spec, **keep)

    def with_spec(self, **changes: Any) -> QuantRecipe:
        """This recipe with its default spec changed (operands by P number or role, FP4 options by
        name; see :meth:`LayerSpec.build`): a "custom" recipe unless nothing changed."""
        spec = LayerSpec.build(self.default, what="recipe", **changes)
        return self if spec == self.default else dataclasses.replace(self, name=CUSTOM, default=spec)

    # ---------------------------------------------------------------- resolution
    def is_included(self, name: str) -> bool:
        """Whether the layer called ``name`` is quantized at all (include/exclude patterns)."""
        name = clean_module_name(name)
        return any(fnmatch.fnmatchcase(name, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.exclude
        )

    def matching_rule(self, name: str) -> Optional[LayerRule]:
        """The first rule that matches the layer called ``name`` (``None``: the default spec)."""
        name = clean_module_name(name)
        return next((rule for rule in self.rules if rule.matches(name)), None)

    def layer_spec(self, name: str) -> Optional[LayerSpec]:
        """The spec for the linear layer called ``name``; ``None`` when it is not quantized."""
        if not self.is_included(name):
            return None
        rule = self.matching_rule(name)
        return self.default if rule is None else self._rule_recipe(rule).default

    def _rule_recipe(self, rule: LayerRule) -> QuantRecipe:
        """The recipe the layers matching ``rule`` use."""
        if rule.recipe is not None:
            return QuantRecipe.from_name(rule.recipe, fmt=rule.fmt, block_size=rule.block_size)
        return self.with_format(rule.fmt or self.fmt, block_size=rule.block_size)

    @property
    def quantizes_anything(self) -> bool:
        """Whether some layer gets a quantized operand (or DGE/OCC): the default spec or a rule's."""
        return not self.default.is_identity or any(not self._rule_recipe(r).default.is_identity for r in self.rules)

    # ------------------------------------------------------------------ printing
    def short_str(self) -> str:
        """One line: ``paper e2m1 B=128 | P1=- P2=e2m1/128 ... | exclude=9 rules=[...]``."""
        head = f"{self.name} {self.fmt.name} B={_config.block_size_text(self.block_size)}"
        tail = []
        if self.exclude != DEFAULT_EXCLUDE:
            extra = (
                [p for p in self.exclude if p not in DEFAULT_EXCLUDE] if self.default_exclude else list(self.exclude)
            )
            tail.append(f"exclude={'heads+' if self.default_exclude else ''}{extra}")
        if self.include != DEFAULT_INCLUDE:
            tail.append(f"include={list(self.include)}")
        if self.rules:
            tail.append(f"rules=[{', '.join(r.short_str() for r in self.rules)}]")
        return " | ".join([head, self.default.short_str()] + tail)

    def __repr__(self) -> str:
        return f"QuantRecipe({self.short_str()})"

    def describe(self, model: Any) -> str:
        """A table of every GEMM layer of ``model`` (``nn.Linear``, ``nn.MultiheadAttention``'s
        in-projection, any converted layer): name, shape (out x in), each operand's spec."""
        header = ["layer", "shape", "P1", "P2", "P3", "P4", "P5", "P6", "options"]
        rows = [header]
        for name, module in model.named_modules():
            weight = _gemm_weight(module)
            if weight is None:
                continue
            shape = "x".join(map(str, weight.shape))
            spec = self.layer_spec(name)
            if spec is None:
                rows.append([clean_module_name(name), shape] + ["-"] * 6 + ["excluded"])
                continue
            opts = [flag for flag in ("dge", "occ") if getattr(spec.fp4, flag)]
            rule = self.matching_rule(name)
            if rule is not None:
                opts.append(f"rule {rule.pattern!r}: {self._rule_recipe(rule).name}")
            rows.append(
                [clean_module_name(name), shape]
                + ["-" if op is None else op.short_str() for op in spec.operands]
                + [" ".join(opts)]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [self.short_str()]
        for i, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    # ----------------------------------------------------------------- YAML / dict
    def to_dict(self) -> dict[str, Any]:
        """Every field, explicit (what ``to_yaml`` writes and ``from_dict`` reads back). ``fmt`` and
        ``block_size`` are written for readers and for named recipes' parameters; they are
        derived from the operands."""
        return {
            "name": self.name,
            "fmt": self.fmt.name,
            "block_size": _config.block_size_yaml(self.block_size),
            "operands": self.default.to_dict()["operands"],
            **self.default.fp4.to_dict(),
            "include": list(self.include),
            "exclude": list(self.exclude),
            "default_exclude": self.default_exclude,
            "rules": [r.to_dict() for r in self.rules],
        }

    @classmethod
    def from_dict(cls, data: Any) -> QuantRecipe:
        """Build a recipe from its dict/YAML form (keys :data:`DOCUMENT_KEYS`, all optional).

        ``name`` (default "paper") with ``fmt``/``block_size`` gives a named recipe; ``operands``
        (by P number or role; ``null``: not quantized) and the FP4 options change its spec, which
        makes it "custom" unless nothing changed. For a custom recipe, ``fmt``/``block_size``
        must agree with the operands (they are derived from them).
        """
        if isinstance(data, QuantRecipe):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"a recipe must be a mapping with keys {list(DOCUMENT_KEYS)}, got {type(data).__name__}")
        unknown = [key for key in data if key not in DOCUMENT_KEYS]
        if unknown:
            raise ValueError(f"unknown recipe key {unknown[0]!r}: valid keys in a recipe are {list(DOCUMENT_KEYS)}")
        name = data.get("name", RecipeName.PAPER.value)
        name = cls._check_name(name)
        selection = {key: data[key] for key in ("include", "exclude", "default_exclude") if data.get(key) is not None}
        rules = data.get("rules") or ()
        if not isinstance(rules, (list, tuple)):
            raise ValueError(f"recipe key 'rules' has a bad value {rules!r}: expected a list of rules")
        changes = cls._layer_changes(data)
        if name == CUSTOM:
            out = cls(CUSTOM, LayerSpec.build(**changes), rules=rules, **selection)
            for key in ("fmt", "block_size"):
                if data.get(key) is not None and cls._document_value(key, data[key]) != getattr(out, key):
                    raise ValueError(
                        f"recipe key {key!r}={data[key]!r} contradicts the operands, whose {key} is "
                        f"{getattr(out, key)!r}: leave it out (it is derived) or correct it"
                    )
            return out
        try:
            base = cls.from_name(name, fmt=data.get("fmt"), block_size=data.get("block_size"), rules=rules, **selection)
        except ValueError as err:
            key = "block_size" if "block_size" in str(err) else "fmt" if "fmt" in str(err) else "name"
            raise ValueError(f"recipe key {key!r}: {err}") from None
        return base.with_spec(**changes)

    @staticmethod
    def _document_value(key: str, value: Any) -> Any:
        return FPFormat.parse(value) if key == "fmt" else _config.block_size(value, what=key)

    @staticmethod
    def _layer_changes(data: Mapping) -> dict[str, Any]:
        """The default-spec changes a recipe document asks for: operands and FP4 options."""
        operands = data.get("operands") or {}
        if not isinstance(operands, Mapping):
            raise ValueError(
                f"recipe key 'operands' has a bad value {operands!r}: expected a mapping of "
                f"{list(P_NUMBERS)} (or roles) to operand specs or null"
            )
        changes: dict[str, Any] = {}
        for key, value in operands.items():
            if key not in ROLE_OF:
                raise ValueError(
                    f"unknown recipe key {f'operands.{key}'!r}: valid operand keys are "
                    f"{list(P_NUMBERS)} or the roles {list(ROLES)}"
                )
            changes[key] = OperandSpec.coerce(value, what=f"operands.{key}")
        for key in FP4_OPTION_NAMES:
            if data.get(key) is not None:
                try:
                    FP4Options(**{key: data[key]})  # each value checked alone, so the error names its key
                except ValueError as err:
                    raise ValueError(f"recipe key {key!r}: {err}") from None
                changes[key] = data[key]
        return changes

    def to_yaml(self, path: Optional[Union[str, os.PathLike]] = None) -> str:
        """The recipe as YAML text (also written to ``path`` when given)."""
        from omegaconf import OmegaConf

        text = OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, source: Union[str, os.PathLike]) -> QuantRecipe:
        """Read a recipe from a YAML file path (or YAML text containing a newline)."""
        data = _config.read_yaml(source, what="recipe YAML")
        if not isinstance(data, Mapping):
            raise ValueError(f"recipe YAML {source!r} must hold a mapping, got {type(data).__name__}")
        return cls.from_dict(data)


# ------------------------------------------------------------------------- names
_WRAPPER_PARTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def clean_module_name(name: str) -> str:
    """The module name a user would write: wrapper components (torch.compile's ``_orig_mod``,
    activation checkpointing, FSDP1) removed."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def named_recipes() -> dict[str, QuantRecipe]:
    """Every named recipe at its default format and block size."""
    return {m.value: QuantRecipe.from_name(m) for m in RecipeName}


def _gemm_weight(module: Any) -> Any:
    """The (out, in) GEMM weight of a layer :meth:`QuantRecipe.describe` lists, else ``None``."""
    import torch.nn as nn  # local: keeps `import lightning_fpq.recipe` light

    if hasattr(module, "gemm_weight"):  # a converted layer (QuantGemm)
        return module.gemm_weight()
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        return module.in_proj_weight
    from .linear import is_hf_conv1d  # local: linear imports this module

    if is_hf_conv1d(type(module)):
        return module.weight.t()  # Hugging Face's Conv1D stores (in, out)
    return None
