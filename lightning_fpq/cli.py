"""The ``lightning-fpq`` command line: the questions to answer before a quantized run.

    lightning-fpq formats                                  which formats exist (and which the law prefers)
    lightning-fpq predict --params 1e9 --tokens 2e12 --format e4m3 --block-size 128
                                                           loss, critical data size, verdict
    lightning-fpq plan --compute 1e23 [--params N | --tokens D]
                                                           compute-optimal precision and format
    lightning-fpq sweep sweep.yaml [--executor local --workers N | --executor ray --address HOST:PORT]
                                                           a grid of small runs -> runs.csv (resumable)
    lightning-fpq fit runs.csv --out law.yaml --plots DIR  fit the law to your own runs
    lightning-fpq plot --params 1e9 --formats e2m1,e4m3,bf16 --out law.png
    lightning-fpq backends [--device cuda]                 which backend runs each recipe here, and why
    lightning-fpq --version

Adding a subcommand: write ``cmd_<name>(args) -> int`` (the work; import anything heavy
inside it) and ``add_<name>(subparsers)`` (its parser; end with
``parser.set_defaults(func=cmd_<name>)``), then append ``add_<name>`` to
:data:`SUBCOMMANDS`. Raise ``ValueError`` (or :class:`CLIError`) for bad input: :func:`main`
prints it as one line on stderr and exits with status 2.

A subcommand that needs an optional package calls :func:`require` before it does any work: a
missing package is one line naming the extra that installs it (:data:`OPTIONAL`), exit status 2.

This module imports only the standard library at its top, so the command line starts
fast; the scaling law (numpy, and torch through ``formats``), rich and matplotlib are
imported by the subcommands that use them.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from lightning_fpq import __version__, _config

PROG = "lightning-fpq"
EXIT_USAGE = 2  # bad input, or a missing optional package: one line on stderr
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it

OPTIONAL = {
    "scipy": "fit",
    "matplotlib": "plot",
    "ray": "ray",
    "triton": "triton",
    "torchao": "torchao",
    "transformer_engine": "te",
}
"""Optional packages (top-level module) -> the extra of lightning-fpq that installs them."""

_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


class CLIError(Exception):
    """Bad input found by a subcommand: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump), exit status 2.

    It also reads "-1e9" as a (negative) number, not as an option, so that a negative size
    is reported as such ("must be > 0") instead of "expected one argument".
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse's own pattern knows -1 and -1.5 but not -1e9 (a private attribute: best effort)
        if hasattr(self, "_negative_number_matcher"):
            self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?[kmbgtpKMBGTP]?$")

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def install_hint(module: str) -> str:
    """``pip install 'lightning-fpq[EXTRA]'`` for an optional module, or ``pip install MODULE``."""
    top = module.split(".")[0]
    return f"pip install 'lightning-fpq[{OPTIONAL[top]}]'" if top in OPTIONAL else f"pip install {top}"


def require(module: str, what: str) -> None:
    """Import ``module`` now, or raise :class:`CLIError`: "``what`` needs PACKAGE, which is not
    installed: pip install 'lightning-fpq[EXTRA]'". Called before a subcommand does any work."""
    try:
        importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise CLIError(f"{what} needs {top}, which is not installed: {install_hint(top)}") from None


def check_output_file(path: str, option: str) -> None:
    """Before any work: ``path`` can be written (its folder exists and is writable, it is no folder)."""
    target = Path(path)
    if target.is_dir():
        raise CLIError(f"{option} {path} is a folder: give the file to write, e.g. {target / 'law.yaml'}")
    folder = target.parent
    if not folder.is_dir():
        raise CLIError(f"{option} {path}: folder {folder} does not exist (create it first)")
    if not os.access(folder, os.W_OK):
        raise CLIError(f"{option} {path}: folder {folder} is not writable")


def check_output_folder(path: str, option: str) -> None:
    """Before any work: create the folder ``path`` (and its parents) or say why it cannot be."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"{option} {path}: cannot create that folder ({err.strerror or err})") from None
    if not os.access(path, os.W_OK):
        raise CLIError(f"{option} {path}: folder is not writable")


# ------------------------------------------------------------------ argument types


def positive_number(text: str) -> float:
    """'1e9', '7B', '2T', '350m' -> float > 0 (suffixes k, m, b/g, t, p: powers of 1000)."""
    raw = text.strip().lower().replace("_", "")
    scale = 1.0
    if raw and raw[-1] in _SUFFIXES:
        scale, raw = _SUFFIXES[raw[-1]], raw[:-1]
    try:
        value = float(raw) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 1e9, 7B, 2T)") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def bit_width(text: str) -> int:
    """A bit width that some named format has (4, 6, 8, 16, 32)."""
    from lightning_fpq.formats import named_formats

    widths = sorted({fmt.bits for fmt in named_formats().values()})
    try:
        bits: Optional[int] = int(text)
    except ValueError:
        bits = None
    if bits not in widths:
        raise argparse.ArgumentTypeError(
            f"no named format has {text!r} bits: expected one of {', '.join(map(str, widths))} "
            "(any eXmY format has 1 + X + Y bits)"
        )
    return int(text)


def format_name(text: str) -> Any:
    from lightning_fpq.formats import FPFormat

    try:
        return FPFormat.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def format_list(text: str) -> list:
    names = [t for t in (part.strip() for part in text.split(",")) if t]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no format (e.g. e2m1,e4m3,bf16)")
    return [format_name(name) for name in names]


def block_size(text: str) -> Any:
    """'128', 'channel' or 'tensor' (the laws know no unscaled blocks)."""
    try:
        return _config.block_size(text, what="B", allow_none=False)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# ------------------------------------------------------------------ output helpers


def _console():
    from rich.console import Console

    # a terminal gets its own width; a pipe or a test capture gets 120 columns, so tables never wrap
    return Console(file=sys.stdout, highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)


def _table(title: Optional[str], columns: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[bool] = ()):
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False, show_edge=False)
    for i, name in enumerate(columns):
        table.add_column(name, justify="right" if (right[i] if i < len(right) else False) else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def _g(x: float, digits: int = 3) -> str:
    """Compact number: 2.73e+13 -> '2.73e13'; inf -> 'inf'."""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    text = f"{x:.{digits}g}"
    return text.replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _pct(x: float) -> str:
    """A fraction as a percentage, with two significant digits below 10%: 0.00116 -> '0.12%'."""
    return f"{x:.0%}" if abs(x) >= 0.1 else f"{100 * x:.2g}%"


def _law(path: Optional[str]):
    """None or a named law (paper, demo-calibration) or a law YAML file."""
    from lightning_fpq.scaling.law import resolve_named_law

    return resolve_named_law(path)


def _quietly(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with the laws' ExtrapolationWarning silenced (the command prints its own line)."""
    import warnings

    from lightning_fpq.scaling.law import ExtrapolationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExtrapolationWarning)
        return fn()


def _warn_extrapolation(law, N: Any = None, D: Any = None) -> None:
    """One line on stderr when N or D lies beyond 2x the range the law was fitted on."""
    found = law.extrapolation(N, D)
    if not found:
        return
    what = {"N": "parameters", "D": "tokens"}
    values = " and ".join(f"{w.quantity} = {_g(w.value)} {what[w.quantity]}" for w in found)
    ranges = ", ".join(f"{w.quantity} {_g(w.low)}..{_g(w.high)}" for w in found)
    print(
        f"warning: {values} lie{'s' if len(found) == 1 else ''} beyond 2x the range {type(law).__name__} was fitted on "
        f"({ranges}): the numbers below are extrapolations",
        file=sys.stderr,
    )


def _law_line(law, block_size: Any = None) -> str:
    prov = law.provenance
    source = prov.citation if prov.source == "paper" else prov.short_str()
    line = f"{type(law).__name__} ({source})"
    if prov.source == "paper":
        line += "; uncalibrated for your model and data: fit your own (lightning-fpq fit)"
    if block_size == "tensor":
        line += "; uncalibrated for tensor-wise scaling (no such runs were fitted)"
    return line


def _block_text(bs: Any) -> str:
    """'128-element blocks', 'channel-wise scaling' or 'tensor-wise scaling'."""
    text = _config.block_size_text(bs)
    return f"{text}-element blocks" if isinstance(bs, int) else f"{text}-wise scaling"


def _add_law_options(parser: argparse.ArgumentParser, *, block: bool = True) -> None:
    parser.add_argument(
        "--law",
        metavar="LAW",
        help="'paper' (the default: the paper's Capybara law), 'demo-calibration' (this project's CPU sweep), "
        "or a law YAML saved by `fit` or law.save()",
    )
    if block:
        parser.add_argument(
            "--block-size",
            type=block_size,
            default=128,
            metavar="B",
            help="elements per scale: an int, 'channel' or 'tensor' (default: 128)",
        )


def _add_config_options(
    parser: argparse.ArgumentParser, *, example: str, out: tuple[str, str], progress_bar: str
) -> None:
    """The options of a command run from a config (sweep, demo): KEY=VALUE overrides, --out, --no-progress-bar."""
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"config overrides, e.g. {example}")
    parser.add_argument("--out", metavar=out[0], help=out[1])
    parser.add_argument("--no-progress-bar", action="store_true", help=progress_bar)


def _config_overrides(args: argparse.Namespace, options: Sequence[str]) -> list[str]:
    """The KEY=VALUE overrides, then ``option=value`` for each of ``options`` given, then --no-progress-bar."""
    overrides = list(args.overrides)
    overrides += [f"{key}={getattr(args, key)}" for key in options if getattr(args, key) is not None]
    if args.no_progress_bar:
        overrides.append("progress_bar=false")
    return overrides


# ---------------------------------------------------------------------- formats


def cmd_formats(args: argparse.Namespace) -> int:
    from lightning_fpq.formats import named_formats
    from lightning_fpq.scaling.capybara import CapybaraLaw

    law = CapybaraLaw.paper()
    groups: dict = {}
    for alias, fmt in named_formats().items():
        groups.setdefault(fmt, []).append(alias)
    rows = []
    for fmt in sorted(groups, key=lambda f: (f.bits, -f.ebits)):
        if args.bits is not None and fmt.bits != args.bits:
            continue
        aliases = ", ".join(a for a in groups[fmt] if a != fmt.name)
        best = law.optimal_format(fmt.bits) if fmt.bits >= 2 else None
        law_best = "yes" if best is not None and (best.ebits, best.mbits) == (fmt.ebits, fmt.mbits) else ""
        rows.append(
            [
                fmt.name,
                aliases,
                str(fmt.bits),
                str(fmt.ebits),
                str(fmt.mbits),
                str(fmt.bias),
                _g(fmt.max, 6),
                _g(fmt.min_subnormal, 4),
                fmt.special,
                law_best,
            ]
        )
    console = _console()
    console.print(
        _table(
            "Named formats: 1 sign + E exponent + M mantissa bits",
            ["name", "aliases", "bits", "E", "M", "bias", "max", "min subnormal", "special", "law's best E/M"],
            rows,
            right=[False, False, True, True, True, True, True, True, False, False],
        )
    )
    if args.optimal:
        rows = []
        for p in range(2, 17):
            e_opt, m_opt = law.optimal_split(p)
            best = law.optimal_format(p, any_split=True)
            try:
                in_use = law.optimal_format(p).name
            except ValueError:  # no format in use has p bits
                in_use = "-"
            rows.append([str(p), best.name, in_use, f"{e_opt:.2f}", f"{m_opt:.2f}"])
        console.print(
            _table(
                "Best split per bit width (Capybara law, arXiv 2501.02423): integer pair minimising 1/((E+0.5)^dl (M+0.5)^nu)",
                ["bits", "best format", "best in use", "E_opt", "M_opt"],
                rows,
                right=[True, False, False, True, True],
            )
        )
        console.print(
            "'best format' ranges over every ExMy split with E >= 1 (E0My is the same grid as E1M(y-1)); "
            "'best in use' over the formats hardware runs (docs/science.md section 4), what `plan` proposes"
        )
    return 0


def add_formats(sub) -> None:
    p = sub.add_parser(
        "formats",
        help="table of the named formats (bits, E, M, bias, range, special values)",
        description="List the named floating-point formats.",
    )
    p.add_argument("--bits", type=bit_width, help="only formats of this many bits (4, 6, 8, 16 or 32)")
    p.add_argument("--optimal", action="store_true", help="also list the law's best E/M split for every width 2..16")
    p.set_defaults(func=cmd_formats)


# ---------------------------------------------------------------------- predict


def verdict(law, N: float, D: float, fmt, bs) -> str:
    """One line on whether D tokens in ``fmt`` still pay, from D_crit and the token value."""
    d_crit = float(law.critical_data_size(N, fmt, bs))
    if math.isinf(d_crit):
        why = (
            "no quantization penalty at this block size"
            if law.kind == "capybara"
            else "this law has no data-dependent quantization penalty"
        )
        return f"{fmt.name}: no critical data size ({why}): more tokens always lower the loss."
    ratio = D / d_crit
    worth = float(law.token_value(N, D, fmt, bs))
    if ratio <= 0.5:
        return (
            f"OK: {_g(D)} tokens is {_pct(ratio)} of D_crit ({_g(d_crit)}) for {fmt.name}; "
            f"a further token is still worth {_pct(worth)} of an unquantized one."
        )
    if ratio <= 1.0:
        return (
            f"NEAR D_crit: {_g(D)} tokens is {_pct(ratio)} of D_crit ({_g(d_crit)}) for {fmt.name}; "
            f"a further token is worth only {_pct(worth)} of an unquantized one: widen the format before {_g(d_crit)} tokens."
        )
    wider = _first_wider(law, N, D, fmt, bs)
    advice = (
        f"switch to {wider[0].name} ({wider[0].bits} bits, D_crit {_g(wider[1])}) by {_g(d_crit)} tokens"
        if wider
        else "no format up to 32 bits reaches this D"
    )
    return f"PAST D_crit: tokens beyond {_g(d_crit)} raise the loss in {fmt.name}; {advice}."


def _first_wider(law, N: float, D: float, fmt, bs):
    """The narrowest wider format in use (the law's best per width) whose D_crit exceeds D."""
    from lightning_fpq.formats import FPFormat
    from lightning_fpq.scaling.capybara import FORMATS_IN_USE

    if not hasattr(law, "optimal_format"):
        return None
    widths = sorted({FPFormat.parse(name).bits for name in FORMATS_IN_USE})
    for p in (w for w in widths if w > fmt.bits):
        cand = law.optimal_format(p)
        d_crit = float(law.critical_data_size(N, cand, bs))
        if d_crit > D:
            return cand, d_crit
    return None


def cmd_predict(args: argparse.Namespace) -> int:
    law = _law(args.law)
    _warn_extrapolation(law, args.params, args.tokens)
    return _quietly(lambda: _predict(law, args))


def _predict(law, args: argparse.Namespace) -> int:
    N, D, bs = args.params, args.tokens, args.block_size
    console = _console()
    console.print(_law_line(law, bs))
    console.print(f"N = {_g(N)} parameters, D = {_g(D)} tokens, {_block_text(bs)}")
    rows = []
    baseline = float(law.loss(N, D, None, bs))
    resampled = law.resampled() if law.kind == "capybara" else []
    for fmt in args.format:
        loss = float(law.loss(N, D, fmt, bs))
        d_crit = float(law.critical_data_size(N, fmt, bs))
        row = [
            fmt.name,
            str(fmt.bits),
            f"{loss:.4f}",
            f"{loss - baseline:+.4f}",
            _g(d_crit),
            "0" if math.isinf(d_crit) else f"{D / d_crit:.3g}",
            f"{float(law.min_loss(N, fmt, bs)):.4f}",
        ]
        if resampled:
            row.insert(5, _interval([float(r.critical_data_size(N, fmt, bs)) for r in resampled]))
        rows.append(row)
    interval = ["D_crit 5-95%"] if resampled else []
    console.print(
        _table(
            None,
            ["format", "bits", "loss", "vs unquantized", "D_crit (tokens)", *interval, "D / D_crit", "loss at D_crit"],
            rows,
            right=[False, True, True, True, True, *[True] * len(interval), True, True],
        )
    )
    if resampled:
        console.print(f"D_crit 5-95%: over the law's {len(resampled)} bootstrap refits (its provenance)")
    for fmt in args.format:
        console.print(verdict(law, N, D, fmt, bs))
    if len(args.format) > 1:
        best = min(args.format, key=lambda f: float(law.loss(N, D, f, bs)))
        console.print(f"lowest predicted loss at this N and D: {best.name}")
    return 0


def add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="predicted loss, critical data size and a verdict for one run",
        description="Predict a quantized run's loss and how far it is from the critical data size.",
    )
    p.add_argument("--params", type=positive_number, required=True, metavar="N", help="parameters (e.g. 1e9, 1.3B)")
    p.add_argument("--tokens", type=positive_number, required=True, metavar="D", help="training tokens (e.g. 2e12, 2T)")
    p.add_argument(
        "--format",
        type=format_list,
        required=True,
        metavar="FMT[,FMT...]",
        help="format name(s): e2m1, e4m3, bf16, eXmY ...",
    )
    _add_law_options(p)
    p.set_defaults(func=cmd_predict)


# ------------------------------------------------------------------------- plan

BOOTSTRAP_DEFAULT = 40
"""`fit --bootstrap` default: 40 refits, each started from the fit (on the shipped calibration they add
about 1.2 s to a 5 s fit: docs/scaling.md, "The command line")."""


def cmd_plan(args: argparse.Namespace) -> int:
    law = _law(args.law)
    if not hasattr(law, "optimal_precision"):
        raise CLIError(f"a {law.kind} law has no precision term: plan needs a capybara or kumar law")
    C, bs = args.compute, args.block_size
    plan = _quietly(lambda: law.optimal_precision(C, N=args.params, D=args.tokens, block_size=bs))
    _warn_extrapolation(law, [plan.params, plan.format_params], [plan.tokens, plan.format_tokens])
    return _quietly(lambda: _plan(law, plan, args))


def _plan(law, plan, args: argparse.Namespace) -> int:
    C, bs = args.compute, args.block_size
    console = _console()
    regime = {
        "joint": "N, D and precision free",
        "fixed_N": f"N fixed at {_g(plan.params)}",
        "fixed_D": f"D fixed at {_g(plan.tokens)}",
    }
    console.print(_law_line(law, bs))
    console.print(f"compute {_g(C)} FLOPs (C = 6/16 * P * N * D), {_block_text(bs)}; {regime[plan.regime]}")
    console.print(
        f"optimal precision: {plan.bits:.2f} bits (real-valued E/M split): "
        f"N = {_g(plan.params)}, D = {_g(plan.tokens)}, loss {plan.loss:.4f}"
    )
    console.print(
        f"best format: {plan.format.name} ({plan.format.bits} bits): "
        f"N = {_g(plan.format_params)}, D = {_g(plan.format_tokens)}, loss {plan.format_loss:.4f}"
    )
    rows, losses = [], {}
    for fmt in args.formats:
        try:
            n_, d_, loss = law.plan_format(C, fmt, N=args.params, D=args.tokens, block_size=bs)
        except ValueError:  # the budget buys less than one token or parameter in this format
            rows.append([fmt.name, str(fmt.bits), "-", "-", "-", "-"])
            continue
        losses[fmt.name] = loss
        d_crit = float(law.critical_data_size(n_, fmt, bs))
        rows.append(
            [
                fmt.name,
                str(fmt.bits),
                _g(n_),
                _g(d_),
                f"{loss:.4f}",
                "0" if math.isinf(d_crit) else f"{d_ / d_crit:.3g}",
            ]
        )
    how = {
        "joint": "N and D re-optimised per format",
        "fixed_N": "D = C / (6/16 * P * N)",
        "fixed_D": "N = C / (6/16 * P * D)",
    }
    console.print(
        _table(
            f"the same budget in each listed format ({how[plan.regime]})",
            ["format", "bits", "N", "D", "loss", "D / D_crit"],
            rows,
            right=[False, True, True, True, True, True],
        )
    )
    if losses:
        console.print(f"best of the listed formats: {min(losses, key=losses.get)}")
    return 0


def add_plan(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="compute-optimal precision and format for a FLOP budget",
        description="Minimise the law's loss at fixed compute C = (6/16) P N D.",
    )
    p.add_argument(
        "--compute", type=positive_number, required=True, metavar="FLOPS", help="training compute in FLOPs (e.g. 1e23)"
    )
    fixed = p.add_mutually_exclusive_group()
    fixed.add_argument(
        "--params", type=positive_number, metavar="N", help="fix the model size (precision and D are planned)"
    )
    fixed.add_argument("--tokens", type=positive_number, metavar="D", help="fix the data (precision and N are planned)")
    p.add_argument(
        "--formats",
        type=format_list,
        default="e2m1,e3m2,e4m3,bf16",
        metavar="FMT[,FMT...]",
        help="formats to compare at this budget (default: e2m1,e3m2,e4m3,bf16)",
    )
    _add_law_options(p)
    p.set_defaults(func=cmd_plan)


# -------------------------------------------------------------------------- fit


def _fixed_constants(text: Optional[str]) -> dict:
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise CLIError(f"--fix {text!r}: expected NAME=VALUE[,NAME=VALUE...] (e.g. dl=3.1926,nu=2.9543)")
    return out


def _fit_rows(path: str, min_tokens: Optional[float] = None) -> tuple[list, list, str]:
    """A runs CSV -> (the rows a fit may use, rows left out by ``min_tokens``, a note on what was left out).

    A sweep CSV (with a ``status`` column) gives its ``ok`` rows, the last row of each run id;
    any other CSV is used whole (the fit checks its cells). ``min_tokens``: rows with fewer
    training tokens D are set aside (returned second, for the plots).
    """

    from lightning_fpq.scaling.fitting import read_csv_rows
    from lightning_fpq.scaling.sweep_csv import ok_rows

    rows = read_csv_rows(path)  # ValueError: one line on stderr, exit 2, like CLIError
    used, counts = ok_rows(rows)
    if not used:
        raise CLIError(
            f"CSV {path!r}: none of its {counts['total']} rows has status ok ({counts['failed']} failed): nothing to fit"
        )
    left_out = []
    if counts["failed"]:
        left_out.append(f"{counts['failed']} failed")
    if counts["superseded"]:
        left_out.append(f"{counts['superseded']} superseded by a later row of the same run")
    short: list = []
    if min_tokens is not None:
        from lightning_fpq.scaling.fitting import load_rows

        tokens = load_rows(used, kind="chinchilla")["D"]  # checks the N, D, loss cells
        short = [r for r, d in zip(used, tokens) if d < min_tokens]
        used = [r for r, d in zip(used, tokens) if d >= min_tokens]
        if short:
            left_out.append(f"{len(short)} with D < {_g(min_tokens)} tokens")
        if not used:
            raise CLIError(f"CSV {path!r}: no row has D >= --min-tokens {_g(min_tokens)}")
    note = f"{len(used)} of {counts['total']} rows used" + (f" ({', '.join(left_out)} left out)" if left_out else "")
    return used, short, note


def _critical_table(law, data) -> Any:
    """D_crit of every quantized (format, B) in the rows, at their smallest and largest N."""
    import numpy as np

    from lightning_fpq.scaling.capybara import capybara_critical_data_size

    consts = law.constants()
    n_lo, n_hi = float(data["N"].min()), float(data["N"].max())
    keys = sorted(
        {
            (int(e), int(m), float(lb), str(b))
            for e, m, lb, b in zip(data["E"], data["M"], data["log2b"], data["B"])
            if lb > 0
        },
        key=lambda k: (k[2], k[0] + k[1], k[0]),
    )
    resampled = [r.constants() for r in law.resampled()]
    rows = []
    for e, m, lb, b in keys:
        sel = (data["E"] == e) & (data["M"] == m) & np.isclose(data["log2b"], lb)
        d_max = float(data["D"][sel].max())
        crit_lo = float(capybara_critical_data_size(n_lo, e, m, lb, **consts))
        crit_hi = float(capybara_critical_data_size(n_hi, e, m, lb, **consts))
        row = [f"e{e}m{m}", b, _g(crit_lo), _g(crit_hi)]
        if resampled:
            row.append(_interval([float(capybara_critical_data_size(n_hi, e, m, lb, **c)) for c in resampled]))
        rows.append(row + [_g(d_max), f"{d_max / crit_lo:.3g}"])
    interval = ["5-95% (large N)"] if resampled else []
    return _table(
        f"critical data size of the fitted law (tokens), at the rows' smallest N = {_g(n_lo)} and largest N = {_g(n_hi)}",
        [
            "format",
            "B",
            "D_crit (small N)",
            "D_crit (large N)",
            *interval,
            "largest D run",
            "that D / D_crit (small N)",
        ],
        rows,
        right=[False, True, True, True, *[True] * len(interval), True, True],
    )


def _interval(values: Sequence[float]) -> str:
    """The 5-95% range of bootstrap values, as 'lo..hi'."""
    import numpy as np

    lo, hi = np.percentile(values, (5.0, 95.0))
    return f"{_g(float(lo))}..{_g(float(hi))}"


def cmd_fit(args: argparse.Namespace) -> int:
    # what the fit needs and where it writes, checked before the fit runs
    require("scipy.optimize", "fit")
    if args.plots:
        require("matplotlib", "fit --plots")
        check_output_folder(args.plots, "--plots")
    if args.out:
        check_output_file(args.out, "--out")
    from lightning_fpq.scaling.fitting import fit, load_rows

    holdout: Any = args.holdout
    if holdout is not None and holdout not in ("largest_N", "largest_D"):
        try:
            holdout = float(holdout)
        except ValueError:
            raise CLIError(
                f"--holdout {args.holdout!r}: expected a fraction in (0, 1), 'largest_N' or 'largest_D'"
            ) from None
    if args.plots and args.kind != "capybara":
        raise CLIError(f"--plots draws capybara fits only (formats and block sizes), not a {args.kind} fit")
    rows, short, note = _fit_rows(args.csv, args.min_tokens)
    result = fit(
        rows,
        kind=args.kind,
        fixed=_fixed_constants(args.fix),
        holdout=holdout,
        starts=args.starts,
        seed=args.seed,
        bootstrap=args.bootstrap,
        baseline=args.kind != "chinchilla",
    )
    law = result.law
    paper = type(law).paper().constants()
    console = _console()
    boot = bool(result.intervals)
    rows_table = [
        [
            name,
            f"{value:.6g}",
            *(
                [
                    f"{_g(result.intervals[name][0], 4)}..{_g(result.intervals[name][1], 4)}"
                    if name in result.intervals
                    else "-"
                ]
                if boot
                else []
            ),
            f"{paper[name]:.6g}",
            "fixed" if name in result.fixed else ("at bound" if name in result.at_bounds else ""),
        ]
        for name, value in law.constants().items()
        if name in paper and name in type(law).FITTED
    ]
    console.print(
        _table(
            f"{type(law).__name__} fitted to {args.csv}",
            [
                "constant",
                "fitted",
                *(["5-95% (bootstrap)"] if boot else []),
                "paper" if type(law).PAPER_PROVENANCE.source == "paper" else "start",
                "note",
            ],
            rows_table,
            right=[False, True, *([True] if boot else []), True, False],
        )
    )
    console.print(f"{note}; {result.summary()}")
    if boot:
        converged = (law.provenance.extra or {}).get("bootstrap", {}).get("converged", 0)
        console.print(
            f"intervals: 5th-95th percentile of {converged} refits on rows resampled with replacement (--bootstrap {args.bootstrap})"
        )
    if result.baseline_summary():
        console.print(result.baseline_summary())
    worst = int(abs(result.residuals).argmax())
    console.print(
        f"largest residual: row {worst + 1} of the rows used, observed {result.observed[worst]:.4f}, predicted {result.predicted[worst]:.4f}"
    )
    if result.at_bounds:
        console.print(
            f"note: {', '.join(result.at_bounds)} ended on a bound: the rows may not determine them; consider --fix"
        )
    data = load_rows(rows, kind=args.kind) if (args.plots or law.kind == "capybara") else None
    if law.kind == "capybara" and (data["log2b"] > 0).any():
        console.print(_critical_table(law, data))
    if args.out:
        law.save(args.out)
        console.print(f"wrote {args.out}")
    if args.plots:
        from lightning_fpq.scaling.plots import plot_fit

        excluded = load_rows(short, kind=args.kind) if short else None
        for path in plot_fit(result, data, args.plots, excluded=excluded):
            console.print(f"wrote {path}")
    return 0


def add_fit(sub) -> None:
    p = sub.add_parser(
        "fit",
        help="fit the law's constants to your runs (CSV: N, D, E, M, B, loss)",
        description="Fit a scaling law to a CSV of runs: columns N, D, E, M (or format), B, loss. "
        "A sweep CSV's failed rows are left out.",
    )
    p.add_argument("csv", help="CSV file, one run per row (e.g. written by `lightning-fpq sweep`)")
    p.add_argument("--out", metavar="LAW.yaml", help="write the fitted law here")
    p.add_argument(
        "--plots", metavar="DIR", help="write loss_vs_tokens.png, fitted_vs_observed.png and residuals.png here"
    )
    p.add_argument(
        "--kind",
        choices=("capybara", "ceiling", "kumar", "chinchilla"),
        default="capybara",
        help="which law to fit (default: capybara; ceiling: the same rows, a law without a loss minimum in D)",
    )
    p.add_argument(
        "--holdout",
        metavar="FRACTION|largest_N|largest_D",
        help="rows kept out of the fit and scored: a fraction, the largest model (largest_N) or the longest runs (largest_D)",
    )
    p.add_argument(
        "--min-tokens",
        type=positive_number,
        metavar="D",
        help="leave out runs with fewer training tokens (early-training runs the law does not describe); "
        "the plots still show them",
    )
    p.add_argument("--fix", metavar="NAME=VALUE,...", help="hold constants fixed, e.g. dl=3.1926,nu=2.9543")
    p.add_argument("--starts", type=int, default=16, help="starting points of the optimiser (default: 16)")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=BOOTSTRAP_DEFAULT,
        metavar="K",
        help=f"refits on resampled rows for the 5-95%% intervals of every constant and D_crit (default: {BOOTSTRAP_DEFAULT}; 0: none)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the random starts and of a random hold-out (default: 0)"
    )
    p.set_defaults(func=cmd_fit)


# ------------------------------------------------------------------------ sweep


def cmd_sweep(args: argparse.Namespace) -> int:
    from lightning_fpq.scaling.sweep import SweepInterrupted, run_sweep  # omegaconf, torch, Lightning: only here
    from lightning_fpq.scaling.sweep_config import load_config

    cfg = load_config(args.config, tuple(_config_overrides(args, ("out", "executor", "workers", "address"))))
    if args.address is not None and cfg.executor != "ray":
        raise CLIError(f"--address {args.address} is a Ray cluster's address: add --executor ray")
    try:
        result = run_sweep(cfg, retry_failed=args.retry_failed, dry_run=args.dry_run)
    except SweepInterrupted as stop:
        print(stop.result.summary())
        print(
            f"{PROG} sweep: interrupted: the {stop.result.ran} run(s) finished are in {cfg.out}; "
            "run the same command to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if args.dry_run:
        return 0
    print(result.summary())
    if result.ok or result.skipped:
        print(f"next: {PROG} fit {cfg.out} --plots <DIR> --out <LAW.yaml>")
    return 1 if result.failed else 0


def add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="a grid of small training runs -> a CSV to fit the law to (resumable)",
        description="Train every run of a grid (model sizes x token budgets x formats x block sizes x seeds) and append "
        "one row per run to a CSV as it finishes; run it again to resume. A run that fails is recorded with its "
        "reason and the sweep goes on (exit status 1 if any run failed). Any config key can be set as key=value.",
    )
    p.add_argument("config", metavar="CONFIG.yaml", help="the sweep config (see examples/calibration/sweep.yaml)")
    _add_config_options(
        p,
        example="threads=2 lr=0.002",
        out=("CSV", "the CSV to append to (default: the config's out)"),
        progress_bar="no live bar (one line per run is printed anyway)",
    )
    p.add_argument(
        "--executor",
        choices=("sequential", "local", "ray"),
        help="where the runs train: one after another here (sequential, the default), on --workers processes "
        "here (local), or on a Ray cluster (ray; pip install 'lightning-fpq[ray]')",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="runs at once (local, ray; default: as many as the CPUs, or the cluster's resources, hold)",
    )
    p.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="the Ray cluster to run on (auto, HOST:PORT, ray://HOST:10001); default: start Ray on this machine",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="check the config and list the runs still to do; train nothing"
    )
    p.add_argument("--retry-failed", action="store_true", help="also run again the runs recorded as failed")
    p.set_defaults(func=cmd_sweep)


# ------------------------------------------------------------------------- plot


def cmd_plot(args: argparse.Namespace) -> int:
    require("matplotlib", "plot")
    law = _law(args.law)
    N, bs = args.params, args.block_size
    crits = [float(law.critical_data_size(N, f, bs)) for f in args.formats]
    finite = [c for c in crits if math.isfinite(c)]
    lo = args.min_tokens or (min(finite) / 300 if finite else 1e9)
    hi = args.max_tokens or (max(finite) * 10 if finite else 1e14)
    if not lo < hi:
        raise CLIError(f"--min-tokens {_g(lo)} must be below --max-tokens {_g(hi)}")
    from lightning_fpq.scaling.plots import plot_law

    title = (
        f"{type(law).__name__}: N = {_g(N)} parameters, {_block_text(bs)}\n"
        f"dots: critical data size D_crit, the lowest loss each format reaches"
    )
    path = plot_law(law, N, args.formats, bs, args.out, tokens=(lo, hi), title=title)
    print(f"wrote {path}")
    return 0


def add_plot(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="loss against tokens per format, D_crit marked (PNG)",
        description="Plot the law's predicted loss against training tokens for several formats.",
    )
    p.add_argument("--params", type=positive_number, required=True, metavar="N", help="parameters (e.g. 1e9)")
    p.add_argument(
        "--formats",
        type=format_list,
        default="e2m1,e4m3,bf16",
        metavar="FMT[,FMT...]",
        help="formats to draw (default: e2m1,e4m3,bf16)",
    )
    p.add_argument("--out", required=True, metavar="FILE.png", help="output image")
    p.add_argument("--min-tokens", type=positive_number, metavar="D", help="left end of the token axis")
    p.add_argument("--max-tokens", type=positive_number, metavar="D", help="right end of the token axis")
    _add_law_options(p)
    p.set_defaults(func=cmd_plot)


# ------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    require("matplotlib", "demo (its plot)")  # before minutes of training, not after
    from lightning_fpq.demo.run import load_config, run_demo  # imports torch and Lightning: only here

    overrides = _config_overrides(args, ("steps", "model", "out", "law", "unit"))
    if args.schedule is not None:
        overrides.append(f"schedule=[{','.join(f.name for f in args.schedule)}]")
    if args.switch_at is not None:
        overrides.append(f"switch_at={args.switch_at if args.switch_at == 'auto' else '[' + args.switch_at + ']'}")
    if args.baseline is not None:
        overrides.append(f"baseline={str(args.baseline).lower()}")
    run_demo(load_config(args.config, tuple(overrides)))
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the law's prediction against what tiny GPT runs observe (CPU, about 5 minutes)",
        description="Train, on the Python standard library's source (byte-level), a fixed low-precision run, a "
        "progressive run and a BF16 baseline with the model and settings of the shipped D_crit experiment; then "
        "plot their validation losses and quantization gaps against the law's predictions with intervals, beside "
        "the experiment's longer runs, and print how far the law was off. Any config key can be set as key=value.",
    )
    _add_config_options(
        p,
        example="steps=1024 fixed=e2m1",
        out=("DIR", "where the plot, logs and summary go (default: runs/demo)"),
        progress_bar="no progress bar (for logs and CI)",
    )
    p.add_argument("--config", metavar="YAML", help="a demo config (see examples/configs/demo.yaml)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: 4096, 4.19M tokens)")
    p.add_argument("--model", help="GPT size: micro (default; the experiment's), tiny, demo or small")
    p.add_argument(
        "--schedule", type=format_list, help="the progressive run's formats, lowest first (default: e1m0,e2m1,e4m3)"
    )
    p.add_argument(
        "--switch-at", help="switch points, comma-separated, in --unit; or 'auto' (from the law; the default)"
    )
    p.add_argument(
        "--unit", choices=("budget", "tokens", "dcrit"), help="unit of --switch-at (default: budget fractions)"
    )
    p.add_argument(
        "--law",
        metavar="LAW",
        help="scaling law: 'demo-calibration' (default: the shipped calibration, fitted to this project's CPU "
        "sweep), 'paper', or a law YAML",
    )
    p.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train the BF16 baseline run (default: yes)",
    )
    p.set_defaults(func=cmd_demo)


# --------------------------------------------------------------------- backends


def cmd_backends(args: argparse.Namespace) -> int:
    import torch

    from lightning_fpq import backends
    from lightning_fpq.recipe import QuantRecipe

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    requested = backends.check_backend(args.backend)
    # plain lines, not a table: the reasons are the point and must not be cut
    print(f"Backends here, for {device.type} tensors:")
    print(backends.describe_backends(device))
    print("\nWhat each backend runs:")
    print(backends.describe_composition())
    print(f"\nbackend={requested!r}: what runs each named recipe's layers on {device.type}:")
    for name in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        spec = QuantRecipe.from_name(name).layer_spec("blocks.0.mlp.fc")
        if spec is None or spec.is_identity:
            backend, reason = "unquantized", "the recipe quantizes nothing"
        else:
            try:
                backend, reason = backends.choose(requested, spec, device)
            except backends.BackendUnavailableError as err:
                backend, reason = "(error)", str(err)
        print(f"  {name:<6} {backend:<18} {reason}")
    return 0


def add_backends(sub) -> None:
    p = sub.add_parser(
        "backends",
        help="which layer backends run here, and which one each recipe gets",
        description="The backends available on this machine and the backend that runs each "
        "named recipe (backend='auto' unless --backend forces one).",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="device type to choose for (default: cuda if present)")
    p.add_argument("--backend", default="auto", help="the FPQuantPrecision backend argument to resolve (default: auto)")
    p.add_argument(
        "--recipes",
        default="paper,full,fp8,fp4,nvfp4,mxfp4,mxfp8,bf16",
        help="comma-separated named recipes (default: all)",
    )
    p.set_defaults(func=cmd_backends)


# ------------------------------------------------------------------------- main


SUBCOMMANDS: list[Callable[[Any], None]] = [
    add_formats,
    add_predict,
    add_plan,
    add_fit,
    add_plot,
    add_demo,
    add_sweep,
    add_backends,
]
"""Each entry registers one subcommand on the subparsers object: append yours here."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="Floating-point quantized training: formats, the Capybara scaling law, plans."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # KEY=VALUE overrides after an option ("sweep cfg.yaml --dry-run lr=0.01"): argparse
        # fills a positional nargs="*" only once, so later ones come back as extras
        if (
            extra
            and isinstance(getattr(args, "overrides", None), list)
            and all("=" in a and not a.startswith("-") for a in extra)
        ):
            args.overrides.extend(extra)
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as stop:  # --help (0) or a usage error (2, already printed on one line)
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, OSError, ImportError) as err:  # ImportError: an optional package is missing
        message = " ".join(str(err).split()) or type(err).__name__
        missing = (getattr(err, "name", None) or "") if isinstance(err, ImportError) else ""
        if missing.split(".")[0] in OPTIONAL and "pip install" not in message:
            message += f" ({install_hint(missing)})"
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
