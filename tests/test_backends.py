"""Capability checks: (available, reason), cached, and the report a user sees."""

from __future__ import annotations

import torch

from lightning_fpq import backends


def test_every_check_returns_a_flag_and_a_reason():
    for check in (backends.emulated_available, backends.compiled_available, backends.triton_available,
                  backends.torchao_available, backends.transformer_engine_available):
        ok, reason = check()
        assert isinstance(ok, bool) and isinstance(reason, str) and reason
    assert backends.emulated_available()[0]


def test_transformer_engine_without_a_gpu_says_how_to_get_it():
    ok, reason = backends.transformer_engine_available()
    if not torch.cuda.is_available():
        assert not ok and ("lightning-fpq[te]" in reason or "NVIDIA" in reason)


def test_report_has_one_line_per_backend():
    report = backends.describe_backends(torch.device("cpu")).splitlines()
    assert [line.split("  ")[0].strip() for line in report] == [
        "emulated", "compiled (quantizer)", "triton (quantizer, FP4 GEMM)", "torchao float8", "FP8 GEMM on cpu",
        "transformer_engine"]
    assert all(" yes " in line or " no " in line for line in report)


def test_te_mapping_names_a_recipe_or_the_reason_there_is_none():
    for te_recipe, (ours, why) in backends.TE_RECIPE_MAPPING.items():
        assert why
        if ours is not None:
            name = ours.split()[0]
            assert name in ("fp8", "mxfp8", "custom:"), te_recipe
