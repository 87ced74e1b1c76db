"""``benchmarks/gpu_check.py`` (the one script a lent GPU machine runs) runs end to end: its
``--smoke`` mode runs every section's logic on CPU under Triton's interpreter with tiny shapes,
from the checkout alone (the installed package's import hook is removed, as on a machine where
nothing is installed). Nothing here looks at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the smoke run in a fresh process (TRITON_INTERPRET=1 must precede triton's import), with the
# editable install's finder removed so that lightning_fpq and its kernels come from the checkout
_RUN = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", f))]
sys.argv = ["gpu_check.py", "--smoke", sys.argv[1]]
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
"""


def _needs_interpreter() -> None:
    """Skip where the installed triton's interpreter cannot run the kernels (the smoke run's sections would skip)."""
    triton = pytest.importorskip("triton")
    from lightning_fpq.kernels.capability import interpreter_supported

    ok, reason = interpreter_supported(triton.__version__)
    if not ok:
        pytest.skip(reason)


def _env() -> dict[str, str]:
    """This process's environment without pytest's and Triton's variables, the checkout on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TRITON_INTERPRET"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


@pytest.mark.slow
def test_gpu_check_smoke_run_from_the_checkout(tmp_path):
    _needs_interpreter()
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.txt").read_text().count("=====") == 6
    sections = report["sections"]
    assert list(sections) == ["env", "exact", "gemm", "blackwell", "quant", "step"]
    assert all(s["status"] == "ok" for s in sections.values()), {k: s["notes"] for k, s in sections.items()}
    assert report["failures"] == [] and report["meta"]["smoke"] is True
    # no install: the script mapped kernels/ to lightning_fpq.kernels itself
    assert report["meta"]["kernels_mapped_by_script"] is True
    assert report["meta"]["kernels_from"] == str(ROOT / "kernels" / "__init__.py")
    exact = [r for r in sections["exact"]["rows"] if "exact" in r]
    kernels = {r.get("kernel") for r in exact}
    assert {"quantize", "pack", "gemm_fp4"} <= kernels and all(r["exact"] for r in exact)
    assert any("dot_scaled" in r["case"] for r in exact if r.get("kernel") == "gemm_fp4")
    assert any(r["case"].endswith("e4m3 path=dot_scaled bias") for r in exact)  # NVFP4's epilogue + bias
    assert any(r["case"].endswith("philox") for r in exact if r.get("kernel") == "quantize")
    assert "pack nvfp4 cols stochastic philox" in {r.get("name") for r in sections["quant"]["rows"]}
    names = {r.get("name") for r in sections["gemm"]["rows"]}
    assert "torch.matmul bf16" in names and "dequantize->bf16 matmul B=32 e8m0" in names
    assert any(str(n).startswith("gemm_fp4 B=32 e8m0 dot_scaled") for n in names)
    assert {"gemm_fp4 B=16 e4m3 auto + bias", "gemm_fp4 B=16 e4m3 auto fp32, + bias after"} <= names
    stages = [r["stage"] for r in sections["step"]["rows"] if "vs_bf16" in r]
    assert stages == ["bf16", "fp8", "fp4", "fp4 packed (forced)"]
    assert len(sections["blackwell"]["rows"]) == 2  # the operands are built; the GEMM needs sm_100+


@pytest.mark.slow
def test_a_timeout_keeps_the_section_in_progress(tmp_path):
    # run_gpu.sh stops a hung run with SIGTERM: the report must keep what the running section measured
    _needs_interpreter()
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-c", _RUN, str(tmp_path)],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,  # a full pipe could stall the run
        stderr=subprocess.DEVNULL,
    )
    report = tmp_path / "gpu_check.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:  # wait until `exact` has started writing rows
        if report.is_file() and "exact" in json.loads(report.read_text())["sections"]:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    sections = json.loads(report.read_text())["sections"]
    assert sections["env"]["status"] == "ok" and sections["exact"]["status"] == "interrupted"


def test_smoke_run_skips_the_step_section_where_the_kernels_cannot_run(tmp_path):
    # Where triton's interpreter cannot run the kernels (triton 3.6, as on the lent GPU image),
    # the smoke run's step section, which forces the triton backend, is skipped with the reason,
    # as the kernel sections are: it once raised BackendUnavailableError and failed the run.
    pytest.importorskip("triton")
    run = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", f))]
sys.argv = ["gpu_check.py", sys.argv[1], "--smoke", "--only", "step"]
script = runpy.run_path("benchmarks/gpu_check.py", run_name="gpu_check")
script["use_checkout"]()
sys.modules["lightning_fpq.kernels"].triton_available = lambda: (False, "pretend: this triton is too old")
sys.exit(script["main"](sys.argv[1:]))
"""
    proc = subprocess.run(
        [sys.executable, "-c", run, str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    step = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["step"]
    assert step["status"] == "skipped" and "pretend: this triton is too old" in " ".join(step["notes"])


def _wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel holding module ``name`` (what run_gpu.sh's WHEELS folder holds)."""
    import zipfile

    dist = f"{name}-0.1.dist-info"
    files = {
        f"{name}.py": "VALUE = 1\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist}/RECORD"])
    path = folder / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for arc, text in files.items():
            whl.writestr(arc, text)
    return path


@pytest.mark.slow
def test_run_gpu_sh_installs_a_wheels_folder_offline(tmp_path):
    # a lent machine reaches no registry: WHEELS=<folder> installs those wheels (torchao ...) with
    # --no-index into a fresh folder first on PYTHONPATH, then runs the check with the arguments given
    _needs_interpreter()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "fpq_wheel_probe")
    env = {**_env(), "WHEELS": str(wheels), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    out = tmp_path / "report"
    proc = subprocess.run(
        ["bash", "benchmarks/run_gpu.sh", str(out), "--smoke", "--only", "env"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    sites = list(tmp_path.glob("fpq-site.*"))
    assert len(sites) == 1 and (sites[0] / "fpq_wheel_probe.py").is_file()
    assert f"installed into {sites[0]}: fpq_wheel_probe-0.1-py3-none-any.whl" in (out / "run.log").read_text()
    assert json.loads((out / "gpu_check.json").read_text())["sections"]["env"]["status"] == "ok"
