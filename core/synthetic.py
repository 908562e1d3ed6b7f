"""Synthetic card transactions: realistic enough to train on, reproducible by seed.

Used by the training pipeline's `generate` step, by the traffic simulator and by tests, so it sits in
the shared core. Fraud is drawn from a logistic rule over the features (night, foreign, unusual
amount, velocity, young account, risky merchant and channel), with its intercept solved so the base
rate lands near `fraud_rate`. Drift kinds change the inputs (covariate, new-category) or the rule
itself (concept); corruption kinds break the data contract in ways the validation gate must catch.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import pandas as pd

from core.schema import COLUMNS, COUNTRIES, DEVICES, MERCHANT_CATEGORIES

DriftKind = Literal["covariate", "new-category", "concept"]
CorruptKind = Literal["missing-column", "wrong-type", "out-of-range", "null-burst", "label-rate", "empty"]
DRIFT_KINDS: tuple[str, ...] = get_args(DriftKind)
CORRUPT_KINDS: tuple[str, ...] = get_args(CorruptKind)
NEW_CATEGORY = "crypto_exchange"

_CATEGORY_WEIGHTS = np.array([0.24, 0.16, 0.10, 0.05, 0.06, 0.18, 0.05, 0.02, 0.07, 0.07])
_CATEGORY_AMOUNT = np.array([1.0, 0.8, 1.2, 6.0, 4.0, 1.5, 0.6, 8.0, 1.1, 1.8])
_CATEGORY_RISK = np.array([-0.4, -0.3, -0.2, 0.6, 0.8, 0.4, 0.9, 1.2, -0.3, -0.5])
_HOME_WEIGHTS = np.array([0.30, 0.14, 0.13, 0.11, 0.08, 0.07, 0.05, 0.05, 0.04, 0.01, 0.01, 0.01])
_COUNTRY_RISK = np.array([0.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.0, 0.0, 0.5, 1.0, 0.6, 1.0])
_DEVICE_RISK = np.array([-0.6, -0.3, 0.6, 0.3, 0.2])
_ONLINE = {"online_retail", "gaming", "electronics"}
# Scales the fraud rule: at 2.0 a perfect model reaches a PR-AUC of about 0.6, like real fraud data.
_SIGNAL_STRENGTH = 2.0


def generate_transactions(
    rows: int,
    seed: int = 0,
    drift: DriftKind | None = None,
    corrupt: CorruptKind | None = None,
    fraud_rate: float = 0.02,
    start: str = "2026-01-01",
    rows_per_account: float = 25.0,
) -> pd.DataFrame:
    """Return `rows` transactions with the columns of `core.schema.COLUMNS` (unless corrupted), made by
    `rows / rows_per_account` accounts (at least 50) of heavy-tailed activity."""
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    if not rows_per_account >= 1:
        raise ValueError(f"rows_per_account must be >= 1, got {rows_per_account}")
    if drift is not None and drift not in DRIFT_KINDS:
        raise ValueError(f"unknown drift kind {drift!r}; choose one of {', '.join(DRIFT_KINDS)}")
    if corrupt is not None and corrupt not in CORRUPT_KINDS:
        raise ValueError(f"unknown corruption kind {corrupt!r}; choose one of {', '.join(CORRUPT_KINDS)}")
    rng = np.random.default_rng(seed)
    frame = _features(rows, rng, drift, start, rows_per_account)
    frame["is_fraud"] = _labels(frame, rng, drift, fraud_rate)
    frame = frame[[c.name for c in COLUMNS]]
    return apply_corruption(frame, corrupt, rng) if corrupt else frame


def _features(
    rows: int, rng: np.random.Generator, drift: DriftKind | None, start: str, rows_per_account: float
) -> pd.DataFrame:
    n_accounts = max(50, int(rows // rows_per_account))
    # Accounts: a home country, an age and a typical spend. Heavy users appear more often (Zipf-like).
    home = rng.choice(len(COUNTRIES), size=n_accounts, p=_HOME_WEIGHTS)
    age = rng.gamma(2.0, 600.0, size=n_accounts).astype(int)
    typical = rng.lognormal(3.3, 0.6, size=n_accounts)
    activity = rng.pareto(1.5, size=n_accounts) + 1.0
    account = rng.choice(n_accounts, size=rows, p=activity / activity.sum())

    category = rng.choice(len(MERCHANT_CATEGORIES), size=rows, p=_CATEGORY_WEIGHTS)
    amount = typical[account] * _CATEGORY_AMOUNT[category] * rng.lognormal(0.0, 0.7, size=rows)
    hour = np.rint(rng.normal(14.0, 4.5, size=rows)) % 24
    foreign = rng.random(rows) < 0.08
    country = np.where(foreign, rng.integers(0, len(COUNTRIES), size=rows), home[account])
    account_age = age[account]
    velocity_1h = rng.poisson(0.4, size=rows)

    if drift == "covariate":
        # Fraud rings test cards at night, abroad, on young accounts and with larger amounts.
        amount = amount * rng.lognormal(0.9, 0.3, size=rows)
        night = rng.random(rows) < 0.35
        hour = np.where(night, rng.integers(0, 6, size=rows), hour)
        foreign = rng.random(rows) < 0.30
        country = np.where(foreign, rng.integers(0, len(COUNTRIES), size=rows), home[account])
        account_age = (account_age * 0.3).astype(int)
        velocity_1h = rng.poisson(1.5, size=rows)

    names = np.array(MERCHANT_CATEGORIES, dtype=object)[category]
    if drift == "new-category":
        names = np.where(rng.random(rows) < 0.2, NEW_CATEGORY, names)

    devices = _devices(names, rng)
    distance = np.where(
        country == home[account], rng.exponential(12.0, size=rows), rng.uniform(400.0, 9_000.0, size=rows)
    )
    times = pd.Timestamp(start, tz="UTC") + pd.to_timedelta(np.sort(rng.uniform(0, 30 * 86_400, size=rows)), unit="s")
    amount = np.clip(np.round(amount, 2), 0.01, 50_000.0)
    token = f"{int(rng.integers(0, 16**6)):06x}"  # ids from different seeds never collide
    return pd.DataFrame(
        {
            "transaction_id": [f"tx_{token}_{i:08d}" for i in range(rows)],
            "account_id": [f"acc_{a:07d}" for a in account],
            "event_time": times,
            "amount": amount.astype("float64"),
            "hour": hour.astype("int64"),
            "account_age_days": np.clip(account_age, 0, 20_000).astype("int64"),
            "txn_count_1h": velocity_1h.astype("int64"),
            "txn_count_24h": (velocity_1h + rng.poisson(3.0, size=rows)).astype("int64"),
            "amount_to_avg_ratio": np.clip(amount / typical[account], 0.0, 1_000.0).round(4),
            "distance_from_home_km": distance.round(2),
            "merchant_category": names.astype(str),
            "country": np.array(COUNTRIES, dtype=object)[country].astype(str),
            "device": devices,
        }
    )


def _devices(categories: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    online = np.isin(categories, list(_ONLINE))
    card_present = rng.choice(["chip_pos", "contactless", "atm"], size=len(categories), p=[0.55, 0.42, 0.03])
    card_absent = rng.choice(["web", "mobile_app"], size=len(categories), p=[0.55, 0.45])
    mixed = rng.random(len(categories)) < 0.1  # some in-store purchases online and vice versa
    return np.where(online ^ mixed, card_absent, card_present).astype(str)


def _risk_logit(frame: pd.DataFrame, drift: DriftKind | None) -> np.ndarray:
    """Fraud log-odds before the intercept. `concept` drift swaps in a different fraud pattern."""
    category_risk = dict(zip(MERCHANT_CATEGORIES, _CATEGORY_RISK, strict=True))
    category_risk[NEW_CATEGORY] = 1.0
    country_risk = dict(zip(COUNTRIES, _COUNTRY_RISK, strict=True))
    device_risk = dict(zip(DEVICES, _DEVICE_RISK, strict=True))
    night = frame["hour"].isin([0, 1, 2, 3, 4, 5]).to_numpy()
    foreign = (frame["distance_from_home_km"] > 300).to_numpy()
    log_ratio = np.log(frame["amount_to_avg_ratio"].to_numpy() + 1e-3)
    young = (frame["account_age_days"] < 90).to_numpy()
    velocity = np.minimum(frame["txn_count_1h"].to_numpy(), 6)
    cat = frame["merchant_category"].map(category_risk).to_numpy(dtype=float)
    ctry = frame["country"].map(country_risk).to_numpy(dtype=float)
    dev = frame["device"].map(device_risk).to_numpy(dtype=float)
    if drift == "concept":
        # Card testing: many small contactless payments at everyday merchants; foreign use is now benign.
        small = (frame["amount"] < 15).to_numpy()
        return 1.8 * small + 0.9 * velocity - 0.8 * foreign - cat + 0.5 * (frame["device"] == "contactless").to_numpy()
    return 1.1 * log_ratio + 1.3 * night + 1.5 * foreign + 0.5 * velocity + 1.0 * young + cat + ctry + dev


def _labels(frame: pd.DataFrame, rng: np.random.Generator, drift: DriftKind | None, rate: float) -> np.ndarray:
    if frame.empty:
        return np.zeros(0, dtype="int64")
    logit = _SIGNAL_STRENGTH * _risk_logit(frame, drift)
    intercept = _solve_intercept(logit, rate)
    probability = 1.0 / (1.0 + np.exp(-(logit + intercept)))
    return (rng.random(len(frame)) < probability).astype("int64")


def _solve_intercept(logit: np.ndarray, rate: float) -> float:
    """Bisection on the intercept so the mean fraud probability equals `rate`."""
    low, high = -30.0, 10.0
    for _ in range(60):
        mid = (low + high) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))) > rate:
            high = mid
        else:
            low = mid
    return (low + high) / 2


def apply_corruption(frame: pd.DataFrame, kind: CorruptKind, rng: np.random.Generator) -> pd.DataFrame:
    """Break the data contract in one named way (what upstream bugs and bad feeds really do)."""
    frame = frame.copy()
    n = len(frame)
    if kind == "missing-column":
        return frame.drop(columns=["amount"])
    if kind == "wrong-type":
        frame["amount"] = frame["amount"].map(lambda v: f"{v:.2f} EUR")
        return frame
    if kind == "out-of-range":
        bad = rng.random(n) < 0.05
        frame.loc[bad, "amount"] = -frame.loc[bad, "amount"]
        frame.loc[rng.random(n) < 0.05, "hour"] = 27
        return frame
    if kind == "null-burst":
        for column in ("amount", "country", "txn_count_1h"):
            frame.loc[rng.random(n) < 0.25, column] = None
        return frame
    if kind == "label-rate":
        frame["is_fraud"] = (rng.random(n) < 0.3).astype("int64")
        return frame
    if kind == "empty":
        return frame.iloc[0:0].copy()
    raise ValueError(f"unknown corruption kind {kind!r}")
