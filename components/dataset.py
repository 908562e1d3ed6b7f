"""Reading, fingerprinting and splitting transaction files: the plain functions behind `ingest`."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.schema import ENTITY_KEY


class DataFileError(ValueError):
    """A data file that cannot be used, with a message that says why."""


def read_transactions(path: str | Path) -> pd.DataFrame:
    """Read a Parquet file of transactions, or raise `DataFileError` saying exactly what is wrong."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"data file not found: {path}")
    if path.is_dir():
        raise DataFileError(f"data path is a directory, expected a Parquet file: {path}")
    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as error:
        raise DataFileError(f"{path} is not a readable Parquet file ({error})") from None


def write_transactions(frame: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


def file_sha256(path: str | Path) -> str:
    """Content hash recorded as lineage, so a model version names exactly the data it saw."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_by_account(
    frame: pd.DataFrame, test_fraction: float = 0.2, salt: str = "holdout"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split so that no account is on both sides: a model must not be evaluated on accounts it memorised.

    Deterministic (a CRC of salt + account id), so training and evaluation, which run as separate
    pipeline steps, agree on the split without passing it around.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    buckets = frame[ENTITY_KEY].astype(str).map(lambda key: zlib.crc32(f"{salt}:{key}".encode()) % 10_000)
    is_test = buckets < int(test_fraction * 10_000)
    return frame[~is_test].reset_index(drop=True), frame[is_test].reset_index(drop=True)
