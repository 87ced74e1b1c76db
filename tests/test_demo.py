"""The demo end to end (tiny config, seconds) and the examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_fpq.cli import main
from lightning_fpq.demo.run import load_config, read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "steps=30",
    "block_size=32",
    "batch_size=8",
    "val_every=10",
    "val_samples=8",
    "gap_every=5",
    "corpus=demo",
    "max_bytes=200000",
]


@pytest.mark.slow
def test_demo_runs_end_to_end_with_switches_plot_and_summary(tmp_path, capsys):
    schedule = ["--schedule", "e2m1,e4m3,bf16", "--switch-at", "0.4,0.75"]
    code = main(["demo", *TINY, "law=paper", *schedule, "--out", str(tmp_path), "--no-progress-bar"])
    assert code == 0
    out = capsys.readouterr().out
    assert "what the law predicted, what the runs observed" in out
    assert "e2m1->e4m3 at step 12" in out and "e4m3->bf16 at step 23" in out  # 0.4 and 0.75 of 30 steps
    assert "the paper's constants belong to LLaMA on Dolma" in out
    from lightning_fpq import backends

    fast = "compiled" if backends.available("compiled", "cpu")[0] else "emulated"
    # micro: 2 blocks x 4 Linears; every quantized stage on the CPU's fastest exact backend
    assert f"fixed-e1m0: quantized stages ran on {fast} (8 layers)" in out
    assert f"progressive: quantized stages ran on {fast} (8 layers); {fast} (8 layers)" in out
    png = tmp_path / "demo.png"
    assert png.stat().st_size > 20_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "summary.txt").read_text().strip() in out
    rows = read_metrics(tmp_path / "progressive" / "metrics.csv")
    stages = [r["fpq/stage"] for r in rows if "fpq/stage" in r]
    assert stages[0] == 0.0 and stages[-1] == 2.0
    gaps = [r["fpq/gap/gap"] for r in read_metrics(tmp_path / "fixed-e1m0" / "metrics.csv") if "fpq/gap/gap" in r]
    assert len(set(gaps)) == 6  # every 5 of 30 steps (the logger may repeat a value in later rows)
    assert not any("fpq/gap/gap" in r for r in read_metrics(tmp_path / "bf16" / "metrics.csv"))


@pytest.mark.slow
def test_demo_summary_numbers_come_from_the_logs_and_the_law(tmp_path, capsys):
    from lightning_fpq.demo.run import run_demo
    from lightning_fpq.scaling.law import resolve_named_law

    cfg = load_config(None, (*TINY, f"out={tmp_path}", "progress_bar=false", "schedule=[e1m0]"))
    results = run_demo(cfg)
    assert [r.name for r in results] == ["fixed-e1m0", "bf16"]  # a one-stage schedule is no progressive run
    out = capsys.readouterr().out
    law = resolve_named_law("demo-calibration")
    n, tokens = results[0].n_params, 30 * 8 * 32
    for result, fmt in zip(results, ("e1m0", None)):
        logged = [r["val/loss"] for r in read_metrics(tmp_path / result.name / "metrics.csv") if "val/loss" in r]
        predicted = float(law.loss(n, tokens, fmt, 32))  # the law's own formula (paper recipe = the fitted setup)
        row = next(line for line in out.splitlines() if line.startswith(result.name))
        assert f"{logged[-1]:.4f}" in row and f"{predicted:.3f}" in row
        assert f"{logged[-1] - predicted:+.3f}" in row
    d_crit = float(law.critical_data_size(n, "e1m0", 32))
    assert f"D_crit(e1m0, B=32) = {d_crit:.3g} (90%: " in out


def test_demo_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="stepz"):
        load_config(None, ("stepz=3",))
    with pytest.raises(ValueError, match="steps=0 is not valid"):
        load_config(None, ("steps=0",))
    with pytest.raises(ValueError, match="unknown format 'fp5'"):
        load_config(None, ("schedule=[fp5,bf16]",))
    with pytest.raises(ValueError, match="switch_at has 1 values for 3 stages"):
        load_config(None, ("schedule=[e2m1,e4m3,bf16]", "switch_at=[0.5]"))
    assert load_config(None, ("schedule=[e2m1,bf16]",)).switch_at == "auto"  # a schedule alone is enough
    cfg = load_config(str(ROOT / "examples" / "configs" / "demo.yaml"), ("steps=7",))
    assert cfg.steps == 7 and cfg.schedule == ["e1m0", "e2m1", "e4m3"]
    assert {k: v for k, v in vars(cfg).items() if k != "steps"} == {
        k: v for k, v in vars(load_config()).items() if k != "steps"
    }
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
            "progress_bar=false",
            "val_samples=8",
            "batch_size=4",
            "corpus=demo",
            "max_bytes=200000",
            "workers=1",  # in this process (the CLI test trains in parallel processes)
        ),
    )
    results = run_demo(cfg)
    assert [r.name for r in results] == ["fixed-e1m0", "progressive", "bf16"]
    assert all(r.tokens == 4 * 4 * 64 for r in results) and (tmp_path / "demo.png").is_file()
    assert all(r.val for r in results)  # shorter than val_every: validated once at the end
    with pytest.raises(ValueError, match="nothing to train"):
        run_demo(load_config(None, ("fixed=null", "schedule=[e2m1]", "baseline=false", f"out={tmp_path}")))


def test_the_progress_bar_fits_80_columns(tmp_path, capsys):
    from lightning_fpq.demo.run import run_one

    cfg = load_config(None, (*TINY, "steps=6", f"out={tmp_path}"))
    run_one(cfg, "fixed-e1m0", ["e1m0"], cfg.law)
    out = capsys.readouterr().out
    lines = [part for line in out.splitlines() for part in line.split("\r") if part.startswith("fixed-e1m0")]
    assert lines and max(len(line) for line in lines) <= 80, max(lines, key=len)
    assert "Epoch" not in out and "fmt=e1m0" in out


def test_demo_help_states_the_true_defaults(capsys):
    assert main(["demo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "default: the shipped calibration" in text and "default: e1m0,e2m1,e4m3" in text


def test_law_bands_are_the_percentiles_of_the_refits():
    from lightning_fpq.demo.predictions import Predictor, recipe_for
    from lightning_fpq.scaling.law import resolve_named_law

    law = resolve_named_law("demo-calibration")
    refits = law.resampled()
    assert len(refits) >= 20  # the shipped calibration carries its bootstrap refits
    cfg = load_config()
    band = Predictor(law, 33_664, recipe_for(cfg, "e1m0")).loss(4e6)
    by_hand = [float(r.loss(33_664, 4e6, "e1m0", 32)) for r in refits]
    assert band.mid == pytest.approx(float(law.loss(33_664, 4e6, "e1m0", 32)), rel=1e-12)
    assert (band.low, band.high) == pytest.approx(tuple(np.percentile(by_hand, [5, 95])), rel=1e-12)


def test_reference_penalty_pairs_runs_by_tokens(tmp_path):
    from lightning_fpq.demo.reference import load_reference, penalty

    csv_path = tmp_path / "runs.csv"
    csv_path.write_text(
        "status,format,B,seed,D,loss\n"
        "ok,bf16,1,0,100,2.0\nok,e1m0,32,0,100,2.5\nok,e1m0,32,0,200,2.4\nfailed,bf16,1,0,200,\nok,e1m0,32,1,100,9\n"
    )
    runs = load_reference([str(csv_path), str(tmp_path / "missing.csv")])
    assert penalty(runs, "e1m0", "32") == [(100, pytest.approx(0.5))]


def test_counted_scale_groups_example_runs_and_beats_the_constant():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dcrit" / "scale_groups.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rms = {
        line.split(",")[1].split(":")[0].strip(): float(line.split(":")[1].split()[0])
        for line in result.stdout.splitlines()
        if line.startswith("RMS error")
    }
    assert rms["counted"] < rms["constant"]  # what docs/science.md reports


def test_with_tensor_scales_the_summary_and_the_monitor_agree_on_dcrit(tmp_path, capsys):
    from lightning_fpq.demo.run import run_demo

    cfg = load_config(None, (*TINY, "steps=4", "block=tensor", "baseline=false", "schedule=[e1m0]", f"out={tmp_path}"))
    run_demo(cfg)
    logged = [r["fpq/d_crit"] for r in read_metrics(tmp_path / "fixed-e1m0" / "metrics.csv") if "fpq/d_crit" in r]
    out = capsys.readouterr().out
    assert f"D_crit(e1m0, B=tensor) = {logged[-1]:.3g} (90%: " in out  # counted scale groups, both
