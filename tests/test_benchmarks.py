"""The GPU benchmarks run end to end where they can (a CPU smoke run) and say why not where
they cannot. Nothing here looks at a time: benchmarks print, tests check they work."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_step_benchmark_smoke_run_on_cpu(capsys):
    bench = load("bench_step_gpu")
    assert bench.main(["--device", "cpu", "--size", "tiny", "--steps", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("ms/step") :].splitlines()[1:]
    assert [row.split()[0] for row in table] == ["bf16", "fp8", "fp4"]
    assert all(float(row.split()[3]) > 0 for row in table)  # a ratio to bf16 per stage
    assert "unquantized" in out and ("compiled" in out or "emulated" in out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmarks run for real")
def test_gpu_benchmarks_say_why_they_cannot_run(capsys, tmp_path):
    assert load("bench_step_gpu").main([]) == 0
    assert load("gpu_check").main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("cannot run here") == 2 and "CUDA" in out
