"""The validation gate, run with the real Great Expectations: clean data passes, every corruption is caught."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from components.validate import FailedExpectation, ValidationSummary, build_suite, validate_transactions
from core.schema import COLUMNS, LABEL_RATE_BOUNDS
from core.synthetic import CORRUPT_KINDS, NEW_CATEGORY, generate_transactions

ROWS = 2_000

# For each corruption kind: (expectation, column) pairs that must be among the failures.
EXPECTED_FAILURES: dict[str, set[tuple[str, str | None]]] = {
    "missing-column": {("expect_table_columns_to_match_set", None), ("expect_column_values_to_be_between", "amount")},
    "wrong-type": {("expect_column_values_to_be_in_type_list", "amount")},
    "out-of-range": {("expect_column_values_to_be_between", "amount"), ("expect_column_values_to_be_between", "hour")},
    "null-burst": {
        ("expect_column_values_to_not_be_null", "amount"),
        ("expect_column_values_to_not_be_null", "country"),
        ("expect_column_values_to_not_be_null", "txn_count_1h"),
    },
    "label-rate": {("expect_column_mean_to_be_between", "is_fraud")},
    "empty": {("expect_table_row_count_to_be_between", None)},
}


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], ValidationSummary]:
    """Validate each corruption kind once per module; several tests look at the same result."""
    cache: dict[str, ValidationSummary] = {}

    def validate(kind: str) -> ValidationSummary:
        if kind not in cache:
            frame = generate_transactions(ROWS, seed=13, corrupt=kind)
            cache[kind] = validate_transactions(frame, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return validate


def _failed(summary: ValidationSummary) -> set[tuple[str, str | None]]:
    return {(f.expectation, f.column) for f in summary.failed}


def _failure(summary: ValidationSummary, expectation: str, column: str | None) -> FailedExpectation:
    return next(f for f in summary.failed if f.expectation == expectation and f.column == column)


def test_every_corruption_kind_has_an_expected_failure() -> None:
    assert set(EXPECTED_FAILURES) == set(CORRUPT_KINDS)


def test_suite_covers_every_schema_column_and_table_rule() -> None:
    suite = build_suite(min_rows=10)
    columns = {e.column for e in suite.expectations if hasattr(e, "column")}
    types = {type(e).__name__ for e in suite.expectations}
    assert columns == {c.name for c in COLUMNS}
    assert {"ExpectTableColumnsToMatchSet", "ExpectTableRowCountToBeBetween", "ExpectColumnValuesToBeUnique"} <= types


def test_clean_data_passes_and_writes_data_docs(tmp_path: Path) -> None:
    summary = validate_transactions(generate_transactions(ROWS, seed=11), tmp_path / "docs")
    assert summary.success, summary.describe_failures()
    assert summary.failed == []
    assert summary.rows == ROWS
    assert summary.evaluated == len(build_suite().expectations)
    assert summary.docs_index == str((tmp_path / "docs" / "index.html").resolve())
    assert Path(summary.docs_index).is_file()
    assert list((tmp_path / "docs" / "validations").rglob("*.html")), "the validation result page is rendered"


@pytest.mark.parametrize("drift", ["covariate", "concept"])
def test_drifted_but_valid_data_passes(tmp_path: Path, drift: str) -> None:
    summary = validate_transactions(generate_transactions(ROWS, seed=12, drift=drift), tmp_path)
    assert summary.success, summary.describe_failures()


@pytest.mark.parametrize("kind", CORRUPT_KINDS)
def test_corruption_fails_naming_the_broken_expectation(
    corrupted: Callable[[str], ValidationSummary], kind: str
) -> None:
    summary = corrupted(kind)
    assert not summary.success
    assert EXPECTED_FAILURES[kind] <= _failed(summary), summary.describe_failures()
    assert all(f.observed and f.expected for f in summary.failed)
    assert summary.docs_index is not None and Path(summary.docs_index).is_file()


def test_missing_column_is_reported_as_missing(corrupted: Callable[[str], ValidationSummary]) -> None:
    summary = corrupted("missing-column")
    assert "amount" in _failure(summary, "expect_table_columns_to_match_set", None).observed
    assert _failure(summary, "expect_column_values_to_be_between", "amount").observed == "column missing"


def test_wrong_type_reports_the_offending_values_and_survives_the_between_check(
    corrupted: Callable[[str], ValidationSummary],
) -> None:
    summary = corrupted("wrong-type")
    assert "EUR" in _failure(summary, "expect_column_values_to_be_in_type_list", "amount").observed
    # GX raises inside the numeric range check on strings; the gate reports it instead of crashing.
    assert "could not be evaluated" in _failure(summary, "expect_column_values_to_be_between", "amount").observed


def test_out_of_range_reports_share_and_examples(corrupted: Callable[[str], ValidationSummary]) -> None:
    summary = corrupted("out-of-range")
    observed = _failure(summary, "expect_column_values_to_be_between", "hour").observed
    assert f"of {ROWS} values outside [0, 23]" in observed
    assert "27" in observed


def test_label_rate_reports_the_observed_mean(corrupted: Callable[[str], ValidationSummary]) -> None:
    frame = generate_transactions(ROWS, seed=13, corrupt="label-rate")
    failure = _failure(corrupted("label-rate"), "expect_column_mean_to_be_between", "is_fraud")
    assert failure.observed == f"mean {frame['is_fraud'].mean():.4g}"
    assert str(LABEL_RATE_BOUNDS[1]) in failure.expected


def test_empty_frame_reports_zero_rows(corrupted: Callable[[str], ValidationSummary]) -> None:
    summary = corrupted("empty")
    assert summary.rows == 0
    assert _failure(summary, "expect_table_row_count_to_be_between", None).observed == "0 rows"


def test_frame_without_any_column_fails_without_crashing(tmp_path: Path) -> None:
    summary = validate_transactions(pd.DataFrame(), tmp_path)
    assert not summary.success
    assert summary.evaluated == len(summary.failed)
    assert {f.observed for f in summary.failed if f.column} == {"column missing"}


def test_new_merchant_category_fails_the_category_set(tmp_path: Path) -> None:
    summary = validate_transactions(generate_transactions(ROWS, seed=19, drift="new-category"), tmp_path)
    assert _failed(summary) == {("expect_column_values_to_be_in_set", "merchant_category")}
    assert NEW_CATEGORY in summary.failed[0].observed


def test_duplicate_transaction_ids_fail_uniqueness(tmp_path: Path) -> None:
    frame = generate_transactions(ROWS, seed=20)
    frame.loc[1, "transaction_id"] = frame.loc[0, "transaction_id"]
    summary = validate_transactions(frame, tmp_path)
    assert _failed(summary) == {("expect_column_values_to_be_unique", "transaction_id")}


def test_row_count_threshold_follows_min_rows(tmp_path: Path) -> None:
    frame = generate_transactions(500, seed=21)
    assert validate_transactions(frame, tmp_path / "strict", min_rows=1000).failed[0].observed == "500 rows"
    assert validate_transactions(frame, tmp_path / "lenient", min_rows=100).success


def test_describe_failures_names_column_expectation_expected_and_observed(
    corrupted: Callable[[str], ValidationSummary],
) -> None:
    summary = corrupted("out-of-range")
    text = summary.describe_failures()
    for failure in summary.failed:
        line = next(line for line in text.splitlines() if failure.expectation in line and failure.column in line)
        assert failure.expected in line and failure.observed in line
    assert "values outside [0.01, 50000]" in text


def test_summary_to_dict_is_json_serialisable(corrupted: Callable[[str], ValidationSummary]) -> None:
    summary = corrupted("null-burst")
    payload = json.loads(json.dumps(summary.to_dict()))
    assert payload["success"] is False
    assert payload["rows"] == ROWS
    assert {"expectation", "column", "observed", "expected"} == set(payload["failed"][0])
