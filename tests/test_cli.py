"""The command line, run in-process through main([...]); one test runs the installed console script."""

from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_fpq.cli import SUBCOMMANDS, main, positive_number
from lightning_fpq.scaling.capybara import CapybaraLaw
from lightning_fpq.scaling.chinchilla import ChinchillaLaw
from lightning_fpq.scaling.law import Provenance, load_law

LAW = CapybaraLaw.paper()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lightning-fpq")
    assert "Traceback" not in err + out
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def row_of(out: str, name: str) -> list[str]:
    """The cells of the table row that starts with ``name``."""
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row {name!r} in:\n{out}")


def g(x: float) -> str:
    return f"{x:.3g}".replace("e+", "e")


# ------------------------------------------------------------------------------ formats


def test_formats_table(capsys):
    code, out, err = run(capsys, "formats")
    assert code == 0 and err == ""
    # name aliases bits E M bias max min-subnormal special law-best
    assert row_of(out, "e2m1") == ["e2m1", "fp4", "4", "2", "1", "1", "6", "0.5", "finite", "yes"]
    assert row_of(out, "e4m3") == ["e4m3", "fp8", "8", "4", "3", "7", "448", "0.001953", "fn", "yes"]
    # no alias, and not the law's best 8-bit split: those two cells are empty
    assert row_of(out, "e5m2") == ["e5m2", "8", "5", "2", "15", "57344", "1.526e-5", "ieee"]
    assert row_of(out, "bf16")[-1] == "yes"


def test_formats_optimal_lists_every_width(capsys):
    code, out, _ = run(capsys, "formats", "--optimal", "--bits", "8")
    assert code == 0
    assert "e2m1" not in out.split("Best split")[0]  # --bits filters the first table
    for bits, name in ((4, "e2m1"), (6, "e3m2"), (8, "e4m3"), (16, "bf16")):
        cells = next(
            line.split() for line in out.split("Best split")[1].splitlines() if line.split()[:1] == [str(bits)]
        )
        e_opt, m_opt = LAW.optimal_split(bits)
        assert cells == [str(bits), name, name, f"{e_opt:.2f}", f"{m_opt:.2f}"]
    five = next(line.split() for line in out.split("Best split")[1].splitlines() if line.split()[:1] == ["5"])
    assert five[1:3] == ["e2m2", "-"]  # a 5-bit split exists, but no format in use has 5 bits


# ------------------------------------------------------------------------------ predict


def test_predict_numbers_come_from_the_law(capsys):
    code, out, err = run(
        capsys, "predict", "--params", "1e9", "--tokens", "2e12", "--format", "e4m3", "--block-size", "128"
    )
    assert code == 0
    # 2e12 tokens is 20x the paper's largest run (1e11): one warning line on stderr
    assert err.splitlines() == [
        "warning: D = 2e12 tokens lies beyond 2x the range CapybaraLaw was fitted on (D 1e10..1e11): "
        "the numbers below are extrapolations"
    ]
    loss = LAW.loss(1e9, 2e12, "e4m3", 128)
    d_crit = LAW.critical_data_size(1e9, "e4m3", 128)
    cells = row_of(out, "e4m3")
    assert cells[1:] == [
        "8",
        f"{loss:.4f}",
        f"{loss - LAW.loss(1e9, 2e12, None):+.4f}",
        g(d_crit),
        f"{2e12 / d_crit:.3g}",
        f"{LAW.min_loss(1e9, 'e4m3', 128):.4f}",
    ]
    assert "OK: 2e12 tokens is 7.3% of D_crit (2.73e13) for e4m3" in out
    assert f"{LAW.token_value(1e9, 2e12, 'e4m3', 128):.0%} of an unquantized one" in out


def test_predict_verdicts_near_and_past_dcrit(capsys):
    d_crit = LAW.critical_data_size(1e9, "e3m2", 128)
    _, out, _ = run(capsys, "predict", "--params", "1B", "--tokens", f"{0.8 * d_crit:.6g}", "--format", "e3m2")
    assert "NEAR D_crit" in out
    _, out, _ = run(capsys, "predict", "--params", "1e9", "--tokens", "2T", "--format", "fp4,e3m2,bf16")
    # FP4's D_crit (3.93e11) is below 2e12; the narrowest wider format past 2e12 is the law's 6-bit e3m2
    assert "PAST D_crit: tokens beyond 3.93e11 raise the loss in e2m1; switch to e3m2 (6 bits, D_crit 4.8e12)" in out
    assert "lowest predicted loss at this N and D: bf16" in out


def test_predict_with_a_law_file(tmp_path, capsys):
    custom = CapybaraLaw(**{**LAW.constants(), "g": 2 * LAW.g}, provenance=Provenance(source="user", note="test"))
    custom.save(tmp_path / "law.yaml")
    _, out, _ = run(
        capsys,
        "predict",
        "--params",
        "1e9",
        "--tokens",
        "1e12",
        "--format",
        "e2m1",
        "--law",
        str(tmp_path / "law.yaml"),
    )
    assert row_of(out, "e2m1")[4] == g(custom.critical_data_size(1e9, "e2m1", 128))
    assert g(custom.critical_data_size(1e9, "e2m1", 128)) != g(LAW.critical_data_size(1e9, "e2m1", 128))
    ChinchillaLaw.paper().save(tmp_path / "chin.yaml")
    code, out, _ = run(
        capsys,
        "predict",
        "--params",
        "1e9",
        "--tokens",
        "1e12",
        "--format",
        "e2m1",
        "--law",
        str(tmp_path / "chin.yaml"),
    )
    assert code == 0 and "no critical data size (this law has no data-dependent quantization penalty)" in out


@pytest.mark.parametrize(
    "argv, line",
    [
        # issue 12: these answered N = 357 params and loss 1367 without a word
        (["plan", "--compute", "1e10"], "warning: N = 202 parameters and D = 3.3e7 tokens lie beyond 2x"),
        (["predict", "--params", "7M", "--tokens", "2k", "--format", "e2m1"], "N = 7e6 parameters and D = 2e3 tokens"),
        (["predict", "--params", "400M", "--tokens", "5e9", "--format", "e2m1"], None),  # inside 2x: 41M/2, 10B/2
        (["predict", "--params", "6e5", "--tokens", "5e5", "--format", "e2m1", "--law", "demo-calibration"], None),
        (["predict", "--params", "1e6", "--tokens", "5e5", "--format", "e2m1", "--law", "demo-calibration"], "N = 1e6"),
    ],
)
def test_extrapolation_is_one_warning_line_on_stderr(capsys, argv, line):
    code, out, err = run(capsys, *argv)
    assert code == 0 and "Traceback" not in err
    if line is None:
        assert err == ""
    else:
        assert len(err.splitlines()) == 1 and line in err and "extrapolation" in err


def test_named_laws_work_in_every_law_command(capsys):
    shipped = (
        Path(__file__).resolve().parents[1] / "lightning_fpq" / "scaling" / "calibrations" / "demo_calibration.yaml"
    )
    calib = load_law(shipped)
    _, out, _ = run(
        capsys,
        "predict",
        "--params",
        "4e5",
        "--tokens",
        "1e6",
        "--format",
        "e2m1",
        "--law",
        "demo-calibration",
        "--block-size",
        "32",
    )
    assert float(row_of(out, "e2m1")[4]) == pytest.approx(calib.critical_data_size(4e5, "e2m1", 32), rel=5e-3)
    code, out, _ = run(capsys, "plan", "--compute", "1e12", "--law", "demo-calibration")
    assert code == 0 and f"{calib.optimal_precision(1e12).bits:.2f} bits" in out
    _, out_paper, _ = run(
        capsys, "predict", "--params", "1e9", "--tokens", "1e11", "--format", "e2m1", "--law", "paper"
    )
    _, out_default, _ = run(capsys, "predict", "--params", "1e9", "--tokens", "1e11", "--format", "e2m1")
    assert out_paper == out_default
    assert_one_line_error(
        *run(capsys, "predict", "--params", "1e9", "--tokens", "1e11", "--format", "e2m1", "--law", "papr"),
        "cannot read law file 'papr'",
        "named laws: paper, demo-calibration",
    )


# --------------------------------------------------------------------------------- plan


def test_plan_joint(capsys):
    code, out, err = run(capsys, "plan", "--compute", "1e23")
    assert code == 0 and len(err.splitlines()) == 1 and "N = 1.72e11 parameters and D = 3.43e11 tokens" in err
    plan = LAW.optimal_precision(1e23, block_size=128)
    bits = float(re.search(r"optimal precision: ([\d.]+) bits", out).group(1))
    assert 4 <= bits <= 8 and bits == pytest.approx(plan.bits, abs=0.005)
    assert f"N = {g(plan.params)}, D = {g(plan.tokens)}" in out
    assert f"best format: {plan.format.name} ({plan.format.bits} bits" in out
    n_, d_, loss = LAW.plan_format(1e23, "e4m3", block_size=128)
    assert row_of(out, "e4m3")[1:5] == ["8", g(n_), g(d_), f"{loss:.4f}"]
    listed = {name: LAW.plan_format(1e23, name, block_size=128)[2] for name in ("e2m1", "e3m2", "e4m3", "bf16")}
    assert f"best of the listed formats: {min(listed, key=listed.get)}" in out


def test_plan_fixed_params_and_tokens(capsys):
    _, out, _ = run(capsys, "plan", "--compute", "1e23", "--params", "1e9")
    assert "N fixed at 1e9" in out
    assert f"{LAW.optimal_precision(1e23, N=1e9).bits:.2f} bits" in out
    _, out, _ = run(
        capsys, "plan", "--compute", "1e23", "--tokens", "1e12", "--formats", "e4m3,bf16", "--block-size", "channel"
    )
    assert "D fixed at 1e12" in out and "channel-wise scaling" in out
    assert f"{LAW.optimal_precision(1e23, D=1e12, block_size='channel').bits:.2f} bits" in out
    code, out, err = run(capsys, "plan", "--compute", "1e23", "--params", "1e9", "--tokens", "1e12")
    assert_one_line_error(code, out, err, "not allowed with argument")


# ---------------------------------------------------------------------------------- fit


def write_runs(path: Path, columns=("N", "D", "E", "M", "B", "loss")) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for N in (5e7, 1e8, 2e8, 4e8):
            for D in (1e10, 3e10, 1e11):
                for E, M in ((2, 1), (3, 2), (4, 3), (2, 3), (5, 2)):
                    loss = LAW.loss(N, D, f"e{E}m{M}", 128) * math.exp(0.001 * rng.standard_normal())
                    row = {"N": N, "D": D, "E": E, "M": M, "B": 128, "loss": loss}
                    writer.writerow([row[c] for c in columns])


def test_fit_writes_a_law(tmp_path, capsys):
    write_runs(tmp_path / "runs.csv")
    code, out, err = run(
        capsys,
        "fit",
        str(tmp_path / "runs.csv"),
        "--out",
        str(tmp_path / "law.yaml"),
        "--holdout",
        "largest_N",
        "--starts",
        "4",
    )
    assert code == 0 and err == ""
    law = load_law(tmp_path / "law.yaml")
    assert law.provenance.source == "fit" and law.provenance.rows == 45
    assert row_of(out, "dl")[1] == f"{law.dl:.6g}" and row_of(out, "dl")[3] == "3.1926"
    assert f"RMSE {law.provenance.rmse:.4g} nats" in out and "held-out RMSE" in out
    assert f"wrote {tmp_path / 'law.yaml'}" in out
    # bootstrap intervals for every constant, from the refits stored in the law file
    boot = law.provenance.extra["bootstrap"]
    assert boot["resamples"] == 40 and "5th-95th percentile of 40 refits" in out
    lo, hi = np.percentile([smp["a"] for smp in boot["samples"]], (5, 95))
    assert row_of(out, "a")[2] == f"{lo:.4g}..{hi:.4g}" and lo <= law.a <= hi
    assert "5-95% (large N)" in out
    # the rows' range (N 5e7..2e8 fitted, 4e8 held out; D 1e10..1e11) and the precision-unaware baseline
    assert law.provenance.n_range == (5e7, 2e8) and law.provenance.d_range == (1e10, 1e11)
    base = law.provenance.extra["baseline"]
    assert f"precision-unaware baseline (Chinchilla, same rows): RMSE {base['rmse']:.4g} nats" in out
    assert base["rmse"] > law.provenance.rmse
    # predict prints D_crit's interval when the law has refits
    _, out, _ = run(
        capsys,
        "predict",
        "--params",
        "1e8",
        "--tokens",
        "3e10",
        "--format",
        "e2m1",
        "--law",
        str(tmp_path / "law.yaml"),
    )
    draws = [r.critical_data_size(1e8, "e2m1", 128) for r in law.resampled()]
    lo, hi = np.percentile(draws, (5, 95))
    assert "D_crit 5-95%" in out and row_of(out, "e2m1")[5] == f"{lo:.3g}..{hi:.3g}".replace("e+", "e")


def test_fit_the_ceiling_family_holding_out_the_longest_runs(tmp_path, capsys):
    write_runs(tmp_path / "runs.csv")  # D = 1e10, 3e10, 1e11: largest_D leaves two values, too few
    code, out, err = run(capsys, "fit", str(tmp_path / "runs.csv"), "--kind", "ceiling", "--holdout", "largest_D")
    assert_one_line_error(code, out, err, "D takes 2 distinct value(s)")
    code, out, err = run(
        capsys, "fit", str(tmp_path / "runs.csv"), "--kind", "ceiling", "--holdout", "largest_N", "--starts", "2"
    )
    assert code == 0 and "CeilingLaw fitted on 45 rows" in out and "held-out RMSE" in out
    assert "start" in out.splitlines()[1] and "paper" not in out.splitlines()[1]  # no published constants


def test_fit_with_fixed_constants(tmp_path, capsys):
    write_runs(tmp_path / "runs.csv")
    code, out, _ = run(capsys, "fit", str(tmp_path / "runs.csv"), "--fix", "dl=3.1926,nu=2.9543", "--starts", "2")
    assert code == 0
    assert row_of(out, "nu")[-1] == "fixed"


# --------------------------------------------------------------------------------- plot


def test_plot_writes_a_png(tmp_path, capsys):
    out_png = tmp_path / "law.png"
    code, out, _ = run(capsys, "plot", "--params", "1e9", "--formats", "e2m1,e4m3,bf16", "--out", str(out_png))
    assert code == 0 and f"wrote {out_png}" in out
    data = out_png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


# ------------------------------------------------------------------------- error paths


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (
            ["predict", "--params", "-1e9", "--tokens", "1e12", "--format", "e4m3"],
            ["argument --params", "must be a finite number > 0"],
        ),
        (
            ["predict", "--params", "1e9", "--tokens", "lots", "--format", "e4m3"],
            ["argument --tokens", "'lots' is not a number"],
        ),
        (["predict", "--params", "1e9", "--tokens", "1e12", "--format", "e9m9x"], ["unknown format 'e9m9x'"]),
        (
            ["predict", "--params", "1e9", "--tokens", "1e12", "--format", "e4m3", "--block-size", "0"],
            ["--block-size", "'channel' or 'tensor'"],
        ),
        (["predict", "--params", "1e9", "--tokens", "1e12"], ["required", "--format"]),
        (["plan", "--compute", "1e8", "--params", "1e9"], ["less than one token"]),
        (["fit", "/nonexistent/runs.csv"], ["cannot read CSV"]),
        ([], ["required", "COMMAND"]),
        (["sweep-everything"], ["invalid choice"]),
        (["formats", "--bits", "-1"], ["argument --bits", "'-1'", "expected one of 4, 6, 8, 16, 32"]),
        (["formats", "--bits", "7"], ["argument --bits", "'7'", "expected one of 4, 6, 8, 16, 32"]),
        (["formats", "--bits", "100"], ["argument --bits", "'100'", "expected one of 4, 6, 8, 16, 32"]),
        (["formats", "--bits", "many"], ["argument --bits", "'many'"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, fragments):
    assert_one_line_error(*run(capsys, *argv), *fragments)


def test_missing_csv_columns(tmp_path, capsys):
    write_runs(tmp_path / "runs.csv", columns=("N", "D", "E", "M", "loss"))
    assert_one_line_error(
        *run(capsys, "fit", str(tmp_path / "runs.csv")),
        "missing column(s) B",
        "expects N, D, E, M (or format), B, loss",
    )


def test_unreadable_law_files(tmp_path, capsys):
    base = ["predict", "--params", "1e9", "--tokens", "1e12", "--format", "e4m3", "--law"]
    assert_one_line_error(*run(capsys, *base, str(tmp_path / "missing.yaml")), "cannot read law file")
    (tmp_path / "bad.yaml").write_text("kind: capybara\nconstants: {n: [1\n")
    assert_one_line_error(*run(capsys, *base, str(tmp_path / "bad.yaml")), "cannot read law file")
    (tmp_path / "neg.yaml").write_text(
        "kind: capybara\nconstants: {n: -1, a: 1, d: 1, b: 1, eps: 1, g: 1, dl: 1, nu: 1, channel_log2_block: 13}\n"
    )
    assert_one_line_error(*run(capsys, *base, str(tmp_path / "neg.yaml")), "constant n=-1.0")
    ChinchillaLaw.paper().save(tmp_path / "chin.yaml")
    assert_one_line_error(
        *run(capsys, "plan", "--compute", "1e23", "--law", str(tmp_path / "chin.yaml")), "no precision term"
    )


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "predict" in out and "plan" in out
    code, out, _ = run(capsys, "plan", "--help")
    assert code == 0 and "--compute" in out


def test_number_suffixes():
    assert positive_number("7B") == 7e9 and positive_number("2T") == 2e12 and positive_number("350m") == 3.5e8
    assert positive_number("1_000") == 1000.0


def test_subcommands_are_registered_from_one_list():
    assert [f.__name__ for f in SUBCOMMANDS] == [
        "add_formats",
        "add_predict",
        "add_plan",
        "add_fit",
        "add_plot",
        "add_demo",
        "add_sweep",
        "add_backends",
    ]


def test_importing_the_cli_is_light():
    code = "import sys, lightning_fpq.cli; heavy = [m for m in ('torch', 'lightning', 'matplotlib', 'numpy', 'rich') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_installed_console_script(tmp_path):
    script = Path(sys.executable).with_name("lightning-fpq")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    done = subprocess.run(
        [str(script), "predict", "--params", "1e9", "--tokens", "2e12", "--format", "e2m1", "--block-size", "128"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "PAST D_crit: tokens beyond 3.93e11 raise the loss in e2m1" in done.stdout


def test_backends_lists_what_runs_each_recipe_here(capsys):
    from lightning_fpq import backends

    code, out, _ = run(capsys, "backends", "--device", "cpu")
    assert code == 0
    assert out.count("\n") >= 6 + 8
    for name in backends.LAYER_BACKENDS:
        assert name in out
    fast = "compiled" if backends.available("compiled", "cpu")[0] else "emulated"
    choices = dict(
        line.split()[:2] for line in out.split("what runs each named recipe")[1].splitlines()[1:] if line.strip()
    )
    assert choices == {
        "paper": fast,
        "full": fast,
        "fp8": fast,
        "fp4": fast,
        "nvfp4": fast,
        "mxfp4": fast,
        "mxfp8": fast,
        "bf16": "unquantized",
    }
    code, out, _ = run(capsys, "backends", "--device", "cpu", "--backend", "torchao", "--recipes", "fp8,mxfp4")
    torchao_ok, torchao_why = backends.machine_available("torchao")
    if torchao_ok:
        assert "fp8    torchao_float8" in out and "torchao_float8 cannot compute this spec exactly" in out
    else:  # e.g. torchao 0.18 under torch 2.6: not importable, and the listing says why
        assert torchao_why in out


def test_backends_bad_backend_is_one_line(capsys):
    assert_one_line_error(*run(capsys, "backends", "--backend", "cuda"), "'cuda'", "triton")


def test_version(capsys):
    from importlib.metadata import version

    import lightning_fpq

    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.strip() == f"lightning-fpq {lightning_fpq.__version__}" == f"lightning-fpq {version('lightning-fpq')}"


# ------------------------------------------------------------ outputs checked before the work


@pytest.fixture
def no_fit(monkeypatch):
    """The fit itself, replaced by a failure: these commands must stop before it."""
    import lightning_fpq.scaling.fitting as fitting

    def fit(*args, **kwargs):
        raise AssertionError("the fit ran before the outputs were checked")

    monkeypatch.setattr(fitting, "fit", fit)


def test_fit_checks_its_outputs_before_fitting(tmp_path, capsys, no_fit):
    write_runs(tmp_path / "runs.csv")
    runs = str(tmp_path / "runs.csv")
    assert_one_line_error(
        *run(capsys, "fit", runs, "--out", "/nonexistent/dir/law.yaml"),
        "--out /nonexistent/dir/law.yaml",
        "folder /nonexistent/dir does not exist",
    )
    assert_one_line_error(*run(capsys, "fit", runs, "--out", str(tmp_path)), "is a folder")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(
        *run(capsys, "fit", runs, "--plots", str(tmp_path / "file" / "plots")), "--plots", "cannot create that folder"
    )


# --------------------------------------------------- a missing optional package: one line, its extra


def test_missing_scipy_names_the_fit_extra(tmp_path, capsys, monkeypatch, no_fit):
    write_runs(tmp_path / "runs.csv")
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # import scipy.optimize now fails
    assert_one_line_error(
        *run(capsys, "fit", str(tmp_path / "runs.csv")),
        "fit needs scipy, which is not installed: pip install 'lightning-fpq[fit]'",
    )


def test_missing_matplotlib_names_the_plot_extra(tmp_path, capsys, monkeypatch, no_fit):
    import lightning_fpq.demo.run as demo

    def run_demo(*args, **kwargs):
        raise AssertionError("the demo trained before its plotting package was checked")

    monkeypatch.setattr(demo, "run_demo", run_demo)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    hint = "which is not installed: pip install 'lightning-fpq[plot]'"
    assert_one_line_error(
        *run(capsys, "plot", "--params", "1e9", "--out", str(tmp_path / "x.png")), f"plot needs matplotlib, {hint}"
    )
    assert not (tmp_path / "x.png").exists()
    assert_one_line_error(*run(capsys, "demo", "--out", str(tmp_path)), f"demo (its plot) needs matplotlib, {hint}")
    write_runs(tmp_path / "runs.csv")
    assert_one_line_error(
        *run(capsys, "fit", str(tmp_path / "runs.csv"), "--plots", str(tmp_path / "plots")),
        f"fit --plots needs matplotlib, {hint}",
    )


def test_missing_ray_names_the_ray_extra(tmp_path, capsys, monkeypatch):
    (tmp_path / "sweep.yaml").write_text(
        f"out: {tmp_path / 'runs.csv'}\nmodels: {{a: {{n_layer: 1, n_head: 1, n_embd: 16}}}}\ntokens: [65536]\n"
    )
    monkeypatch.setitem(sys.modules, "ray", None)
    for extra in ([], ["--dry-run"]):
        assert_one_line_error(
            *run(capsys, "sweep", str(tmp_path / "sweep.yaml"), "--executor", "ray", *extra),
            "executor 'ray' needs Ray, which is not installed: pip install 'lightning-fpq[ray]'",
        )


def test_an_optional_import_error_deep_in_a_command_names_its_extra(capsys, monkeypatch):
    import lightning_fpq.cli as cli

    def cmd_backends(args):
        raise ModuleNotFoundError("No module named 'torchao'", name="torchao")

    monkeypatch.setattr(cli, "cmd_backends", cmd_backends)
    assert_one_line_error(*run(capsys, "backends"), "No module named 'torchao' (pip install 'lightning-fpq[torchao]')")
