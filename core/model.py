"""The fraud model artifact: preprocessing + network, saved as one directory.

This is the contract between training (components/) and serving (serving/): training writes a
`FraudScorer` directory, the registry stores it, a model slot loads it. Keeping it in the shared core
means serving never imports the training code.

Design for imbalanced fraud data: heavy-tailed numerics are log-transformed and standardised,
categoricals get small embeddings (index 0 = unseen category, so new merchants never crash scoring),
and the output bias starts at the log-odds of the base rate so the network begins calibrated instead
of spending its first epochs learning that fraud is rare. Plain binary cross-entropy keeps the scores
calibrated probabilities, which the guardrails and the decision threshold rely on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.schema import CATEGORICAL_FEATURES, NUMERIC_FEATURES

_LOG_FEATURES = {
    "amount",
    "amount_to_avg_ratio",
    "distance_from_home_km",
    "txn_count_1h",
    "txn_count_24h",
    "account_age_days",
}
STATE_FILE = "model.pt"
CONFIG_FILE = "model.json"


@dataclass
class Preprocessor:
    """Turns transactions into (numeric matrix, category index matrix). Fit once on training data."""

    means: dict[str, float]
    stds: dict[str, float]
    vocab: dict[str, list[str]]
    base_rate: float

    @classmethod
    def fit(cls, frame: pd.DataFrame, label: str = "is_fraud") -> Preprocessor:
        means, stds = {}, {}
        for name in NUMERIC_FEATURES:
            values = _numeric_column(frame[name].to_numpy(dtype="float64"), name)
            means[name] = float(values.mean())
            stds[name] = float(values.std()) or 1.0
        vocab = {name: sorted(frame[name].dropna().astype(str).unique().tolist()) for name in CATEGORICAL_FEATURES}
        rate = float(frame[label].mean()) if label in frame and len(frame) else 0.02
        return cls(means, stds, vocab, min(max(rate, 1e-4), 0.5))

    def transform(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        numeric = np.stack(
            [
                (_numeric_column(frame[name].to_numpy(dtype="float64"), name) - self.means[name]) / self.stds[name]
                for name in NUMERIC_FEATURES
            ],
            axis=1,
        ).astype("float32")
        categorical = np.stack(
            [self._indices(frame[name].astype(str).to_numpy(), name) for name in CATEGORICAL_FEATURES], axis=1
        ).astype("int64")
        return numeric, categorical

    def transform_records(self, records: Iterable[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Fast path for serving: plain dicts straight to arrays, no DataFrame in between."""
        rows = list(records)
        numeric = np.empty((len(rows), len(NUMERIC_FEATURES)), dtype="float32")
        categorical = np.empty((len(rows), len(CATEGORICAL_FEATURES)), dtype="int64")
        lookups = self._lookups()
        for i, row in enumerate(rows):
            for j, name in enumerate(NUMERIC_FEATURES):
                value = float(row[name])
                if name in _LOG_FEATURES:
                    value = math.log1p(max(value, 0.0))
                numeric[i, j] = (value - self.means[name]) / self.stds[name]
            for j, name in enumerate(CATEGORICAL_FEATURES):
                categorical[i, j] = lookups[name].get(str(row[name]), 0)
        return numeric, categorical

    def cardinalities(self) -> list[int]:
        return [len(self.vocab[name]) + 1 for name in CATEGORICAL_FEATURES]

    def _lookups(self) -> dict[str, dict[str, int]]:
        cached = getattr(self, "_lookup_cache", None)
        if cached is None:
            cached = {name: {v: i + 1 for i, v in enumerate(values)} for name, values in self.vocab.items()}
            object.__setattr__(self, "_lookup_cache", cached)
        return cached

    def _indices(self, values: np.ndarray, name: str) -> np.ndarray:
        lookup = self._lookups()[name]
        return np.fromiter((lookup.get(v, 0) for v in values), dtype="int64", count=len(values))


def _numeric_column(values: np.ndarray, name: str) -> np.ndarray:
    values = np.nan_to_num(values, nan=0.0)
    return np.log1p(np.clip(values, 0.0, None)) if name in _LOG_FEATURES else values


@dataclass
class NetworkConfig:
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    embedding_dim: int = 4
    dropout: float = 0.1


class FraudNet(nn.Module):
    """Embeddings for categoricals + an MLP over everything, one logit out."""

    def __init__(self, n_numeric: int, cardinalities: list[int], config: NetworkConfig, base_rate: float) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(n, config.embedding_dim) for n in cardinalities)
        layers: list[nn.Module] = []
        width = n_numeric + config.embedding_dim * len(cardinalities)
        for size in config.hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(config.dropout)]
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)
        with torch.no_grad():
            self.head.bias.fill_(math.log(base_rate / (1 - base_rate)))

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        embedded = [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        return self.head(self.body(torch.cat([numeric, *embedded], dim=1))).squeeze(1)


def build_network(preprocessor: Preprocessor, config: NetworkConfig) -> FraudNet:
    return FraudNet(len(NUMERIC_FEATURES), preprocessor.cardinalities(), config, preprocessor.base_rate)


class FraudScorer:
    """A trained model ready to score: what a model slot holds in memory."""

    def __init__(self, preprocessor: Preprocessor, network: FraudNet, config: NetworkConfig) -> None:
        self.preprocessor = preprocessor
        self.network = network.eval()
        self.config = config

    def score_frame(self, frame: pd.DataFrame) -> np.ndarray:
        numeric, categorical = self.preprocessor.transform(frame)
        return self._score(numeric, categorical)

    def score_records(self, records: Iterable[Mapping[str, Any]]) -> np.ndarray:
        numeric, categorical = self.preprocessor.transform_records(records)
        return self._score(numeric, categorical)

    def _score(self, numeric: np.ndarray, categorical: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = self.network(torch.from_numpy(numeric), torch.from_numpy(categorical))
        return torch.sigmoid(logits).numpy().astype("float64")

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.network.state_dict(), directory / STATE_FILE)
        (directory / CONFIG_FILE).write_text(
            json.dumps({"preprocessor": asdict(self.preprocessor), "network": asdict(self.config)}, indent=2)
        )
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> FraudScorer:
        directory = Path(directory)
        if not (directory / CONFIG_FILE).exists() or not (directory / STATE_FILE).exists():
            raise FileNotFoundError(f"{directory} is not a fraud model directory (needs {CONFIG_FILE}, {STATE_FILE})")
        config = json.loads((directory / CONFIG_FILE).read_text())
        preprocessor = Preprocessor(**config["preprocessor"])
        network_config = NetworkConfig(**config["network"])
        network = build_network(preprocessor, network_config)
        network.load_state_dict(torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True))
        return cls(preprocessor, network, network_config)
