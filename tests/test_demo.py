"""The demo end to end (tiny config, seconds) and the examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_fpq.cli import main
from lightning_fpq.demo.run import load_config, read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "steps=30", "block_size=32", "batch_size=8", "val_every=10", "val_samples=8", "max_bytes=200000"]


@pytest.mark.slow
def test_demo_runs_end_to_end_with_switches_plot_and_summary(tmp_path, capsys):
    code = main(["demo", *TINY, "law=paper", "--out", str(tmp_path), "--baseline", "--no-progress-bar"])
    assert code == 0
    out = capsys.readouterr().out
    assert "lightning-fpq demo summary" in out
    assert "e2m1->e4m3 @ step 12" in out and "e4m3->bf16 @ step 23" in out  # 0.4 and 0.75 of 30 steps
    assert "D_crit lies far beyond this run's budget" in out  # the paper's constants at demo scale
    from lightning_fpq import backends

    fast = "compiled" if backends.available("compiled", "cpu")[0] else "emulated"
    ran_on = [line.split("ran on ")[1] for line in out.splitlines() if "ran on " in line]
    # tiny: 2 blocks x 4 Linears; the e2m1 and e4m3 stages on the CPU's fastest exact backend
    assert ran_on == [f"{fast} (8 layers)", f"{fast} (8 layers)"], ran_on  # bf16: "unquantized" already
    png = tmp_path / "demo.png"
    assert png.stat().st_size > 20_000 and png.read_bytes()[:4] == b"\x89PNG"
    rows = read_metrics(tmp_path / "progressive" / "metrics.csv")
    stages = [r["fpq/stage"] for r in rows if "fpq/stage" in r]
    assert stages[0] == 0.0 and stages[-1] == 2.0
    assert any("val/loss" in r for r in rows)
    assert (tmp_path / "baseline-bf16" / "metrics.csv").exists()


def test_demo_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="stepz"):
        load_config(None, ("stepz=3",))
    with pytest.raises(ValueError, match="steps=0 is not valid"):
        load_config(None, ("steps=0",))
    with pytest.raises(ValueError, match="unknown format 'fp5'"):
        load_config(None, ("schedule=[fp5,bf16]",))
    cfg = load_config(str(ROOT / "examples" / "configs" / "demo.yaml"), ("steps=7",))
    assert cfg.steps == 7 and cfg.schedule == ["e2m1", "e4m3", "bf16"]
    assert load_config().law == cfg.law == "demo-calibration"  # the shipped calibration by default
    from lightning_fpq.lightning.critical import resolve_law

    assert resolve_law(cfg.law).provenance.source == "fit"


def test_demo_bad_input_is_one_line_and_exit_2(capsys):
    assert main(["demo", "stepz=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stepz" in err[0]


@pytest.mark.slow
def test_example_script_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_with_fpq.py"), "--steps", "40"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "e2m1" in result.stdout and "-> bf16" in result.stdout and "final train loss" in result.stdout


@pytest.mark.slow
def test_lightning_cli_example_runs_from_yaml(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "cli_train.py"),
        "fit",
        "--config",
        str(ROOT / "examples" / "configs" / "cli_fpq.yaml"),
        "--trainer.max_steps=20",
        "--trainer.val_check_interval=10",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precision e2m1 -> e4m3" in result.stderr + result.stdout
    assert "e4m3 -> bf16" in result.stderr + result.stdout


@pytest.mark.slow
def test_the_demo_never_crashes_on_short_runs_a_tiny_model_or_a_baseline(tmp_path):
    from lightning_fpq.demo.run import run_demo

    cfg = load_config(
        None,
        (
            f"out={tmp_path}",
            "steps=4",
            "model=tiny",
            "baseline=true",
            "progress_bar=false",
            "val_samples=8",
            "batch_size=4",
        ),
    )
    results = run_demo(cfg)
    assert [r.name for r in results] == ["progressive", "baseline-bf16"]
    assert all(r.tokens == 4 * 4 * 128 for r in results) and (tmp_path / "demo.png").is_file()
