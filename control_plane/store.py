"""Durable, versioned control-plane state: the traffic policy and which model version each slot runs.

Every write appends a row with generation = current + 1 instead of updating in place, so the history is the
audit trail and a generation number names exactly one state. The generation column is the primary key: two
writers racing for the same generation cannot both win, on any database, which is what makes compare-and-set
(`expected_generation`) safe across processes and replicas.

Portable SQLAlchemy Core only. SQLite gets connection-level setup (WAL, busy timeout, BEGIN IMMEDIATE for
writes) so that the gateway, the slots, the controller and the API can share one file.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Double,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError

from control_plane.models import DEFAULT_POLICY, SLOTS, Generations, SlotAssignment, TrafficPolicy
from core.db import create_tables, make_engine, read_transaction, write_transaction

__all__ = [
    "DEFAULT_POLICY",
    "SLOTS",
    "ControlPlaneStore",
    "GenerationConflict",
    "Generations",
    "PolicyError",
    "SlotAssignment",
    "StoreContention",
    "TrafficPolicy",
    "UnknownSlot",
]

WEIGHT_TOLERANCE = 1e-9
MAX_REASON_CHARS = 2_000
MAX_VERSION_CHARS = 256
# Racing writers lose on the primary key and retry; more than a handful of losses means something is wrong.
_WRITE_ATTEMPTS = 8

metadata = MetaData()

policy_table = Table(
    "control_plane_policy",
    metadata,
    Column("generation", Integer, primary_key=True, autoincrement=False),
    Column("weight_a", Double, nullable=False),
    Column("weight_b", Double, nullable=False),
    Column("shadow", Boolean, nullable=False),
    Column("champion_slot", String(8), nullable=False),
    Column("reason", Text, nullable=False),
    Column("updated_at", Double, nullable=False),
)

assignment_table = Table(
    "control_plane_assignment",
    metadata,
    Column("slot", String(8), primary_key=True),
    Column("generation", Integer, primary_key=True, autoincrement=False),
    Column("model_version", String(MAX_VERSION_CHARS), nullable=True),
    Column("updated_at", Double, nullable=False),
)


class PolicyError(ValueError):
    """A value the store refuses; `field` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class GenerationConflict(Exception):
    """Compare-and-set lost: the caller based its write on a generation that is no longer current."""

    def __init__(self, resource: str, expected: int, current: int) -> None:
        super().__init__(f"{resource}: expected generation {expected}, current is {current}")
        self.resource = resource
        self.expected = expected
        self.current = current


class UnknownSlot(KeyError):
    def __init__(self, slot: object) -> None:
        super().__init__(slot)
        self.slot = slot

    def __str__(self) -> str:  # KeyError's default quotes the repr, which reads badly in API errors
        return f"unknown slot {self.slot!r}; known slots: {', '.join(SLOTS)}"


class StoreContention(RuntimeError):
    """Writers kept colliding on the next generation; retrying later is the only remedy."""


# ---------------------------------------------------------------------------------------------------------------
# Validation: pure functions, so the API and the store agree on what is acceptable.


def _check_slot(slot: object) -> str:
    if not isinstance(slot, str) or slot not in SLOTS:
        raise UnknownSlot(slot)
    return slot


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_weights(weights: object) -> dict[str, float]:
    if not isinstance(weights, Mapping):
        raise PolicyError("weights", f"must be a mapping of slot to weight, got {type(weights).__name__}")
    if set(weights) != set(SLOTS):
        raise PolicyError("weights", f"keys must be exactly {list(SLOTS)}, got {sorted(map(str, weights))}")
    checked: dict[str, float] = {}
    for slot in SLOTS:
        value = weights[slot]
        if not _is_number(value) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise PolicyError("weights", f"weight of slot {slot!r} must be a number in [0, 1], got {value!r}")
        checked[slot] = float(value)
    total = math.fsum(checked.values())
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise PolicyError("weights", f"must sum to 1 (within {WEIGHT_TOLERANCE}), got {total!r}")
    return checked


def validate_policy(weights: object, shadow: object, champion_slot: object, reason: object) -> dict[str, Any]:
    checked = validate_weights(weights)
    if not isinstance(shadow, bool):
        raise PolicyError("shadow", f"must be a boolean, got {shadow!r}")
    if not isinstance(champion_slot, str) or champion_slot not in SLOTS:
        raise PolicyError("champion_slot", f"must be one of {list(SLOTS)}, got {champion_slot!r}")
    if not isinstance(reason, str) or not reason.strip():
        raise PolicyError("reason", "must be a non-empty string (it is the audit trail)")
    if len(reason) > MAX_REASON_CHARS:
        raise PolicyError("reason", f"must be at most {MAX_REASON_CHARS} characters, got {len(reason)}")
    return {
        "weight_a": checked["a"],
        "weight_b": checked["b"],
        "shadow": shadow,
        "champion_slot": champion_slot,
        "reason": reason,
    }


def validate_model_version(model_version: object) -> str | None:
    if model_version is None:
        return None  # explicit unassignment: the slot unloads / reports nothing to serve
    if not isinstance(model_version, str) or not model_version.strip():
        raise PolicyError("model_version", f"must be a non-empty string or null, got {model_version!r}")
    if len(model_version) > MAX_VERSION_CHARS:
        raise PolicyError("model_version", f"must be at most {MAX_VERSION_CHARS} characters")
    return model_version


def _check_expected(expected_generation: object) -> int | None:
    if expected_generation is not None and (
        not isinstance(expected_generation, int) or isinstance(expected_generation, bool)
    ):
        raise PolicyError("expected_generation", f"must be an integer or null, got {expected_generation!r}")
    return expected_generation


# ---------------------------------------------------------------------------------------------------------------
# Row mapping.


def _policy_from_row(row: Mapping[str, Any]) -> TrafficPolicy:
    return TrafficPolicy(
        generation=row["generation"],
        weights={"a": row["weight_a"], "b": row["weight_b"]},
        shadow=bool(row["shadow"]),
        champion_slot=row["champion_slot"],
        reason=row["reason"],
        updated_at=row["updated_at"],
    )


def _assignment_from_row(row: Mapping[str, Any]) -> SlotAssignment:
    return SlotAssignment(
        slot=row["slot"], model_version=row["model_version"], generation=row["generation"], updated_at=row["updated_at"]
    )


class ControlPlaneStore:
    """Thread-safe (one pooled connection per call); share one instance per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine = make_engine(url)
        create_tables(self._engine, metadata)

    def _read(self) -> AbstractContextManager[Connection]:
        return read_transaction(self._engine)

    def _write(self) -> AbstractContextManager[Connection]:
        return write_transaction(self._engine)

    # -- policy -------------------------------------------------------------------------------------------------

    @staticmethod
    def _policy_generation(conn: Connection) -> int:
        return conn.execute(select(func.max(policy_table.c.generation))).scalar_one_or_none() or 0

    def get_policy(self) -> TrafficPolicy:
        with self._read() as conn:
            row = conn.execute(select(policy_table).order_by(policy_table.c.generation.desc()).limit(1)).first()
        if row is None:  # a copy: the weights dict is mutable and DEFAULT_POLICY is shared
            return replace(DEFAULT_POLICY, weights=dict(DEFAULT_POLICY.weights))
        return _policy_from_row(row._mapping)

    def policy_history(self, limit: int = 50) -> list[TrafficPolicy]:
        """Newest first."""
        query = select(policy_table).order_by(policy_table.c.generation.desc()).limit(max(0, limit))
        with self._read() as conn:
            return [_policy_from_row(row._mapping) for row in conn.execute(query)]

    def set_policy(
        self,
        weights: Mapping[str, float],
        shadow: bool,
        champion_slot: str,
        reason: str,
        expected_generation: int | None = None,
    ) -> TrafficPolicy:
        values = validate_policy(weights, shadow, champion_slot, reason)
        row = self._append(
            policy_table, "policy", self._policy_generation, values, _check_expected(expected_generation)
        )
        return _policy_from_row(row)

    # -- slots --------------------------------------------------------------------------------------------------

    @staticmethod
    def _slot_generation(slot: str) -> Callable[[Connection], int]:
        def current(conn: Connection) -> int:
            query = select(func.max(assignment_table.c.generation)).where(assignment_table.c.slot == slot)
            return conn.execute(query).scalar_one_or_none() or 0

        return current

    def get_assignment(self, slot: str) -> SlotAssignment:
        _check_slot(slot)
        query = (
            select(assignment_table)
            .where(assignment_table.c.slot == slot)
            .order_by(assignment_table.c.generation.desc())
            .limit(1)
        )
        with self._read() as conn:
            row = conn.execute(query).first()
        if row is None:
            return SlotAssignment(slot=slot, model_version=None, generation=0, updated_at=0.0)
        return _assignment_from_row(row._mapping)

    def get_assignments(self) -> dict[str, SlotAssignment]:
        return {slot: self.get_assignment(slot) for slot in SLOTS}

    def assignment_history(self, slot: str, limit: int = 50) -> list[SlotAssignment]:
        """Newest first."""
        _check_slot(slot)
        query = (
            select(assignment_table)
            .where(assignment_table.c.slot == slot)
            .order_by(assignment_table.c.generation.desc())
            .limit(max(0, limit))
        )
        with self._read() as conn:
            return [_assignment_from_row(row._mapping) for row in conn.execute(query)]

    def assign(self, slot: str, model_version: str | None, expected_generation: int | None = None) -> SlotAssignment:
        _check_slot(slot)
        values = {"slot": slot, "model_version": validate_model_version(model_version)}
        row = self._append(
            assignment_table, f"slot {slot}", self._slot_generation(slot), values, _check_expected(expected_generation)
        )
        return _assignment_from_row(row)

    # -- shared -------------------------------------------------------------------------------------------------

    def _append(
        self,
        table: Table,
        resource: str,
        current_of: Callable[[Connection], int],
        values: dict[str, Any],
        expected: int | None,
    ) -> dict[str, Any]:
        """Insert the next generation atomically; the primary key turns a lost race into a retry (or a
        conflict, when the caller pinned the generation it read)."""
        for _ in range(_WRITE_ATTEMPTS):
            try:
                with self._write() as conn:
                    current = current_of(conn)
                    if expected is not None and expected != current:
                        raise GenerationConflict(resource, expected, current)
                    row = {**values, "generation": current + 1, "updated_at": time.time()}
                    conn.execute(insert(table).values(**row))
                return row
            except IntegrityError:
                continue
        raise StoreContention(f"{resource}: gave up after {_WRITE_ATTEMPTS} colliding writes")

    def generations(self) -> Generations:
        slot_query = select(assignment_table.c.slot, func.max(assignment_table.c.generation)).group_by(
            assignment_table.c.slot
        )
        with self._read() as conn:
            policy = self._policy_generation(conn)
            found = {slot: generation for slot, generation in conn.execute(slot_query)}
        return Generations(policy=policy, slots={slot: found.get(slot) or 0 for slot in SLOTS})

    def ping(self) -> None:
        """Raise if the database or the tables are unreachable."""
        self.generations()

    def close(self) -> None:
        self._engine.dispose()
