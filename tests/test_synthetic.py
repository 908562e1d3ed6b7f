"""The synthetic transaction generator: reproducible, realistic base rate, drift and corruption kinds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.schema import CATEGORICAL_FEATURES, COLUMNS, COLUMNS_BY_NAME, NUMERIC_FEATURES
from core.synthetic import CORRUPT_KINDS, NEW_CATEGORY, generate_transactions


def test_same_seed_gives_identical_data_and_other_seeds_differ() -> None:
    first, again, other = (generate_transactions(3000, seed=s) for s in (7, 7, 8))
    pd.testing.assert_frame_equal(first, again)
    assert not first["amount"].equals(other["amount"])
    assert set(first["transaction_id"]).isdisjoint(other["transaction_id"])


def test_clean_data_follows_the_schema_with_a_realistic_fraud_rate() -> None:
    frame = generate_transactions(20_000, seed=1)
    assert list(frame.columns) == [c.name for c in COLUMNS]
    assert 0.01 <= frame["is_fraud"].mean() <= 0.03
    for name in NUMERIC_FEATURES:
        column = COLUMNS_BY_NAME[name]
        assert frame[name].between(column.min_value, column.max_value).all(), name
    for name in CATEGORICAL_FEATURES:
        assert set(frame[name]) <= set(COLUMNS_BY_NAME[name].categories), name
    assert frame["transaction_id"].is_unique
    assert frame["event_time"].is_monotonic_increasing


def test_fraud_depends_on_the_features_so_a_model_can_learn_it() -> None:
    frame = generate_transactions(20_000, seed=2)
    night = frame["hour"] < 6
    foreign = frame["distance_from_home_km"] > 300
    assert frame.loc[night, "is_fraud"].mean() > 2 * frame.loc[~night, "is_fraud"].mean()
    assert frame.loc[foreign, "is_fraud"].mean() > 2 * frame.loc[~foreign, "is_fraud"].mean()


def test_covariate_drift_shifts_amounts_and_hours() -> None:
    base, drifted = generate_transactions(10_000, seed=3), generate_transactions(10_000, seed=3, drift="covariate")
    assert drifted["amount"].median() > 1.8 * base["amount"].median()
    assert (drifted["hour"] < 6).mean() > 3 * (base["hour"] < 6).mean()


def test_new_category_drift_introduces_an_unknown_merchant_category() -> None:
    frame = generate_transactions(5000, seed=4, drift="new-category")
    assert 0.15 < (frame["merchant_category"] == NEW_CATEGORY).mean() < 0.25


def test_concept_drift_keeps_inputs_but_changes_who_is_fraud() -> None:
    base, drifted = generate_transactions(20_000, seed=5), generate_transactions(20_000, seed=5, drift="concept")
    pd.testing.assert_series_equal(base["amount"], drifted["amount"])
    small = base["amount"] < 15
    assert drifted.loc[small, "is_fraud"].mean() > 2 * base.loc[small, "is_fraud"].mean()


@pytest.mark.parametrize("kind", CORRUPT_KINDS)
def test_each_corruption_breaks_the_contract(kind: str) -> None:
    frame = generate_transactions(2000, seed=6, corrupt=kind)  # type: ignore[arg-type]
    if kind == "missing-column":
        assert "amount" not in frame
    elif kind == "wrong-type":
        assert frame["amount"].map(type).eq(str).all()
    elif kind == "out-of-range":
        assert (frame["amount"] < 0).any() and (frame["hour"] > 23).any()
    elif kind == "null-burst":
        assert frame["amount"].isna().mean() > 0.15
    elif kind == "label-rate":
        assert frame["is_fraud"].mean() > 0.2
    elif kind == "empty":
        assert len(frame) == 0 and list(frame.columns) == [c.name for c in COLUMNS]


def test_unknown_kinds_are_rejected_with_the_valid_choices() -> None:
    with pytest.raises(ValueError, match="covariate"):
        generate_transactions(10, drift="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="null-burst"):
        generate_transactions(10, corrupt="gremlins")  # type: ignore[arg-type]


def test_zero_rows_is_an_empty_frame_not_an_error() -> None:
    frame = generate_transactions(0)
    assert len(frame) == 0
    assert np.isnan(frame["amount"].mean())


def test_rows_per_account_sets_how_many_accounts_make_the_transactions() -> None:
    default = generate_transactions(10_000, seed=0)
    assert default["account_id"].nunique() <= 10_000 // 25
    many = generate_transactions(10_000, seed=0, rows_per_account=2)
    assert many["account_id"].nunique() > 4 * default["account_id"].nunique()
    with pytest.raises(ValueError, match="rows_per_account must be >= 1"):
        generate_transactions(10, rows_per_account=0.5)
