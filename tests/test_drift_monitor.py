"""The drift monitor's decisions (pure) and the retraining data it builds, checked by the real validation gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from components.validate import validate_transactions
from core.schema import CATEGORICAL_FEATURES, NUMERIC_FEATURES
from core.synthetic import generate_transactions
from monitoring.drift.monitor import DriftCheck, RetrainState, retrain_decision, retraining_frame


def drifted(share: float = 0.8, drifted_flag: bool = True) -> DriftCheck:
    return DriftCheck(
        at=1000.0, status="checked", rows=3000, drift_share=share, drifted=drifted_flag, drifted_columns=["amount"]
    )


def test_drift_over_the_threshold_starts_a_retraining_run_and_says_why() -> None:
    reason = retrain_decision(drifted(), RetrainState(), now=1000.0, cooldown_s=600, enabled=True)
    assert reason is not None and "drift share 0.80" in reason and "amount" in reason


def test_retraining_is_debounced_one_in_flight_and_a_cooldown_after_the_last() -> None:
    assert retrain_decision(drifted(), RetrainState(in_flight={"pid": 1}), 1000.0, 600, True) is None
    assert retrain_decision(drifted(), RetrainState(last_started_at=700.0), 1000.0, 600, True) is None
    assert retrain_decision(drifted(), RetrainState(last_started_at=300.0), 1000.0, 600, True) is not None


def test_no_drift_a_skipped_window_or_retraining_turned_off_starts_nothing() -> None:
    assert retrain_decision(drifted(0.1, False), RetrainState(), 1000.0, 600, True) is None
    skipped = DriftCheck(at=1000.0, status="too_few_rows", rows=12)
    assert retrain_decision(skipped, RetrainState(), 1000.0, 600, True) is None
    assert retrain_decision(drifted(), RetrainState(), 1000.0, 600, enabled=False) is None


def prediction_log(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows as the gateway logs them: every numeric feature as float, the request id the gateway made."""
    log = frame[["account_id", *NUMERIC_FEATURES, *CATEGORICAL_FEATURES]].copy()
    log[list(NUMERIC_FEATURES)] = log[list(NUMERIC_FEATURES)].astype(float)
    return log.assign(
        request_id=[f"r{i}" for i in range(len(log))],
        ts=1.79e9 + np.arange(len(log)),
        variant="champion",
        status="ok",
        score=0.01,
    )


def test_the_retraining_data_is_recent_labelled_traffic_plus_the_reference_and_passes_validation(
    tmp_path: Path,
) -> None:
    traffic = generate_transactions(3_000, seed=4, drift="covariate")
    log = prediction_log(traffic)
    labelled = log.iloc[:2_000]  # the last 1,000 requests have no label yet: they are left out
    feedback = pd.DataFrame({"request_id": labelled["request_id"], "label": traffic["is_fraud"].iloc[:2_000]})
    reference = generate_transactions(1_500, seed=1)
    frame = retraining_frame(log, feedback, reference)
    assert len(frame) == 2_000 + 1_500
    assert frame["is_fraud"].iloc[:2_000].tolist() == traffic["is_fraud"].iloc[:2_000].tolist()
    assert frame["transaction_id"].is_unique
    summary = validate_transactions(frame, tmp_path / "docs")
    assert summary.success, summary.failed
