"""The prediction log: every served request as a row, written in batched Parquet files.

Appending is a list append on the request path; files are written off the event loop by the owner
(see `flush_loop`), when the buffer reaches `max_rows` rows or is `max_seconds` old, and on shutdown.
So a clean stop loses nothing, and a hard kill loses at most the unflushed batch: at most `max_rows`
rows or `max_seconds` seconds of traffic, whichever comes first (plus the flush loop's 0.1 s tick and
the time one write takes). Files are written to a temporary name and renamed, so a reader never sees
half a file.

A batch that cannot be written (disk full, file-size limit, an I/O error) is dropped and counted
(`rows_unwritten`, `write_errors`, `last_error`): the owner keeps serving, its memory stays bounded, and
the gap is visible in its metrics, never a silent stop of the log.

This module is the log's one contract: its schemas (`PREDICTION_SCHEMA`, `FEEDBACK_SCHEMA`) and column
names, the writer the gateway uses, and the readers the controller and the drift monitor use. The
controller and the drift monitor read the files; they never import the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.schema import CATEGORICAL_FEATURES, NUMERIC_FEATURES

# Column names of the prediction log that code outside the writer refers to.
REQUEST_ID, TS, ACCOUNT_ID, VARIANT = "request_id", "ts", "account_id", "variant"
SLOT, MODEL_VERSION = "slot", "model_version"
SCORE, LATENCY_MS, STATUS, POLICY_GENERATION = "score", "latency_ms", "status", "policy_generation"
SHADOW_PREFIX = "shadow_"  # the challenger's answer to a shadowed request: shadow_score, shadow_status, ...
SHADOW_SLOT, SHADOW_MODEL_VERSION = "shadow_slot", "shadow_model_version"
SHADOW_SCORE, SHADOW_LATENCY_MS, SHADOW_STATUS = "shadow_score", "shadow_latency_ms", "shadow_status"
# ... and of the feedback (labels) log.
LABEL, RECEIVED_AT = "label", "received_at"
# Logged request features that code outside the writer refers to (every feature is logged, see the schema).
AMOUNT = "amount"
# True for a request QA sent to a variant on purpose (X-Mlops-Variant): logged, never evidence.
FORCED = "forced"
# The decision the client got (approve/decline), and for a `status == DEGRADED` row why the default rule gave it:
# budget (no model answered in time), overload (shed by the gateway). A degraded row is evidence against neither
# variant; a row whose slots failed on their own keeps `status == "error"` (evidence against the failed variant).
DECISION, DEGRADED_REASON, DEGRADED = "decision", "degraded_reason", "degraded"

PREDICTION_SCHEMA = pa.schema(
    [
        (REQUEST_ID, pa.string()),
        (TS, pa.float64()),
        (ACCOUNT_ID, pa.string()),
        (VARIANT, pa.string()),
        (SLOT, pa.string()),
        (MODEL_VERSION, pa.string()),
        (SCORE, pa.float64()),
        (LATENCY_MS, pa.float64()),
        (STATUS, pa.string()),
        (POLICY_GENERATION, pa.int64()),
        (SHADOW_SLOT, pa.string()),
        (SHADOW_MODEL_VERSION, pa.string()),
        (SHADOW_SCORE, pa.float64()),
        (SHADOW_LATENCY_MS, pa.float64()),
        (SHADOW_STATUS, pa.string()),
        (FORCED, pa.bool_()),
        (DECISION, pa.string()),
        (DEGRADED_REASON, pa.string()),
        *[(name, pa.float64()) for name in NUMERIC_FEATURES],
        *[(name, pa.string()) for name in CATEGORICAL_FEATURES],
    ]
)
FEEDBACK_SCHEMA = pa.schema([(REQUEST_ID, pa.string()), (LABEL, pa.int64()), (RECEIVED_AT, pa.float64())])

_sequence = itertools.count()
log = logging.getLogger("mlops.prediction_log")


class BatchedParquetLog:
    """Buffer rows in memory; write them as one Parquet file per batch under `directory`."""

    def __init__(
        self,
        directory: str | Path,
        max_rows: int = 2_000,
        max_seconds: float = 1.0,
        prefix: str = "part",
        schema: pa.Schema | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.schema = schema  # fixed columns: a row without a key gets a null, not a different file schema
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_rows, self.max_seconds, self.prefix = max_rows, max_seconds, prefix
        self._rows: list[dict[str, Any]] = []
        self._oldest = 0.0
        # One file write at a time, whichever thread flushes; a batch is claimed and written under it, so a flush
        # waits for a write in flight. `take` holds it too, briefly: `flush_loop` awaits each write before it
        # takes that log's next batch, so on the event loop it waits only during a stop's flush.
        self._lock = threading.Lock()
        self._pending: list[list[dict[str, Any]]] = []  # batches taken, not yet written (see `flush`)
        self.rows_written = 0
        self.files_written = 0
        self.rows_unwritten = 0  # rows of batches that could not be written (dropped)
        self.write_errors = 0
        self.last_error: str | None = None

    def append(self, row: dict[str, Any]) -> None:
        if not self._rows:
            self._oldest = time.monotonic()
        self._rows.append(row)

    def due(self) -> bool:
        return bool(self._rows) and (
            len(self._rows) >= self.max_rows or time.monotonic() - self._oldest >= self.max_seconds
        )

    def take(self) -> list[dict[str, Any]]:
        """Hand over the buffered rows. Call it on the thread that appends (the event loop): the swap
        is then never interleaved with an append, and no row can fall between two batches. The batch stays
        pending until it is written, so a `flush` writes it if its own write never ran."""
        with self._lock:
            rows, self._rows = self._rows, []
            if rows:
                self._pending.append(rows)
        return rows

    def write(self, rows: list[dict[str, Any]]) -> Path | None:
        """Write rows taken with `take` (safe to run in a worker thread). A batch a `flush` wrote already is not
        written again."""
        if not rows:
            return None
        with self._lock:
            if not any(batch is rows for batch in self._pending):
                return None
            self._pending = [batch for batch in self._pending if batch is not rows]
            return self._write_counted(rows)

    def flush(self) -> Path | None:
        """Write what is buffered and every batch taken but not written yet, after any write in flight has
        finished. A stop calls this last. `flush_loop` takes a batch, then writes it in a worker thread; a stop
        that cancels the loop at that moment cancels the thread's work item before it runs, and the batch used
        to be lost with the process (a restarted gateway then refused labels for requests it had served: 404)."""
        self.take()
        with self._lock:
            batches, self._pending = self._pending, []
            rows = [row for batch in batches for row in batch]
            return self._write_counted(rows) if rows else None

    def _write_counted(self, rows: list[dict[str, Any]]) -> Path | None:
        """Write one file under the lock; a failure is counted, never raised."""
        try:
            path = self._write(rows)
        # ENOSPC, EFBIG (RLIMIT_FSIZE), EIO...: count the gap, keep serving. Anything else (a row pyarrow cannot
        # convert: a bug) is counted too, so that a stop's flush still writes the other log.
        except Exception as error:
            if not isinstance(error, OSError):
                log.exception("%s: %d rows could not be converted", self.directory, len(rows))
            self.rows_unwritten += len(rows)
            self.write_errors += 1
            if self.last_error is None:  # once per streak of failures, not once per batch
                log.error("%s: %d rows not written: %s", self.directory, len(rows), error)
            self.last_error = f"{type(error).__name__}: {error}"
            return None
        if self.last_error is not None:
            log.warning("%s: writing again after %d unwritten rows", self.directory, self.rows_unwritten)
            self.last_error = None
        self.rows_written += len(rows)
        self.files_written += 1
        return path

    def _write(self, rows: list[dict[str, Any]]) -> Path:
        name = f"{self.prefix}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{next(_sequence):06d}.parquet"
        final = self.directory / name
        temporary = self.directory / f".{name}.tmp"
        try:
            pq.write_table(pa.Table.from_pylist(rows, schema=self.schema), temporary)
            os.replace(temporary, final)
        except Exception:
            with contextlib.suppress(OSError):
                temporary.unlink()  # a half-written file must not fill what space is left
            raise
        return final


async def flush_loop(logs: Iterable[BatchedParquetLog], interval: float = 0.1) -> None:
    """Background task: write due batches in a thread so the event loop keeps serving."""
    logs = list(logs)
    while True:
        await asyncio.sleep(interval)
        for log in logs:
            if log.due():
                await asyncio.to_thread(log.write, log.take())


class RecentIds:
    """Bounded set of recent request ids, so `/feedback` can reject ids it never served.

    Rebuilt at start from the newest log files, so labels that arrive after a gateway restart are still
    accepted for up to `capacity` recent requests.
    """

    def __init__(self, capacity: int = 1_000_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, request_id: str) -> None:
        self._ids[request_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add_older(self, older: RecentIds) -> None:
        """Put `older`'s ids before the ones held (ids loaded from the log while new ones were being served), so
        the capacity bound evicts the oldest first."""
        merged: OrderedDict[str, None] = OrderedDict(older._ids)
        merged.update(self._ids)
        while len(merged) > self.capacity:
            merged.popitem(last=False)
        self._ids = merged

    def load(self, directory: str | Path) -> None:
        files = sorted(Path(directory).glob("*.parquet"))
        chosen: list[Path] = []
        rows = 0
        for path in reversed(files):
            chosen.append(path)
            rows += pq.ParquetFile(path).metadata.num_rows
            if rows >= self.capacity:
                break
        for path in reversed(chosen):
            for request_id in pq.read_table(path, columns=["request_id"]).column(0).to_pylist():
                self.add(request_id)


# --- readers (the controller's analysis, the drift monitor) ----------------------------------------------


def read_window(directory: str | Path, since: float, until: float | None = None, time_column: str = TS) -> pd.DataFrame:
    """Rows of the Parquet files under `directory` with `since <= time_column < until`."""
    files = [p for p in sorted(Path(directory).glob("*.parquet")) if p.stat().st_mtime >= since]
    if not files:
        return pd.DataFrame()
    table = pa.concat_tables([pq.read_table(p) for p in files], promote_options="default")
    frame = table.to_pandas()
    keep = frame[time_column] >= since
    if until is not None:
        keep &= frame[time_column] < until
    return frame[keep].reset_index(drop=True)


def read_feedback(directory: str | Path, request_ids: pd.Series, served_at: pd.Series | None = None) -> pd.DataFrame:
    """The first label for each of the given requests, whenever it arrived (labels come late: no time filter):
    a label is accepted once, here as at the gateway, so a later different one never overrides it.

    With `served_at` (request_id -> `ts` of the answer), a label that arrived before its request was served
    is dropped: it cannot be evidence about that answer (a guessed id, a clock gone back, a poisoned log)."""
    columns = [REQUEST_ID, LABEL, RECEIVED_AT]
    files = sorted(Path(directory).glob("*.parquet"))
    if not files or request_ids.empty:
        return pd.DataFrame(columns=columns)
    frame = pa.concat_tables([pq.read_table(p, columns=columns) for p in files]).to_pandas()
    frame = frame[frame[REQUEST_ID].isin(set(request_ids))]
    if served_at is not None:
        frame = frame[frame[RECEIVED_AT] >= frame[REQUEST_ID].map(served_at)]
    frame = frame.sort_values(RECEIVED_AT, kind="stable")
    return frame.drop_duplicates(REQUEST_ID, keep="first").reset_index(drop=True)


def served_times(predictions: pd.DataFrame) -> pd.Series:
    """request_id -> when it was answered (its first row: a shadow row shares the id and the time)."""
    if predictions.empty:
        return pd.Series(dtype=float)
    return predictions.drop_duplicates(REQUEST_ID).set_index(REQUEST_ID)[TS]


def without_forced(predictions: pd.DataFrame) -> pd.DataFrame:
    """The rows that are evidence: requests routed by the policy, not sent to a variant on purpose by QA.
    Files written before the column existed have no forced rows."""
    if predictions.empty or FORCED not in predictions.columns:
        return predictions
    forced = predictions[FORCED].astype("boolean").fillna(False).to_numpy(dtype=bool)
    return predictions[~forced].reset_index(drop=True)


def without_degraded(predictions: pd.DataFrame) -> pd.DataFrame:
    """The rows some model was given its chance to answer: requests the default rule answered because the budget
    ran out or the gateway shed them (`status == "degraded"`) are evidence against neither variant."""
    if predictions.empty or STATUS not in predictions.columns:
        return predictions
    return predictions[predictions[STATUS] != DEGRADED].reset_index(drop=True)
