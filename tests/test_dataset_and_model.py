"""Reading data files with clear errors, the leakage-free split, and the model artifact round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components.dataset import DataFileError, read_transactions, split_by_account, write_transactions
from core.model import FraudScorer, NetworkConfig, Preprocessor, build_network
from core.schema import FEATURES
from core.synthetic import generate_transactions


def test_missing_file_directory_and_non_parquet_each_get_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="not found"):
        read_transactions(tmp_path / "nope.parquet")
    with pytest.raises(DataFileError, match="directory"):
        read_transactions(tmp_path)
    text = tmp_path / "data.csv"
    text.write_text("amount,hour\n1,2\n")
    with pytest.raises(DataFileError, match="not a readable Parquet file"):
        read_transactions(text)


def test_split_keeps_every_account_on_one_side_and_is_deterministic() -> None:
    frame = generate_transactions(5000, seed=1)
    train, test = split_by_account(frame, 0.2)
    assert set(train["account_id"]).isdisjoint(test["account_id"])
    assert len(train) + len(test) == len(frame)
    assert 0.1 < len(test) / len(frame) < 0.3
    again_train, _ = split_by_account(frame, 0.2)
    assert again_train["transaction_id"].tolist() == train["transaction_id"].tolist()


def test_split_rejects_a_fraction_outside_zero_one() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        split_by_account(generate_transactions(100), 1.5)


def test_records_fast_path_scores_exactly_like_the_frame_path(tmp_path: Path) -> None:
    frame = generate_transactions(500, seed=2)
    preprocessor = Preprocessor.fit(frame)
    scorer = FraudScorer(preprocessor, build_network(preprocessor, NetworkConfig()), NetworkConfig())
    records = frame[list(FEATURES)].to_dict(orient="records")
    np.testing.assert_allclose(scorer.score_frame(frame), scorer.score_records(records), rtol=1e-5)


def test_untrained_network_starts_at_the_base_rate() -> None:
    frame = generate_transactions(2000, seed=3)
    preprocessor = Preprocessor.fit(frame)
    scorer = FraudScorer(preprocessor, build_network(preprocessor, NetworkConfig()), NetworkConfig())
    assert abs(scorer.score_frame(frame).mean() - frame["is_fraud"].mean()) < 0.05


def test_unseen_category_scores_instead_of_crashing() -> None:
    frame = generate_transactions(300, seed=4)
    preprocessor = Preprocessor.fit(frame)
    scorer = FraudScorer(preprocessor, build_network(preprocessor, NetworkConfig()), NetworkConfig())
    row = {**frame[list(FEATURES)].iloc[0].to_dict(), "merchant_category": "crypto_exchange"}
    score = scorer.score_records([row])
    assert 0.0 < score[0] < 1.0


def test_saved_model_loads_and_scores_identically(tmp_path: Path) -> None:
    frame = generate_transactions(500, seed=5)
    write_transactions(frame, tmp_path / "d.parquet")
    preprocessor = Preprocessor.fit(frame)
    scorer = FraudScorer(
        preprocessor, build_network(preprocessor, NetworkConfig(hidden=[8])), NetworkConfig(hidden=[8])
    )
    scorer.save(tmp_path / "model")
    loaded = FraudScorer.load(tmp_path / "model")
    np.testing.assert_allclose(scorer.score_frame(frame), loaded.score_frame(frame))
    with pytest.raises(FileNotFoundError, match="not a fraud model directory"):
        FraudScorer.load(tmp_path)
