"""CriticalDataMonitor and ProgressivePrecision in real (tiny) Lightning runs."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from helpers import TinyLM, token_loader
from lightning_fpq import CapybaraLaw, CriticalDataMonitor, FPQuantPrecision, ProgressivePrecision
from lightning_fpq.lightning.critical import critical_interval, critical_tokens, law_point, scale_group_sizes
from lightning_fpq.lightning.progressive import auto_switch_tokens
from lightning_fpq.lightning.tokens import TokenCounter
from lightning_fpq.linear import quantized_layers
from lightning_fpq.recipe import QuantRecipe
from lightning_fpq.scaling.law import Provenance
from lightning_fpq.scaling.params import count_params
from lightning_fpq.spec import ROLES

BATCH, SEQ = 4, 8
TOKENS_PER_STEP = BATCH * SEQ


def loader(n_batches: int) -> DataLoader:
    return token_loader(n_batches, BATCH, SEQ, seed=0)


def make_trainer(tmp_path, callbacks, *, max_steps, plugin=None, logger=False, **kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        plugins=[plugin if plugin is not None else FPQuantPrecision(recipe="paper", fmt="e2m1", block_size=16)],
        callbacks=callbacks,
        **kwargs,
    )


def law_with_dcrit(tokens: float, n_params: int, fmt="e2m1", block=16) -> CapybaraLaw:
    """The paper's law with g rescaled so that D_crit(n_params, fmt, block) == tokens.

    D_crit is proportional to g^(1/(2b)) (docs/science.md section 4)."""
    paper = CapybaraLaw.paper()
    d0 = paper.critical_data_size(n_params, fmt, block)
    return dataclasses.replace(paper, g=paper.g * (tokens / d0) ** (2 * paper.b))


N_TINY = count_params(TinyLM())


def test_law_with_dcrit_helper_hits_its_target():
    law = law_with_dcrit(1000.0, N_TINY)
    assert law.critical_data_size(N_TINY, "e2m1", 16) == pytest.approx(1000.0, rel=1e-9)


# ------------------------------------------------------------------- ProgressivePrecision
@pytest.mark.parametrize(
    "switch_at,unit,expected_steps",
    [([5 * TOKENS_PER_STEP, 9 * TOKENS_PER_STEP], "tokens", [5, 9]), ([0.25, 0.5], "budget", [5, 10])],
)
def test_switches_at_the_right_token_count(tmp_path, switch_at, unit, expected_steps):
    progressive = ProgressivePrecision(["e2m1", "e4m3", "bf16"], switch_at, unit=unit)
    trainer = make_trainer(tmp_path, [progressive], max_steps=20)
    trainer.fit(TinyLM(), loader(20))
    # a switch happens at the start of the first batch whose preceding tokens reach the threshold
    assert [h["step"] for h in progressive.history] == expected_steps
    assert [h["tokens"] for h in progressive.history] == [s * TOKENS_PER_STEP for s in expected_steps]
    assert trainer.precision_plugin.recipe.name == "bf16"
    assert [h["to"].split()[1] for h in progressive.history] == ["e4m3", "bf16"]


def test_dcrit_unit_switches_at_a_fraction_of_each_stage_critical_size(tmp_path):
    law = law_with_dcrit(10 * TOKENS_PER_STEP, N_TINY)  # D_crit(e2m1) = 10 steps of tokens
    progressive = ProgressivePrecision(["e2m1", "e4m3"], [0.45], unit="dcrit", law=law)  # 144 tokens
    trainer = make_trainer(tmp_path, [progressive], max_steps=12)
    trainer.fit(TinyLM(), loader(12))
    assert [h["step"] for h in progressive.history] == [5]


def test_auto_rule_matches_the_closed_form_crossing():
    """-dL/dD / P equal for both stages: D^(2b) = d N^a (1/P1 - 1/P2) / (c1/P1 - c2/P2),
    c = log2 B / (g (E+.5)^dl (M+.5)^nu), derived by hand from the law (docs/science.md section 4)."""
    law, n = CapybaraLaw.paper(), 1e8
    cur = law_point(QuantRecipe.from_name("paper", fmt="e2m1", block_size=128), law, int(n))
    nxt = law_point(QuantRecipe.from_name("paper", fmt="e4m3", block_size=128), law, int(n))

    def c(e, m):
        return math.log2(128) / (law.g * (e + 0.5) ** law.dl * (m + 0.5) ** law.nu)

    c1, c2 = c(2, 1), c(4, 3)
    expected = (law.d * n**law.a * (1 / 4 - 1 / 8) / (c1 / 4 - c2 / 8)) ** (1 / (2 * law.b))
    got = auto_switch_tokens(law, int(n), cur, nxt, 4, 8)
    assert got == pytest.approx(expected, rel=1e-3)
    assert got < law.critical_data_size(n, "e2m1", 128)  # always before the current D_crit


def test_auto_schedule_uses_the_law(tmp_path):
    law = law_with_dcrit(40 * TOKENS_PER_STEP, N_TINY)
    progressive = ProgressivePrecision(["e2m1", "bf16"], "auto", law=law)
    trainer = make_trainer(tmp_path, [progressive], max_steps=40)
    trainer.fit(TinyLM(), loader(40))
    threshold = progressive.thresholds[0]
    assert 0 < threshold < 40 * TOKENS_PER_STEP
    assert progressive.history[0]["tokens"] == math.ceil(threshold / TOKENS_PER_STEP) * TOKENS_PER_STEP


def test_resume_mid_stage_continues_in_the_same_stage_with_the_same_tokens(tmp_path):
    def run(max_steps, ckpt=None):
        progressive = ProgressivePrecision(["e2m1", "e4m3", "bf16"], [4 * TOKENS_PER_STEP, 12 * TOKENS_PER_STEP])
        trainer = make_trainer(tmp_path, [progressive], max_steps=max_steps)
        trainer.fit(TinyLM(), loader(20), ckpt_path=ckpt)
        return trainer, progressive

    trainer, first = run(7)  # stopped in stage 1 (e4m3)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    assert first.stage == 1 and trainer.precision_plugin.recipe.fmt.name == "e4m3"

    resumed_trainer, resumed = run(7, ckpt=tmp_path / "mid.ckpt")  # nothing left to train
    counter = next(c for c in resumed_trainer.callbacks if isinstance(c, TokenCounter))
    assert resumed.stage == 1 and resumed.history == first.history
    assert counter.tokens_seen == 7 * TOKENS_PER_STEP
    assert resumed_trainer.precision_plugin.recipe.fmt.name == "e4m3"

    full_trainer, full = run(15, ckpt=tmp_path / "mid.ckpt")
    assert [h["step"] for h in full.history] == [4, 12]
    assert full_trainer.precision_plugin.recipe.name == "bf16"


def test_progressive_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match=r"does not rise in precision .*allow_decreasing=True"):
        ProgressivePrecision(["e4m3", "e2m1"], [10])
    ProgressivePrecision(["e4m3", "e2m1"], [10], allow_decreasing=True)
    with pytest.raises(ValueError, match="switch_at has 1 values for 3 stages: expected 2"):
        ProgressivePrecision(["e2m1", "e4m3", "bf16"], [10])
    with pytest.raises(ValueError, match="unit='tokens' must be token counts >= 1"):
        ProgressivePrecision(["e2m1", "bf16"], [0.5])
    with pytest.raises(ValueError, match="schedule entry 'fp5' is not valid"):
        ProgressivePrecision(["fp5", "bf16"], [10])
    with pytest.raises(ValueError, match="unit='hours' is not valid"):
        ProgressivePrecision(["e2m1", "bf16"], [10], unit="hours")
    with pytest.raises(ValueError, match="must increase"):
        ProgressivePrecision(["e2m1", "e4m3", "bf16"], [20, 10])
    trainer = Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        callbacks=[ProgressivePrecision(["e2m1", "bf16"], [10])],
    )
    with pytest.raises(ValueError, match="needs the FPQuantPrecision plugin"):
        trainer.fit(TinyLM(), loader(2))


def test_budget_unit_without_max_steps_says_how_to_fix(tmp_path):
    trainer = make_trainer(
        tmp_path, [ProgressivePrecision(["e2m1", "bf16"], [0.5], unit="budget")], max_steps=-1, max_epochs=1
    )
    with pytest.raises(ValueError, match="token_budget=<tokens> or set Trainer\\(max_steps=...\\)"):
        trainer.fit(TinyLM(), loader(2))


# -------------------------------------------------------------------- CriticalDataMonitor
def test_each_threshold_warns_exactly_once_and_metrics_are_logged(tmp_path):
    law = law_with_dcrit(9.5 * TOKENS_PER_STEP, N_TINY)  # crossings after steps 5, 8 and 10
    monitor = CriticalDataMonitor(law=law, thresholds=(0.5, 0.8, 1.0), plateau_window=0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=15, logger=CSVLogger(tmp_path, name="m"), log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyLM(), loader(15))
    ours = [str(w.message) for w in caught if "critical data size" in str(w.message)]
    assert len(ours) == 3, ours
    assert [m.split(" = ")[1].split(" of")[0] for m in ours] == ["53%", "84%", "105%"]  # 5, 8, 10 of 9.5
    assert "raise the precision now" in ours[-1]
    assert monitor.d_crit == pytest.approx(9.5 * TOKENS_PER_STEP)
    metrics = trainer.logged_metrics
    for key in ("fpq/tokens_seen", "fpq/d_crit", "fpq/d_crit_fraction", "fpq/predicted_loss", "fpq/format_bits"):
        assert key in metrics
    assert float(metrics["fpq/tokens_seen"]) == 15 * TOKENS_PER_STEP
    assert float(metrics["fpq/d_crit_fraction"]) == pytest.approx(15 / 9.5)
    header = (tmp_path / "m" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "fpq/d_crit_fraction" in header


def test_stop_action_stops_at_dcrit(tmp_path):
    law = law_with_dcrit(5.5 * TOKENS_PER_STEP, N_TINY)
    trainer = make_trainer(tmp_path, [CriticalDataMonitor(law=law, action="stop", plateau_window=0)], max_steps=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyLM(), loader(50))
    assert trainer.global_step == 6


def test_raise_precision_action_advances_the_schedule_at_dcrit(tmp_path):
    law = law_with_dcrit(5.5 * TOKENS_PER_STEP, N_TINY)
    progressive = ProgressivePrecision(["e2m1", "e4m3"], [10**9])  # never by tokens
    monitor = CriticalDataMonitor(law=law, action="raise-precision", plateau_window=0)
    trainer = make_trainer(tmp_path, [progressive, monitor], max_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyLM(), loader(10))
    assert progressive.stage == 1 and progressive.history[0]["reason"].startswith("D_crit reached")
    assert progressive.history[0]["tokens"] == 6 * TOKENS_PER_STEP
    # D_crit was recomputed for the new stage
    assert monitor.d_crit == pytest.approx(critical_tokens(progressive.stages[1], law, N_TINY)[0])


def test_plateau_check_warns_when_loss_stops_falling_at_low_precision(tmp_path):
    class Flat(TinyLM):
        def training_step(self, batch, batch_idx):
            return (self.hidden.weight * 0).sum() + 2.0  # a constant loss: no progress at all

    monitor = CriticalDataMonitor(plateau_window=5)
    trainer = make_trainer(tmp_path, [monitor], max_steps=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Flat(), loader(20))
    plateau = [str(w.message) for w in caught if "stopped falling" in str(w.message)]
    assert len(plateau) == 1 and "e2m1" in plateau[0]


def test_monitor_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="action='pause' is not valid"):
        CriticalDataMonitor(action="pause")
    with pytest.raises(ValueError, match="thresholds=.* is not valid"):
        CriticalDataMonitor(thresholds=(0.5, -1))
    with pytest.raises(ValueError, match="n_params=0 is not valid"):
        CriticalDataMonitor(n_params=0)
    with pytest.raises(ValueError, match="needs a ProgressivePrecision"):
        make_trainer(tmp_path, [CriticalDataMonitor(action="raise-precision")], max_steps=1).fit(TinyLM(), loader(1))


def test_one_token_counter_is_shared_by_both_callbacks(tmp_path):
    progressive = ProgressivePrecision(["e2m1", "bf16"], [3 * TOKENS_PER_STEP])
    monitor = CriticalDataMonitor(plateau_window=0)
    trainer = make_trainer(tmp_path, [monitor, progressive], max_steps=5)
    trainer.fit(TinyLM(), loader(5))
    counters = [c for c in trainer.callbacks if isinstance(c, TokenCounter)]
    assert len(counters) == 1 and counters[0].tokens_seen == 5 * TOKENS_PER_STEP
    assert progressive.history[0]["step"] == 3


def test_law_point_adds_the_penalty_of_every_quantized_operand():
    law = CapybaraLaw.paper()
    mixed = QuantRecipe.from_name("paper", fmt="e4m3", block_size=128).with_spec(
        p6=QuantRecipe.from_name("paper", fmt="e2m1", block_size=32).p6
    )

    def share(E, M, B):  # one operand's third of the law's log2 B / ((E+.5)^dl (M+.5)^nu), by hand
        return math.log2(B) / ((E + 0.5) ** law.dl * (M + 0.5) ** law.nu) / 3

    point = law_point(mixed, law, 10**8)
    assert point.factor == pytest.approx(2 * share(4, 3, 128) + share(2, 1, 32), rel=1e-12)
    assert not point.calibrated and "P2, P4, P6 differ" in point.short_str()
    # exact for the paper recipe: the law's own D_crit
    paper = law_point(QuantRecipe.from_name("paper", fmt="e2m1", block_size=32), law, 10**8)
    assert paper.calibrated and paper.critical_data_size(law, 10**8) == pytest.approx(
        law.critical_data_size(10**8, "e2m1", 32), rel=1e-12
    )
    # all six operands (full) double the penalty: D_crit shrinks by 2^(1/(2b)); not what the law was fitted on
    full = law_point(QuantRecipe.from_name("full", fmt="e2m1", block_size=32), law, 10**8)
    assert full.critical_data_size(law, 10**8) == pytest.approx(
        paper.critical_data_size(law, 10**8) / 2 ** (1 / (2 * law.b)), rel=1e-12
    )
    assert not full.calibrated
    assert critical_tokens(QuantRecipe.from_name("bf16"), law, 10**8)[0] == math.inf


def test_a_fitted_law_is_calibrated_only_on_the_block_sizes_it_was_fitted_on():
    from lightning_fpq.scaling.law import resolve_named_law

    shipped = resolve_named_law("demo-calibration")
    assert shipped.provenance.block_sizes == (4, 8, 32)  # the quantized rows of its fit
    point = lambda law, block: law_point(QuantRecipe.from_name("paper", fmt="e2m1", block_size=block), law, 10**5)  # noqa: E731
    assert point(shipped, 32).calibrated and point(shipped, 16).calibrated  # inside the fitted range
    for block in ("channel", "tensor", 128, 2):
        p = point(shipped, block)
        assert not p.calibrated and "fitted on blocks of 4, 8, 32 elements" in p.short_str(), block
    # the paper's law (block sizes not recorded): integer blocks and channel-wise scaling, as fitted there
    paper = CapybaraLaw.paper()
    assert paper.provenance.block_sizes is None
    assert point(paper, "channel").calibrated and point(paper, 128).calibrated
    assert not point(paper, "tensor").calibrated


def _numerical_crossing(law, n, cur, nxt):
    """Where ``-dL/dD / bits`` of the next stage overtakes the current one's, by central
    differences of the law's loss on a log grid of token counts (inf: never)."""

    def rate(point, d):
        h = 1e-5
        return -(point.loss(law, n, d * (1 + h)) - point.loss(law, n, d * (1 - h))) / (2 * h * d) / point.fmt.bits

    grid = np.logspace(6, 16, 4001)
    below = np.array([rate(cur, d) - rate(nxt, d) for d in grid]) < 0
    return grid[np.argmax(below)] if below.any() else math.inf


def test_auto_switch_matches_the_numerical_crossing_of_the_loss_rates():
    law = CapybaraLaw.paper()
    n = 10**8
    cases = [("e2m1", 32, "e4m3", 32), ("e2m3", 128, "e5m2", 128), ("e2m1", 2, "e3m2", "tensor")]
    points = {}
    for f1, b1, f2, b2 in cases:
        cur = law_point(QuantRecipe.from_name("paper", fmt=f1, block_size=b1), law, n)
        nxt = law_point(QuantRecipe.from_name("paper", fmt=f2, block_size=b2), law, n)
        closed = auto_switch_tokens(law, n, cur, nxt, cur.fmt.bits, nxt.fmt.bits)
        crossing = _numerical_crossing(law, n, cur, nxt)
        assert crossing == pytest.approx(closed, rel=0.01), (f1, f2)
        points[f1, b1] = (cur, nxt, closed)
    # e2m1 B=2 -> e3m2 tensor-wise: the next stage has the smaller D_crit, so the switch comes
    # after the current stage's D_crit (the README used to say "always before")
    cur, nxt, closed = points["e2m1", 2]
    assert nxt.critical_data_size(law, n) < cur.critical_data_size(law, n) < closed


def test_the_monitor_warns_before_training_when_the_budget_passes_dcrit(tmp_path):
    law = law_with_dcrit(5 * TOKENS_PER_STEP, N_TINY)
    monitor = CriticalDataMonitor(law=law, thresholds=(2.0,), plateau_window=0)
    with pytest.warns(UserWarning, match=r"planned for 320 tokens \(10 steps x 32\), 2.0x D_crit"):
        make_trainer(tmp_path, [monitor], max_steps=10).fit(TinyLM(), loader(10))


def test_callbacks_share_one_law(tmp_path):
    law = law_with_dcrit(40 * TOKENS_PER_STEP, N_TINY)
    monitor = CriticalDataMonitor(law=law, plateau_window=0)
    progressive = ProgressivePrecision(["e2m1", "e4m3"], [0.5], unit="dcrit")  # no law: the monitor's
    make_trainer(tmp_path, [monitor, progressive], max_steps=2).fit(TinyLM(), loader(2))
    assert progressive.thresholds == [pytest.approx(20 * TOKENS_PER_STEP)]
    other = law_with_dcrit(10 * TOKENS_PER_STEP, N_TINY)
    with pytest.warns(UserWarning, match="give one law to both"):
        make_trainer(
            tmp_path,
            [
                CriticalDataMonitor(law=law, plateau_window=0),
                ProgressivePrecision(["e2m1", "e4m3"], [0.5], unit="dcrit", law=other),
            ],
            max_steps=1,
        ).fit(TinyLM(), loader(1))


@pytest.mark.slow
def test_ddp_two_processes_switch_at_the_same_step_with_equal_token_counts(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "callback_scripts" / "ddp_progressive.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["tokens_seen"] == ranks[1]["tokens_seen"] == 12 * 2 * TOKENS_PER_STEP  # summed over ranks
    assert ranks[0]["history"] == ranks[1]["history"]
    assert [h["step"] for h in ranks[0]["history"]] == [5, 9]
    assert ranks[0]["final_recipe"] == ranks[1]["final_recipe"] and ranks[0]["final_recipe"].startswith("bf16")


def test_named_laws_and_bad_law_arguments():
    from lightning_fpq.lightning.critical import resolve_law

    assert resolve_law("paper") == CapybaraLaw.paper() == resolve_law(None)
    with pytest.raises(ValueError, match="law=3 is not valid: expected None, one of \\('paper', 'demo-calibration'\\)"):
        resolve_law(3)
    with pytest.raises(ValueError):
        resolve_law("/no/such/law.yaml")


def test_progress_bar_shows_the_format_and_the_dcrit_fraction(tmp_path):
    law = law_with_dcrit(20 * TOKENS_PER_STEP, N_TINY)
    monitor = CriticalDataMonitor(law=law, plateau_window=0)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=5,
        logger=False,
        enable_progress_bar=True,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[monitor],
        plugins=[FPQuantPrecision(recipe="paper", fmt="e2m1", block_size=16)],
    )
    model = TinyLM()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(5))
    items = trainer.progress_bar_callback.get_metrics(trainer, model)
    assert items["fmt"] == "e2m1*"  # the paper's constants here: uncalibrated
    assert items["D/Dcrit"] == f"{5 / 20:.1%}"
    # a second trainer's bar is not touched by this monitor's wrapping
    other = Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=True)
    assert "fmt" not in other.progress_bar_callback.get_metrics(other, model)


def test_scale_groups_are_counted_from_the_layers_and_the_batch():
    model = TinyLM(d_model=16, hidden=32)
    FPQuantPrecision(recipe="paper", fmt="e2m1", block_size=16).convert_module(model)  # hidden: 16 -> 32
    groups = scale_group_sizes(model, 24)
    # every converted layer, weighted by its weight count, by hand
    layers = {name: layer.gemm_weight().shape for name, layer in quantized_layers(model)}
    w = {name: o * i for name, (o, i) in layers.items()}

    def geo(values):  # weighted geometric mean, by hand
        return 2 ** (sum(w[n] * math.log2(v) for n, v in values.items()) / sum(w.values()))

    assert groups["weight"]["channel"] == pytest.approx(geo({n: i for n, (o, i) in layers.items()}))
    assert groups["grad_output"]["channel"] == pytest.approx(geo({n: o for n, (o, i) in layers.items()}))
    assert groups["input_for_grad_weight"]["channel"] == pytest.approx(24)  # wgrad reduces over the tokens
    assert groups["input"]["tensor"] == pytest.approx(geo({n: 24 * i for n, (o, i) in layers.items()}))
    assert scale_group_sizes(TinyLM(), 24) == {}  # nothing converted


def test_counted_scale_groups_replace_the_paper_constant_except_for_the_paper_law():
    groups = {role: {"channel": 64.0, "tensor": 4096.0} for role in ROLES}
    groups["input_for_grad_weight"] = {"channel": 1024.0, "tensor": 65536.0}
    recipe = QuantRecipe.from_name("paper", fmt="e2m1", block_size="channel")
    fitted = dataclasses.replace(CapybaraLaw.paper(), provenance=Provenance(source="fit"))

    def share(law, log2b):  # by hand: one operand's third of log2 B / ((E+.5)^dl (M+.5)^nu)
        return log2b / ((2.5) ** law.dl * (1.5) ** law.nu) / 3

    point = law_point(recipe, fitted, 10**6, groups)  # P2 and P4 channel = 64, P6 (wgrad) = 1024
    assert point.factor == pytest.approx(2 * share(fitted, 6.0) + share(fitted, 10.0), rel=1e-12)
    paper = law_point(recipe, CapybaraLaw.paper(), 10**6, groups)  # the paper law keeps its constant
    assert paper.factor == pytest.approx(3 * share(CapybaraLaw.paper(), 13.1567), rel=1e-12)


def test_dcrit_interval_is_the_bootstrap_percentiles():
    base = law_with_dcrit(1e5, N_TINY)
    samples = [{"g": base.g * f} for f in (0.5, 0.8, 1.0, 1.3, 2.0)]
    law = dataclasses.replace(base, provenance=Provenance(source="fit", extra={"bootstrap": {"samples": samples}}))
    recipe = QuantRecipe.from_name("paper", fmt="e2m1", block_size=16)
    by_hand = [dataclasses.replace(base, g=s["g"]).critical_data_size(N_TINY, "e2m1", 16) for s in samples]
    low, high = critical_interval(recipe, law, N_TINY)
    assert (low, high) == pytest.approx(tuple(np.percentile(by_hand, [5, 95])), rel=1e-12)
    assert critical_interval(recipe, base, N_TINY) is None  # no refits: no interval


def test_the_monitor_logs_the_dcrit_interval_and_the_predicted_penalty(tmp_path):
    base = law_with_dcrit(100 * TOKENS_PER_STEP, N_TINY)
    samples = [{"g": base.g * f} for f in (0.5, 1.0, 2.0)]
    law = dataclasses.replace(base, provenance=Provenance(source="fit", extra={"bootstrap": {"samples": samples}}))
    monitor = CriticalDataMonitor(law=law)
    trainer = make_trainer(tmp_path, [monitor], max_steps=3, logger=CSVLogger(tmp_path, name="m"), log_every_n_steps=1)
    trainer.fit(TinyLM(), loader(3))
    metrics = trainer.logged_metrics
    low, high = monitor.d_crit_interval
    assert low < monitor.d_crit < high
    assert float(metrics["fpq/d_crit_low"]) == pytest.approx(low) and float(
        metrics["fpq/d_crit_high"]
    ) == pytest.approx(high)
    by_hand = monitor.point.loss(law, N_TINY, 3 * TOKENS_PER_STEP) - law.recipe_loss(N_TINY, 3 * TOKENS_PER_STEP, 0.0)
    assert float(metrics["fpq/predicted_penalty"]) == pytest.approx(by_hand, rel=1e-5)
    assert "(90%: " in monitor.d_crit_text()
