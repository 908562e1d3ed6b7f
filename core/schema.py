"""The card-transaction data contract, shared by data generation, validation, training and serving.

One place says which columns exist, their types, their valid ranges and category sets, so the
Great Expectations suite, the model's preprocessing and the gateway's request validation can never
disagree about what a valid transaction is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ColumnKind = Literal["numeric", "categorical", "identifier", "timestamp", "label"]


@dataclass(frozen=True)
class Column:
    """One column of the transaction table and what makes a value of it valid."""

    name: str
    kind: ColumnKind
    dtype: str  # pandas dtype family the column must have: "float", "int", "str", "datetime", "bool"
    description: str
    min_value: float | None = None
    max_value: float | None = None
    categories: tuple[str, ...] = ()
    max_null_fraction: float = 0.0


MERCHANT_CATEGORIES: tuple[str, ...] = (
    "grocery",
    "restaurants",
    "fuel",
    "travel",
    "electronics",
    "online_retail",
    "gaming",
    "jewelry",
    "health",
    "utilities",
)
COUNTRIES: tuple[str, ...] = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "CA", "BR", "NG", "IN", "RU")
DEVICES: tuple[str, ...] = ("chip_pos", "contactless", "web", "mobile_app", "atm")

COLUMNS: tuple[Column, ...] = (
    Column("transaction_id", "identifier", "str", "unique id of the transaction"),
    Column("account_id", "identifier", "str", "card account; the sticky routing key"),
    Column("event_time", "timestamp", "datetime", "when the authorisation was requested (UTC)"),
    Column("amount", "numeric", "float", "amount in EUR", min_value=0.01, max_value=50_000.0),
    Column("hour", "numeric", "int", "local hour of day", min_value=0, max_value=23),
    Column("account_age_days", "numeric", "int", "days since account opening", min_value=0, max_value=20_000),
    Column(
        "txn_count_1h", "numeric", "int", "transactions on the account in the last hour", min_value=0, max_value=500
    ),
    Column(
        "txn_count_24h", "numeric", "int", "transactions on the account in the last 24 h", min_value=0, max_value=2_000
    ),
    Column(
        "amount_to_avg_ratio",
        "numeric",
        "float",
        "amount over the account's 30-day average amount",
        min_value=0.0,
        max_value=1_000.0,
    ),
    Column(
        "distance_from_home_km",
        "numeric",
        "float",
        "distance from the cardholder's home",
        min_value=0.0,
        max_value=20_100.0,
    ),
    Column("merchant_category", "categorical", "str", "merchant category", categories=MERCHANT_CATEGORIES),
    Column("country", "categorical", "str", "merchant country (ISO 3166 alpha-2)", categories=COUNTRIES),
    Column("device", "categorical", "str", "how the card was used", categories=DEVICES),
    Column("is_fraud", "label", "int", "1 if the transaction was later confirmed fraud", min_value=0, max_value=1),
)

COLUMNS_BY_NAME: dict[str, Column] = {c.name: c for c in COLUMNS}
LABEL = "is_fraud"
ENTITY_KEY = "account_id"
NUMERIC_FEATURES: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.kind == "numeric")
CATEGORICAL_FEATURES: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.kind == "categorical")
FEATURES: tuple[str, ...] = NUMERIC_FEATURES + CATEGORICAL_FEATURES
SLICE_COLUMNS: tuple[str, ...] = ("merchant_category", "country")

# Expected fraud base rate of healthy data; outside these bounds the labels are not trustworthy.
LABEL_RATE_BOUNDS: tuple[float, float] = (0.003, 0.08)
