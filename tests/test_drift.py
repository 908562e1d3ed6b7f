"""The drift check against real Evidently runs on synthetic transactions (no mocks).

3,000 rows per side: above Evidently's 1,000-row switch, so it uses distances (Wasserstein, Jensen-Shannon)
like it will on production-sized windows, and still runs in about a second.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core.drift import DriftSummary, drift_report
from core.schema import FEATURES
from core.synthetic import NEW_CATEGORY, generate_transactions

ROWS = 3_000


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return generate_transactions(ROWS, seed=1)


@pytest.fixture(scope="module")
def same_distribution() -> pd.DataFrame:
    return generate_transactions(ROWS, seed=2)


@pytest.fixture(scope="module")
def same_summary(reference: pd.DataFrame, same_distribution: pd.DataFrame) -> DriftSummary:
    return drift_report(reference, same_distribution, None)


def _with_score(frame: pd.DataFrame, seed: int, shift: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return frame.assign(score=np.clip(rng.beta(1.0, 30.0, len(frame)) + shift, 0.0, 1.0))


def test_same_distribution_from_two_seeds_has_low_drift_share_and_no_dataset_drift(same_summary: DriftSummary) -> None:
    assert same_summary.drift_share <= 0.3
    assert not same_summary.dataset_drift
    assert same_summary.reference_rows == ROWS
    assert same_summary.current_rows == ROWS


def test_every_feature_gets_a_score_and_method_and_drift_share_matches_drifted_columns(
    same_summary: DriftSummary,
) -> None:
    assert set(same_summary.column_scores) == set(FEATURES)
    assert set(same_summary.column_methods) == set(FEATURES)
    assert same_summary.column_methods["amount"] == "Wasserstein distance (normed)"
    assert same_summary.column_methods["merchant_category"] == "Jensen-Shannon distance"
    assert set(same_summary.drifted_columns) <= set(FEATURES)
    assert same_summary.drift_share == pytest.approx(len(same_summary.drifted_columns) / len(FEATURES))


def test_covariate_drift_flags_amount_and_other_shifted_features_as_dataset_drift(reference: pd.DataFrame) -> None:
    current = generate_transactions(ROWS, seed=2, drift="covariate")
    summary = drift_report(reference, current, None, drift_share_threshold=0.5)
    assert {"amount", "hour", "account_age_days", "txn_count_1h"} <= set(summary.drifted_columns)
    assert summary.drift_share >= 0.6
    assert summary.dataset_drift


def test_dataset_drift_follows_the_share_threshold(reference: pd.DataFrame) -> None:
    current = generate_transactions(ROWS, seed=2, drift="covariate")
    summary = drift_report(reference, current, None, drift_share_threshold=1.0)
    assert summary.drift_share < 1.0
    assert not summary.dataset_drift


def test_new_category_makes_merchant_category_drift(reference: pd.DataFrame) -> None:
    current = generate_transactions(ROWS, seed=2, drift="new-category")
    assert NEW_CATEGORY in set(current["merchant_category"])
    summary = drift_report(reference, current, None)
    assert "merchant_category" in summary.drifted_columns


def test_html_report_is_written_under_missing_parent_dirs(
    reference: pd.DataFrame, same_distribution: pd.DataFrame, tmp_path
) -> None:
    path = tmp_path / "reports" / "nested" / "drift.html"
    summary = drift_report(reference, same_distribution, path)
    assert summary.report_html == str(path)
    html = path.read_text(encoding="utf-8")
    assert "<html" in html.lower()
    assert len(html) > 10_000


def test_no_html_path_means_no_report_file(same_summary: DriftSummary) -> None:
    assert same_summary.report_html is None


@pytest.mark.parametrize("side", ["reference", "current"])
def test_missing_requested_column_raises_value_error_naming_column_and_frame(
    reference: pd.DataFrame, same_distribution: pd.DataFrame, side: str
) -> None:
    frames = {"reference": reference, "current": same_distribution}
    frames[side] = frames[side].drop(columns=["amount"])
    with pytest.raises(ValueError, match=rf"missing from the {side} frame: amount"):
        drift_report(frames["reference"], frames["current"], None)


def test_missing_extra_numeric_column_raises_value_error_naming_it(
    reference: pd.DataFrame, same_distribution: pd.DataFrame
) -> None:
    with pytest.raises(ValueError, match=r"missing from the reference frame: score"):
        drift_report(reference, _with_score(same_distribution, seed=0), None, extra_numeric=["score"])


@pytest.mark.parametrize("side", ["reference", "current"])
def test_empty_frame_raises_value_error_naming_the_empty_side(
    reference: pd.DataFrame, same_distribution: pd.DataFrame, side: str
) -> None:
    frames = {"reference": reference, "current": same_distribution}
    frames[side] = frames[side].iloc[0:0]
    with pytest.raises(ValueError, match=rf"{side} frame is empty"):
        drift_report(frames["reference"], frames["current"], None)


def test_non_numeric_values_in_a_numeric_column_raise_value_error(
    reference: pd.DataFrame, same_distribution: pd.DataFrame
) -> None:
    current = same_distribution.assign(amount=same_distribution["amount"].map(lambda v: f"{v:.2f} EUR"))
    with pytest.raises(ValueError, match=r"non-numeric dtype in the current frame: amount"):
        drift_report(reference, current, None)


def test_extra_numeric_score_column_is_checked_and_its_shift_detected(
    reference: pd.DataFrame, same_distribution: pd.DataFrame
) -> None:
    summary = drift_report(
        _with_score(reference, seed=0), _with_score(same_distribution, seed=1, shift=0.2), None, extra_numeric=["score"]
    )
    assert "score" in summary.column_scores
    assert summary.column_methods["score"] == "Wasserstein distance (normed)"
    assert "score" in summary.drifted_columns


def test_same_score_distribution_does_not_drift(reference: pd.DataFrame, same_distribution: pd.DataFrame) -> None:
    summary = drift_report(
        _with_score(reference, seed=0), _with_score(same_distribution, seed=1), None, extra_numeric=["score"]
    )
    assert "score" in summary.column_scores
    assert "score" not in summary.drifted_columns


def test_only_requested_columns_are_checked(reference: pd.DataFrame, same_distribution: pd.DataFrame) -> None:
    summary = drift_report(
        reference, same_distribution, None, numeric_columns=["amount", "hour"], categorical_columns=["device"]
    )
    assert set(summary.column_scores) == {"amount", "hour", "device"}


def test_rows_are_sampled_down_to_max_rows_deterministically(
    reference: pd.DataFrame, same_distribution: pd.DataFrame
) -> None:
    first = drift_report(reference, same_distribution, None, max_rows=800, seed=7)
    second = drift_report(reference, same_distribution, None, max_rows=800, seed=7)
    assert (first.reference_rows, first.current_rows) == (800, 800)
    assert first == second
    # At <= 1,000 reference rows Evidently switches from distances to p-value tests.
    assert first.column_methods["amount"] == "K-S p_value"


def test_to_dict_is_json_serialisable(same_summary: DriftSummary) -> None:
    payload = json.loads(json.dumps(same_summary.to_dict()))
    assert payload["drift_share"] == same_summary.drift_share
    assert payload["dataset_drift"] is False
    assert payload["column_scores"] == same_summary.column_scores
    assert payload["drifted_columns"] == same_summary.drifted_columns
