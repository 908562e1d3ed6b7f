"""Offline metrics and the gate, on inputs whose right answers are known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from components.evaluate import (
    GateTolerances,
    compute_metrics,
    expected_calibration_error,
    offline_gate,
    recall_at_precision,
    slice_gaps,
    slice_metrics,
)


def test_perfect_ranking_scores_one_and_random_scores_the_base_rate() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random(20_000) < 0.02).astype(int)
    perfect = compute_metrics(labels, labels * 0.9 + 0.05)
    assert perfect["pr_auc"] == 1.0 and perfect["roc_auc"] == 1.0 and perfect["recall_at_precision"] == 1.0
    random = compute_metrics(labels, rng.random(20_000))
    assert abs(random["pr_auc"] - labels.mean()) < 0.01
    assert abs(random["roc_auc"] - 0.5) < 0.03


def test_recall_at_precision_finds_the_best_admissible_threshold() -> None:
    labels = np.array([1, 1, 0, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    assert recall_at_precision(labels, scores, 1.0) == 2 / 3  # top two are both fraud
    assert recall_at_precision(labels, scores, 0.75) == 1.0  # top four: 3 of 4 fraud


def test_calibration_error_is_zero_for_calibrated_scores_and_large_for_overconfident_ones() -> None:
    rng = np.random.default_rng(1)
    scores = rng.uniform(0, 0.2, 200_000)
    labels = (rng.random(200_000) < scores).astype(int)
    assert expected_calibration_error(labels, scores) < 0.005
    assert expected_calibration_error(labels, np.minimum(scores * 4, 1)) > 0.1


def test_slices_report_gaps_and_skip_slices_without_enough_fraud() -> None:
    frame = pd.DataFrame(
        {
            "country": ["US"] * 1000 + ["GB"] * 1000 + ["NG"] * 10,
            "merchant_category": ["grocery"] * 2010,
            "is_fraud": [1, 0] * 1005,
        }
    )
    scores = np.where(frame["country"] == "US", frame["is_fraud"] * 0.8 + 0.1, 0.5)
    slices = slice_metrics(frame, scores, columns=("country",), min_positives=10)
    assert set(slices["country"]) == {"US", "GB"}  # NG has only 5 frauds
    assert slices["country"]["US"]["pr_auc"] == 1.0
    assert math.isclose(slice_gaps(slices)["slice_gap_pr_auc_country"], 0.5)


def test_gate_passes_a_good_first_model_and_names_what_fails() -> None:
    tolerances = GateTolerances(min_pr_auc=0.3, max_pr_auc_drop=0.02, max_ece=0.05)
    good = {"pr_auc": 0.6, "ece": 0.01}
    assert offline_gate(good, None, tolerances).passed
    worse = offline_gate({"pr_auc": 0.5, "ece": 0.01}, {"pr_auc": 0.6, "ece": 0.01}, tolerances)
    assert not worse.passed and "vs champion" in worse.reasons()
    uncalibrated = offline_gate({"pr_auc": 0.6, "ece": 0.2}, None, tolerances)
    assert not uncalibrated.passed and "calibration" in uncalibrated.reasons()


def test_gate_treats_missing_evidence_as_failure() -> None:
    decision = offline_gate({"pr_auc": float("nan"), "ece": 0.01}, None, GateTolerances())
    assert not decision.passed
