"""Shared test helpers: the hardware skip (RunIf-style) and format tables."""

from __future__ import annotations

import os

import pytest
import torch

# Formats that ml_dtypes knows, with their lightning-fpq names.
ML_DTYPES_FORMATS = {
    "e2m1": "float4_e2m1fn",
    "e2m3": "float6_e2m3fn",
    "e3m2": "float6_e3m2fn",
    "e4m3": "float8_e4m3fn",
    "e5m2": "float8_e5m2",
    "e4m3:ieee": "float8_e4m3",
    "e3m4": "float8_e3m4",
}
# Formats no reference library has: checked by brute force against the enumerated grid.
BRUTE_FORCE_FORMATS = ["e1m1", "e1m2", "e0m3", "e6m1", "e2m5", "e3m4:finite", "e5m3", "e2m2", "e3m3"]


def requires_cuda(reason_prefix: str = "needs a CUDA device") -> pytest.MarkDecorator:
    """The one skip helper for hardware (Lightning's RunIf in spirit)."""
    return pytest.mark.skipif(
        not torch.cuda.is_available(), reason=f"{reason_prefix}: torch.cuda.is_available() is False"
    )


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # Keep each xdist worker to one thread: two workers share this machine's cores.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
