"""An analysis run over real prediction-log files (written by the gateway's own Parquet writer)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from core.prediction_log import read_window
from monitoring.rollout.analysis import analyse
from monitoring.rollout.spec import fast_spec
from tests.support import write_canary_log as write_rows

# These tests were written for a threshold of 0.5; the live one comes from Settings (MLOPS_DECISION_THRESHOLD).
THRESHOLD = 0.5


def write_canary_log(log_dir: Path, n: int, challenger_error_rate: float, seed: int = 0) -> float:
    """n requests, 50/50 champion/challenger, same score distribution, labelled at once; returns the window
    start."""
    start = time.time() - 1
    write_rows(log_dir, start + np.arange(n) * 1e-4, challenger_error_rate, seed, labels_at=start + 1)
    return start


def test_an_identical_challenger_is_not_failed(tmp_path: Path) -> None:
    since = write_canary_log(tmp_path, 2_000, challenger_error_rate=0.0)
    result = analyse(fast_spec(), "canary", 1, tmp_path, since, at=time.time() + 1, threshold=THRESHOLD)
    assert result.samples == 1_000
    assert "fail" not in result.verdicts.values()
    assert result.verdicts["error-rate"] == "pass"
    assert result.values["error-rate"]["samples"] > 0


def test_a_challenger_that_errors_fails_the_error_rate_guardrail(tmp_path: Path) -> None:
    since = write_canary_log(tmp_path, 2_000, challenger_error_rate=0.2)
    result = analyse(fast_spec(), "canary", 1, tmp_path, since, at=time.time() + 1, threshold=THRESHOLD)
    assert result.verdicts["error-rate"] == "fail"
    assert result.values["error-rate"]["value"] > 0.1


def test_rows_outside_the_window_are_not_analysed(tmp_path: Path) -> None:
    since = write_canary_log(tmp_path, 500, challenger_error_rate=0.0)
    assert len(read_window(tmp_path / "predictions", since)) == 500
    assert read_window(tmp_path / "predictions", time.time() + 60).empty
    empty = analyse(fast_spec(), "canary", 1, tmp_path, time.time() + 60, at=time.time() + 61, threshold=THRESHOLD)
    assert empty.samples == 0 and empty.verdicts == {}


def test_rows_another_version_answered_are_not_judged_as_the_challengers(tmp_path: Path) -> None:
    # The challenger's slot never loaded version 3 and kept serving version 2: its rows are not version 3's.
    since = write_canary_log(tmp_path, 2_000, challenger_error_rate=0.0)
    unfiltered = analyse(fast_spec(), "canary", 1, tmp_path, since, at=time.time() + 1, threshold=THRESHOLD)
    assert unfiltered.samples == 1_000
    judged = analyse(
        fast_spec(),
        "canary",
        1,
        tmp_path,
        since,
        at=time.time() + 1,
        threshold=THRESHOLD,
        versions={"champion": "1", "challenger": "3"},
    )
    assert judged.samples == 0
    assert "pass" not in judged.verdicts.values() and "fail" not in judged.verdicts.values()
    own = analyse(
        fast_spec(),
        "canary",
        1,
        tmp_path,
        since,
        at=time.time() + 1,
        threshold=THRESHOLD,
        versions={"champion": "1", "challenger": "2"},
    )
    assert own.samples == 1_000 and own.verdicts == unfiltered.verdicts


def test_shadow_answers_of_another_version_are_left_out_and_fallbacks_stay() -> None:
    import pandas as pd

    from monitoring.rollout.analysis import rows_of_versions

    frame = pd.DataFrame(
        {
            "variant": ["champion", "champion", "challenger", "champion", "champion"],
            "model_version": ["1", "7", "3", None, "1"],
            "status": ["ok", "ok", "ok", "fallback", "ok"],
            "shadow_status": ["ok", "ok", None, None, "ok"],
            "shadow_model_version": ["3", "3", None, None, "2"],
        }
    )
    kept = rows_of_versions(frame, {"champion": "1", "challenger": "3"})
    assert kept["model_version"].tolist() == ["1", "3", None, "1"]  # version 7 answered as champion: dropped
    assert kept["shadow_status"].tolist() == ["ok", None, None, "other_version"]
    watch = rows_of_versions(frame, {"champion": "3"})  # after promotion the challenger answers as champion
    assert watch["model_version"].tolist() == [None]


def test_the_prediction_log_contract_names_every_column_its_readers_use() -> None:
    from core import prediction_log as contract

    names = set(contract.PREDICTION_SCHEMA.names)
    for column in (contract.REQUEST_ID, contract.TS, contract.VARIANT, contract.MODEL_VERSION, contract.SCORE):
        assert column in names
    assert {contract.SHADOW_SCORE, contract.SHADOW_STATUS} <= names
    assert all(name.startswith(contract.SHADOW_PREFIX) for name in names if "shadow" in name)
    assert contract.FEEDBACK_SCHEMA.names == [contract.REQUEST_ID, contract.LABEL, contract.RECEIVED_AT]


def test_requests_qa_forced_to_a_variant_are_never_evidence() -> None:
    import pandas as pd

    from core.prediction_log import without_forced

    rows = pd.DataFrame({"request_id": ["a", "b", "c"], "forced": [False, True, None]})
    assert list(without_forced(rows)["request_id"]) == ["a", "c"]  # None: a file written before the column
    older = pd.DataFrame({"request_id": ["a"]})
    assert list(without_forced(older)["request_id"]) == ["a"]
