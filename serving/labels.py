"""One label per request id: the gateway's memory of the labels it accepted.

A label is evidence for an automatic decision, so the first label for a request id is the one that counts:
the same label again is a harmless retry, a different one is refused (409) and counted, never a silent
overwrite. The book is bounded like the ids the gateway remembers, and rebuilt at start from the feedback
log, so a gateway restart does not reopen labelled ids to a second label.
"""

from __future__ import annotations

from collections import OrderedDict
from enum import StrEnum
from pathlib import Path

import pyarrow.parquet as pq


class LabelOutcome(StrEnum):
    accepted = "accepted"  # first label for the id: logged
    duplicate = "duplicate"  # the same label again: nothing logged, answered as success (idempotent)
    conflict = "conflict"  # a different label for a labelled id: refused


class LabelBook:
    def __init__(self, capacity: int = 1_000_000) -> None:
        self.capacity = capacity
        self._labels: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._labels)

    def get(self, request_id: str) -> int | None:
        return self._labels.get(request_id)

    def offer(self, request_id: str, label: int) -> LabelOutcome:
        """Record `label` for `request_id` unless it has one already; say which it was."""
        existing = self._labels.get(request_id)
        if existing is None:
            self._labels[request_id] = label
            if len(self._labels) > self.capacity:
                self._labels.popitem(last=False)
            return LabelOutcome.accepted
        return LabelOutcome.duplicate if existing == label else LabelOutcome.conflict

    def load(self, directory: str | Path) -> None:
        """The labels already logged, in the order they arrived: the first label per id wins, as it did online."""
        rows: list[tuple[float, str, int]] = []
        for path in sorted(Path(directory).glob("*.parquet")):
            table = pq.read_table(path, columns=["request_id", "label", "received_at"]).to_pydict()
            for request_id, label, at in zip(table["request_id"], table["label"], table["received_at"], strict=True):
                if request_id is not None and label is not None:
                    rows.append((at or 0.0, request_id, int(label)))
        for _, request_id, label in sorted(rows, key=lambda row: row[0]):
            self.offer(request_id, label)
