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

import pyarrow as pa
import pyarrow.parquet as pq

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
        self._lock = threading.Lock()  # one file write at a time, whichever thread flushes
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
        is then never interleaved with an append, and no row can fall between two batches."""
        rows, self._rows = self._rows, []
        return rows

    def write(self, rows: list[dict[str, Any]]) -> Path | None:
        """Write rows taken with `take` (safe to run in a worker thread)."""
        if not rows:
            return None
        with self._lock:
            try:
                path = self._write(rows)
            except OSError as error:  # ENOSPC, EFBIG (RLIMIT_FSIZE), EIO...: count the gap, keep serving
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

    def flush(self) -> Path | None:
        return self.write(self.take())

    def _write(self, rows: list[dict[str, Any]]) -> Path:
        name = f"{self.prefix}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{next(_sequence):06d}.parquet"
        final = self.directory / name
        temporary = self.directory / f".{name}.tmp"
        try:
            pq.write_table(pa.Table.from_pylist(rows, schema=self.schema), temporary)
            os.replace(temporary, final)
        except OSError:
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
