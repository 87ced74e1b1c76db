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
        assert cells == [str(bits), name, f"{e_opt:.2f}", f"{m_opt:.2f}"]


# ------------------------------------------------------------------------------ predict


def test_predict_numbers_come_from_the_law(capsys):
    code, out, err = run(
        capsys, "predict", "--params", "1e9", "--tokens", "2e12", "--format", "e4m3", "--block-size", "128"
    )
    assert code == 0 and err == ""
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


# --------------------------------------------------------------------------------- plan


def test_plan_joint(capsys):
    code, out, err = run(capsys, "plan", "--compute", "1e23")
    assert code == 0 and err == ""
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
    assert row_of(out, "dl")[1] == f"{law.dl:.6g}" and row_of(out, "dl")[2] == "3.1926"
    assert f"RMSE {law.provenance.rmse:.4g} nats" in out and "held-out RMSE" in out
    assert f"wrote {tmp_path / 'law.yaml'}" in out


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
    assert "fp8    torchao_float8" in out and "torchao_float8 cannot compute this spec exactly" in out


def test_backends_bad_backend_is_one_line(capsys):
    assert_one_line_error(*run(capsys, "backends", "--backend", "cuda"), "'cuda'", "triton")
