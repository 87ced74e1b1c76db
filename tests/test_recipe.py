"""QuantRecipe: named recipes, per-layer rules, YAML round trips, errors that name the bad value."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch.nn as nn

from lightning_fpq.formats import FPFormat
from lightning_fpq.recipe import (
    DEFAULT_EXCLUDE,
    LayerRule,
    OperandSpec,
    QuantRecipe,
    RecipeName,
    named_recipes,
)

E2M1, E3M2, E4M3, E5M2 = (FPFormat.parse(n) for n in ("e2m1", "e3m2", "e4m3", "e5m2"))


def ops(recipe):
    return [getattr(recipe, f"p{i}") for i in range(1, 7)]


# ------------------------------------------------------------------ named recipes
def test_paper_quantizes_p2_p4_p6_with_fp32_block_scales():
    r = QuantRecipe.from_name("paper", fmt="e3m2", block_size=64)
    assert [op is not None for op in ops(r)] == [False, True, False, True, False, True]
    for op in (r.p2, r.p4, r.p6):
        assert (op.fmt, op.block_size, op.scale_format, op.rounding) == (E3M2, 64, "fp32", "nearest")
    assert (r.fmt, r.block_size) == (E3M2, 64)
    default = QuantRecipe.from_name("paper")
    assert default.block_size == 128 and default.p2.scale_format == "fp32"


def test_full_uses_e5m2_gradients_at_fp8_only():
    r = QuantRecipe.from_name("full", fmt="e4m3")
    assert [op.fmt for op in ops(r)] == [E4M3, E4M3, E5M2, E4M3, E5M2, E4M3]
    r4 = QuantRecipe.from_name("full", fmt="e2m1", block_size=32)
    assert all(op.fmt == E2M1 and op.block_size == 32 for op in ops(r4))


def test_fp8_tensorwise_and_rowwise():
    t = QuantRecipe.from_name("fp8")
    assert all(op.block_size == "tensor" for op in ops(t))
    assert [op.fmt for op in ops(t)] == [E4M3, E4M3, E5M2, E4M3, E5M2, E4M3]  # torchao TENSORWISE
    row = QuantRecipe.from_name("fp8", block_size="channel")
    assert all(op.block_size == "channel" and op.fmt == E4M3 for op in ops(row))  # torchao ROWWISE


def test_fp4_microsoft_recipe():
    r = QuantRecipe.from_name("fp4")
    assert r.p1 == OperandSpec("e2m1", "channel") and r.p2 == OperandSpec("e2m1", "channel")
    assert ops(r)[2:] == [None] * 4
    assert (r.dge, r.dge_k, r.dge_clamp, r.occ, r.occ_quantile) == (True, 5.0, 3.0, True, 0.99)


def test_nvfp4_mx_and_bf16():
    nv = QuantRecipe.from_name("nvfp4")
    assert all(op.fmt == E2M1 and op.block_size == 16 and op.scale_format == "e4m3" for op in ops(nv))
    assert [op.rounding for op in ops(nv)] == ["nearest", "nearest", "stochastic", "nearest", "stochastic", "nearest"]
    for name, fmt in (("mxfp4", E2M1), ("mxfp8", E4M3)):
        r = QuantRecipe.from_name(name)
        assert all(op.fmt == fmt and op.block_size == 32 and op.scale_format == "e8m0" for op in ops(r))
    bf = QuantRecipe.from_name("bf16")
    assert ops(bf) == [None] * 6 and bf.default.is_identity


def test_from_name_accepts_enum_and_any_case():
    assert QuantRecipe.from_name(RecipeName.MXFP8) == QuantRecipe.from_name("MxFp8")
    assert set(named_recipes()) == {m.value for m in RecipeName}


def test_every_member_documents_its_gemm_maths():
    import inspect

    text = inspect.getsource(RecipeName)
    for member in RecipeName:
        block = text.split(f'{member.name} = "{member.value}"')[0].rsplit('"\n', 1)[-1]
        assert "Y" in block and "dX" in block and "dW" in block, member


# ------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: QuantRecipe.from_name("papr"), "'papr'"),
        (lambda: QuantRecipe.from_name("paper", fmt="e9m9"), "e9m9"),
        (lambda: QuantRecipe.from_name("paper", block_size=0), "block_size=0"),
        (lambda: QuantRecipe.from_name("paper", block_size="row"), "'row'"),
        (lambda: QuantRecipe.from_name("bf16", fmt="e2m1"), "'e2m1'"),
        (lambda: OperandSpec("e4m3", rounding="floor"), "'floor'"),
        (lambda: OperandSpec("e4m3", scale_format="e5m3"), "'e5m3'"),
        (lambda: QuantRecipe(name="mine"), "'mine'"),
        (lambda: QuantRecipe(dge=True), "p2"),
        (lambda: QuantRecipe(p1=OperandSpec("e2m1"), occ=True, occ_quantile=1.5), "1.5"),
        (lambda: QuantRecipe(p2=OperandSpec("e2m1"), dge="yes"), "'yes'"),
        (lambda: LayerRule("blocks.0.*"), "changes nothing"),
        (lambda: LayerRule("blocks.0.*", recipe="fp16"), "'fp16'"),
    ],
)
def test_bad_values_raise_value_error_naming_them(call, needle):
    with pytest.raises(ValueError) as info:
        call()
    assert needle in str(info.value)


def test_errors_list_the_valid_choices():
    with pytest.raises(ValueError, match=r"nearest.*stochastic"):
        OperandSpec("e4m3", rounding="floor")
    with pytest.raises(ValueError, match=r"paper.*full.*fp8.*fp4.*nvfp4.*mxfp4.*mxfp8.*bf16"):
        QuantRecipe.from_name("fp5")


def test_recipes_are_frozen_and_hashable():
    r = QuantRecipe.from_name("paper")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.p1 = None  # type: ignore[misc]
    assert hash(r.default) == hash(QuantRecipe.from_name("paper").default)


# ------------------------------------------------------------------------- rules
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(3))
        self.lm_head = nn.Linear(8, 10, bias=False)
        self.classifier = nn.Linear(8, 2)


def test_default_exclude_keeps_heads_unquantized():
    r = QuantRecipe.from_name("paper")
    for name in (
        "lm_head",
        "model.lm_head",
        "classifier",
        "model.classifier_head",
        "head",
        "vit.head",
        "output",
        "model.output",
        "score",
    ):
        assert r.layer_spec(name) is None, name
    for name in ("blocks.0.0", "model.h.3.mlp.c_fc", "bert.encoder.layer.0.attention.output.dense"):
        assert r.layer_spec(name) is not None, name
    assert "lm_head" in DEFAULT_EXCLUDE


def test_include_exclude_and_rules_first_match_wins():
    r = QuantRecipe.from_name(
        "paper",
        fmt="e2m1",
        rules=[
            LayerRule("blocks.0.*", recipe="bf16"),
            LayerRule("blocks.2.*", fmt="e4m3"),
            LayerRule("blocks.*", block_size=32),
        ],
    )
    assert r.layer_spec("blocks.0.0").is_identity
    assert r.layer_spec("blocks.2.0").p2 == OperandSpec("e4m3", 128)
    assert r.layer_spec("blocks.1.2").p2 == OperandSpec("e2m1", 32)
    assert r.layer_spec("other").p2 == OperandSpec("e2m1", 128)
    only = QuantRecipe.from_name("paper", include=["blocks.1.*"], exclude=[])
    assert only.layer_spec("blocks.0.0") is None and only.layer_spec("blocks.1.0") is not None
    assert only.layer_spec("lm_head") is None  # not included
    everything = QuantRecipe.from_name("paper", default_exclude=False)
    assert everything.layer_spec("lm_head") is not None


def test_compiled_module_names_are_cleaned():
    r = QuantRecipe.from_name("paper", rules=[LayerRule("blocks.0.*", recipe="bf16")])
    assert r.layer_spec("_orig_mod.blocks.0.0").is_identity
    assert r.layer_spec("_orig_mod.lm_head") is None


def test_describe_lists_every_linear_with_each_operand():
    r = QuantRecipe.from_name("paper", fmt="e2m1", rules=[LayerRule("blocks.0.*", recipe="bf16")])
    table = r.describe(Net())
    lines = table.splitlines()
    assert lines[0] == r.short_str()
    assert lines[1].split() == ["layer", "shape", "P1", "P2", "P3", "P4", "P5", "P6", "options"]
    rows = {line.split()[0]: line for line in lines[3:]}
    assert set(rows) == {
        "blocks.0.0",
        "blocks.0.2",
        "blocks.1.0",
        "blocks.1.2",
        "blocks.2.0",
        "blocks.2.2",
        "lm_head",
        "classifier",
    }
    assert rows["blocks.1.0"].split()[1:8] == ["16x8", "-", "e2m1/128", "-", "e2m1/128", "-", "e2m1/128"]
    assert "excluded" in rows["lm_head"] and "rule" in rows["blocks.0.2"]


def test_short_str_is_one_readable_line():
    r = QuantRecipe.from_name("nvfp4", rules=[LayerRule("h.11.*", recipe="bf16")])
    s = r.short_str()
    assert "\n" not in s
    assert s.startswith("nvfp4 e2m1 B=16 | P1=e2m1/16/e4m3 P2=e2m1/16/e4m3 P3=e2m1/16/e4m3/sr")
    assert "h.11.*->bf16" in s and repr(r) == f"QuantRecipe({s})"


def test_with_format_rebuilds_named_recipes_and_keeps_rules():
    rules = (LayerRule("blocks.0.*", recipe="bf16"),)
    full4 = QuantRecipe.from_name("full", fmt="e2m1", rules=rules)
    full8 = full4.with_format("e4m3")
    assert full8 == QuantRecipe.from_name("full", fmt="e4m3", rules=rules)
    assert full8.p3.fmt == E5M2
    assert full4.with_format("bf16") == QuantRecipe.from_name("bf16", rules=rules)
    custom = QuantRecipe(p2=OperandSpec("e2m1", 32), p4=OperandSpec("e2m1", "channel"))
    swapped = custom.with_format("e3m2", block_size=64)
    assert swapped.p2 == OperandSpec("e3m2", 64) and swapped.p4 == OperandSpec("e3m2", "channel")


def test_coerce_name_path_and_shortcuts(tmp_path):
    assert QuantRecipe.coerce("paper", fmt="e2m1", block_size=32) == QuantRecipe.from_name(
        "paper", fmt="e2m1", block_size=32
    )
    path = tmp_path / "r.yaml"
    QuantRecipe.from_name("mxfp4").to_yaml(path)
    assert QuantRecipe.coerce(str(path)) == QuantRecipe.from_name("mxfp4")
    assert QuantRecipe.coerce(path, fmt="e3m2").p1.fmt == E3M2
    with pytest.raises(ValueError, match="does not exist"):
        QuantRecipe.coerce(str(tmp_path / "missing.yaml"))


# -------------------------------------------------------------------------- YAML
@pytest.mark.parametrize("name", [m.value for m in RecipeName])
def test_every_named_recipe_round_trips_through_yaml(name):
    r = QuantRecipe.from_name(name)
    assert QuantRecipe.from_yaml(r.to_yaml()) == r


def test_rules_and_custom_recipes_round_trip(tmp_path):
    r = QuantRecipe.from_name(
        "paper",
        fmt="e3m2",
        block_size=64,
        exclude=["lm_head", "*.proj"],
        rules=[LayerRule("model.blocks.0.*", recipe="bf16"), LayerRule("*.h.3.*", fmt="e4m3", block_size="channel")],
    )
    assert QuantRecipe.from_yaml(r.to_yaml()) == r
    custom = QuantRecipe(
        p1=OperandSpec("e4m3", "tensor"), p6=OperandSpec("e2m3", 16, "e8m0", "stochastic"), include=["blocks.*"]
    )
    custom.to_yaml(tmp_path / "c.yaml")
    back = QuantRecipe.from_yaml(tmp_path / "c.yaml")
    assert back == custom and back.name == "custom" and back.p2 is None


def test_short_yaml_overrides_a_named_recipe():
    text = """
name: paper
fmt: e2m1
block_size: 32
operands:
  p1: {fmt: e4m3, block_size: tensor}
  p6: null
rules:
  - {pattern: "blocks.0.*", recipe: bf16}
"""
    r = QuantRecipe.from_yaml(text)
    assert r.p1 == OperandSpec("e4m3", "tensor") and r.p2 == OperandSpec("e2m1", 32) and r.p6 is None
    assert r.rules == (LayerRule("blocks.0.*", recipe="bf16"),)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("bogus: 1", "'bogus'"),
        ("name: papr", "'papr'"),
        ("operands:\n  p7: null", "'operands.p7'"),
        ("operands:\n  p1: {fmt: e4m3, blok: 3}", "'operands.p1.blok'"),
        ("operands:\n  p1: {fmt: e4m3, rounding: floor}", "'floor'"),
        ("operands:\n  p1: {block_size: 32}", "needs 'fmt'"),
        ("rules:\n  - {pattern: x, fmtt: e4m3}", "'fmtt'"),
        ("dge: maybe", "'dge'"),
        ("fmt: e9m9", "e9m9"),
        ("block_size: -3", "-3"),
        ("block_size: [1]", "'block_size'"),
    ],
)
def test_bad_yaml_names_the_key_or_value(text, needle):
    with pytest.raises(ValueError) as info:
        QuantRecipe.from_yaml(text + "\n")
    assert needle in str(info.value)


def test_unknown_key_error_lists_valid_keys():
    with pytest.raises(ValueError, match=r"valid keys in a recipe are \['name', 'fmt', 'block_size', 'operands'"):
        QuantRecipe.from_yaml("formt: e4m3\n")


def test_example_recipe_yamls_load():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "examples" / "configs"
    paper = QuantRecipe.from_yaml(configs / "recipe_paper_e2m1.yaml")
    assert paper == QuantRecipe.from_name(
        "paper", fmt="e2m1", rules=[LayerRule("*blocks.0.*", fmt="e4m3"), LayerRule("*blocks.3.*", fmt="e4m3")]
    )
    assert paper.layer_spec("model.blocks.3.mlp.fc").p2 == OperandSpec("e4m3", 128)
    assert paper.layer_spec("blocks.3.mlp.fc").p2 == OperandSpec("e4m3", 128)  # a bare model too
    nv = QuantRecipe.from_yaml(configs / "recipe_nvfp4.yaml")
    assert (
        nv.layer_spec("model.blocks.3.attn.qkv").is_identity
        and nv.layer_spec("model.blocks.2.attn.qkv").p3.rounding == "stochastic"
    )
    custom = QuantRecipe.from_yaml(configs / "recipe_custom.yaml")
    assert custom.name == "custom" and custom.p3 is None and custom.p5 == OperandSpec("e5m2", "tensor")
    assert (
        custom.layer_spec("model.blocks.0.attn.qkv") is None and custom.layer_spec("model.blocks.0.mlp.fc") is not None
    )


def test_quantizes_anything():
    assert QuantRecipe.from_name("paper").quantizes_anything
    assert not QuantRecipe.from_name("bf16").quantizes_anything
    assert QuantRecipe.from_name("bf16", rules=[LayerRule("blocks.0.*", recipe="fp8")]).quantizes_anything
    assert not QuantRecipe.from_name("bf16", rules=[LayerRule("blocks.0.*", recipe="bf16")]).quantizes_anything


# ------------------------------------------------------- one model, pinned before the rewrite
PINS = json.loads((Path(__file__).parent / "data" / "recipe_pins.json").read_text())
# recipes whose old form was a contradiction: a name that does not admit the format it held
RENAMED = {("fp8", "e2m1"): "custom", ("mxfp4", "e4m3"): "mxfp8"}


def _pinned(case):
    if "with_format" in case:
        name, fmt = case["with_format"]
        return QuantRecipe.from_name(name).with_format(fmt), RENAMED.get((name, fmt))
    return QuantRecipe.from_name(case["name"], fmt=case["fmt"], block_size=case["block_size"]), None


@pytest.mark.parametrize(
    "case", PINS, ids=lambda c: "-".join(str(v) for v in c.get("with_format") or (c["name"], c["fmt"], c["block_size"]))
)
def test_named_recipes_keep_their_pinned_specs_and_yaml(case):
    recipe, renamed = _pinned(case)
    # the operands and options are what the recipe gave before the one-model rewrite
    assert recipe.short_str().split(" | ", 1)[1] == case["short_str"].split(" | ", 1)[1]
    # default_exclude (derived from exclude) joined the written form after the pins were taken
    expected = dict(case["dict"], name=renamed or case["dict"]["name"], default_exclude=True)
    assert recipe.to_dict() == expected
    assert QuantRecipe.from_dict(expected) == recipe
    assert QuantRecipe.from_yaml(recipe.to_yaml()) == recipe


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: QuantRecipe(p2="e2m1", fmt="e4m3"), "derived"),
        (lambda: QuantRecipe.from_name("fp8", fmt="e2m1"), "8-bit formats"),
        (lambda: QuantRecipe.from_name("mxfp4", fmt="e4m3"), "'mxfp4'"),
        (lambda: QuantRecipe("paper", QuantRecipe.from_name("full").default), "contradicts"),
        (lambda: QuantRecipe(p2="e2m1", weight="e4m3"), "twice"),
        (lambda: QuantRecipe.from_yaml("name: custom\nfmt: e4m3\noperands:\n  p2: e2m1\n"), "contradicts"),
        (lambda: QuantRecipe.from_yaml("name: nvfp4\nfmt: e4m3\n"), "e2m1"),
    ],
)
def test_contradictions_are_errors(call, needle):
    with pytest.raises(ValueError) as info:
        call()
    assert needle in str(info.value)


def test_operands_by_role_or_p_number_and_derived_format():
    by_role = QuantRecipe(weight=OperandSpec("e2m1", 32), input_for_grad_weight="e4m3")
    by_number = QuantRecipe(p2=OperandSpec("e2m1", 32), p6="e4m3")
    assert by_role == by_number and by_role.weight is by_role.p2
    assert (by_role.fmt, by_role.block_size) == (E2M1, 32)  # the weight's, derived
    assert "P2=e2m1/32" in by_role.short_str() and "P6=e4m3/128" in by_role.short_str()
    yaml_roles = QuantRecipe.from_yaml(
        "name: custom\noperands:\n  weight: {fmt: e2m1, block_size: 32}\n  input_for_grad_weight: e4m3\n"
    )
    assert yaml_roles == by_role


def test_overriding_a_named_recipe_makes_it_custom():
    r = QuantRecipe.from_yaml("name: paper\noperands:\n  p1: e4m3\n")
    assert r.name == "custom" and r.p1 == OperandSpec("e4m3")
    same = QuantRecipe.from_yaml("name: paper\noperands:\n  p2: {fmt: e4m3, block_size: 128}\n")
    assert same == QuantRecipe.from_name("paper")


def test_format_switches_stay_in_the_named_family():
    assert QuantRecipe.from_name("mxfp4").with_format("e4m3") == QuantRecipe.from_name("mxfp8")
    assert QuantRecipe.from_name("mxfp8").with_format("e2m1") == QuantRecipe.from_name("mxfp4")
    nv8 = QuantRecipe.from_name("nvfp4").with_format("e4m3")
    assert nv8.name == "custom" and all(op.fmt == E4M3 for op in nv8.default.operands)


def test_a_users_exclude_adds_to_the_default_heads():
    r = QuantRecipe.from_name("paper", exclude=["*layers.0.*"])
    assert r.layer_spec("lm_head") is None and r.layer_spec("model.layers.0.fc") is None
    assert r.layer_spec("model.layers.1.fc") is not None and r.default_exclude
    assert "exclude=heads+['*layers.0.*']" in r.short_str()
    yaml = QuantRecipe.from_yaml("name: paper\nexclude: ['*layers.0.*']\n")
    assert yaml == r and QuantRecipe.from_yaml(r.to_yaml()) == r
    replaced = QuantRecipe.from_yaml("name: paper\nexclude: ['*layers.0.*']\ndefault_exclude: false\n")
    assert replaced.layer_spec("lm_head") is not None and not replaced.default_exclude
    assert QuantRecipe.from_yaml(replaced.to_yaml()) == replaced
