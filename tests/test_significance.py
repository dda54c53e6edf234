"""The paired bootstrap of a metric drop: hand-built cases where the answer is known, and the quantize stage's
noise-aware tolerance test (a task fails only when its drop's interval lies above its tolerance)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compressor.export.quant_fallback import _Goal
from compressor.significance import DropInterval, paired_bootstrap_drop, relative_drop


def accuracy(predictions, examples):
    return sum(p == e for p, e in zip(predictions, examples)) / len(examples)


def error_rate(predictions, examples):
    return 1.0 - accuracy(predictions, examples)


def test_identical_predictions_have_a_zero_width_interval():
    gold = [0, 1] * 50
    iv = paired_bootstrap_drop(accuracy, gold, list(gold), list(gold), samples=200)
    assert (iv.drop, iv.low, iv.high) == (0.0, 0.0, 0.0) and not iv.exceeds(0.0)


def test_a_real_drop_is_told_from_noise():
    gold = [1] * 100
    candidate = [0] * 10 + [1] * 90  # wrong on 10 of 100 that the reference gets right
    iv = paired_bootstrap_drop(accuracy, gold, list(gold), candidate, samples=2000, seed=3)
    assert iv.drop == pytest.approx(0.10)
    # binomial: sd of the drop sqrt(0.1 * 0.9 / 100) = 0.03, so the 95% interval is about 0.10 +- 0.06
    assert 0.03 < iv.low < 0.07 and 0.13 < iv.high < 0.18  # (percentiles of a discrete drop: steps of 0.01)
    assert iv.exceeds(0.01) and not iv.exceeds(0.05)


def test_changes_that_cancel_straddle_zero():
    gold = [1] * 100
    reference = [0] * 5 + [1] * 95  # reference wrong on 0-4
    candidate = [1] * 5 + [0] * 5 + [1] * 90  # candidate right there, wrong on 5-9 instead
    iv = paired_bootstrap_drop(accuracy, gold, reference, candidate, samples=1000)
    assert iv.drop == pytest.approx(0.0)
    assert iv.low < 0 < iv.high and not iv.exceeds(0.0)


def test_lower_is_better_metrics_drop_when_they_rise():
    gold = [1] * 100
    candidate = [0] * 10 + [1] * 90
    ref_err, cand_err = error_rate(gold, gold), error_rate(candidate, gold)
    iv = paired_bootstrap_drop(error_rate, gold, list(gold), candidate, higher_is_better=False, samples=500)
    # the reference's error is 0: the drop is absolute, as relative_drop defines it
    assert iv.drop == pytest.approx(relative_drop(ref_err, cand_err, higher_is_better=False)) == pytest.approx(0.1)
    assert iv.low > 0


def test_misaligned_predictions_are_refused():
    with pytest.raises(ValueError, match="one prediction per example"):
        paired_bootstrap_drop(accuracy, [1, 1, 1], [1, 1, 1], [1, 1])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap_drop(accuracy, [1], [1], [1], confidence=1.0)


def test_goal_fails_a_task_only_when_its_interval_lies_above_its_tolerance():
    metrics = {"a": 0.78, "b": 0.70}  # point drops vs 0.80 / 0.80: 2.5% and 12.5%
    intervals = {"a": DropInterval(0.025, -0.01, 0.06, 0.95, 100), "b": DropInterval(0.125, 0.05, 0.2, 0.95, 100)}
    point = _Goal(lambda p: metrics, {"a": 0.8, "b": 0.8}, {"a": 0.01, "b": 0.01}, {"a": True, "b": True})
    noisy = _Goal(lambda p: metrics, {"a": 0.8, "b": 0.8}, {"a": 0.01, "b": 0.01}, {"a": True, "b": True},
                  noise=lambda p: intervals)
    assert point.attempt(0, Path("x"), [], {}).failing == ["a", "b"]
    attempt = noisy.attempt(0, Path("x"), [], {})
    assert attempt.failing == ["b"]
    assert attempt.drop_intervals["a"] == {"drop": 0.025, "low": -0.01, "high": 0.06, "confidence": 0.95,
                                           "samples": 100}


def test_quantize_stage_with_the_bootstrap_tolerance_test(tmp_path):
    """A model with LayerNorm activation outliers (INT8 changes some answers) at tolerance 0: every attempt
    records each task's interval, and a task fails exactly when its interval lies above 0."""
    from _export_helpers import make_run

    r = make_run([{"kind": "export", "evaluate": False},
                  {"kind": "quantize", "tolerance": 0.0, "tolerance_test": "bootstrap", "bootstrap_samples": 200,
                   "max_iterations": 1}], tmp_path, tasks=("qa", "sst"), ln_outlier=10.0)
    r.run_stage(0)
    result = r.run_stage(1)
    summary = json.loads((tmp_path / "01-quantize" / "quantization.json").read_text())
    assert summary["tolerance_test"] == "bootstrap" and summary["bootstrap_samples"] == 200
    for attempt in summary["attempts"]:
        assert set(attempt["drop_intervals"]) == {"qa", "sst"}
        for task, iv in attempt["drop_intervals"].items():
            assert iv["low"] <= iv["high"] and iv["samples"] == 200
            assert (task in attempt["failing"]) == (iv["low"] > 0.0 + 1e-12)
    assert any("paired-bootstrap intervals" in n for n in result.notes)
