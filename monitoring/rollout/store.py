"""Durable state for the rollout controller, kept in the control plane's database (any SQLAlchemy URL).

Four tables, all prefixed ``rollout_``:

* ``rollout_rollouts``: one row per rollout: the plan and the latest :class:`RolloutState` (as JSON), plus the
  columns needed to query them (model, status, version). ``active_model`` holds the model name while the rollout
  is not terminal and NULL once it is; a unique constraint on it is what guarantees, on any database and against
  racing processes, at most one active rollout per model.
* ``rollout_pending_actions``: the actions of the latest transition that the driver has not executed yet, by
  their index in the list handed to :meth:`RolloutStore.save`. The driver executes them in order and calls
  :meth:`RolloutStore.complete_action` after each; a restarted driver re-runs only the ones left (the actions are
  idempotent, so re-running the one in flight at crash time is harmless).
* ``rollout_decisions``: the decision log, one row per ``RecordDecision``, written by ``save`` in the same
  transaction as the state, so a transition and its record cannot be separated.
* ``rollout_leases``: named leases (holder + expiry) so that only one controller acts at a time.
* ``rollout_analyses``: every analysis the controller took (pass, fail or inconclusive) with each guardrail's
  values, like an Argo AnalysisRun's measurements. An analysis that causes a transition is written by ``save``
  in the same transaction as the state and its decision; one that changes nothing by ``record_analysis``.
* ``rollout_deliveries`` and ``rollout_delivery_attempts``: the hook outbox. A notification is queued here
  (once per decision and hook, by its key) before the driver marks the decision's action done, and a
  background sender delivers it with retries, recording every attempt; gating hooks' calls are recorded too.

Optimistic concurrency: ``save`` updates the rollout only where the stored version is the one the caller read
(``UPDATE ... WHERE version = :expected``) and raises :class:`StaleState` otherwise, so two controllers can never
both apply a transition. Leases are taken with a conditional ``UPDATE`` (free, expired, or already ours) and, when
no row exists yet, an ``INSERT`` that the primary key lets only one racer win; both in one write transaction.

Portable SQLAlchemy Core only; the engine (SQLite: WAL, busy timeout, ``BEGIN IMMEDIATE`` for writes) comes from
the control-plane store so the two stores share a file the same way.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Double,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from core.db import create_tables, make_engine, read_transaction, write_transaction
from monitoring.rollout.state_machine import (
    Action,
    AnalysisResult,
    RecordDecision,
    RolloutPlan,
    RolloutState,
    action_from_dict,
    action_to_dict,
)
from monitoring.rollout.verdicts import combine_verdicts

__all__ = [
    "ActiveRolloutExists",
    "RolloutExists",
    "RolloutStore",
    "RolloutStoreError",
    "StaleState",
    "UnknownRollout",
]

MAX_ID_CHARS = 256

metadata = MetaData()
PRUNE_CHUNK = 500  # rollout ids per DELETE when analyses are pruned

rollouts_table = Table(
    "rollout_rollouts",
    metadata,
    Column("rollout_id", String(MAX_ID_CHARS), primary_key=True),
    Column("model_name", String(MAX_ID_CHARS), nullable=False),
    # The model name while the rollout is active, NULL once terminal: unique, so one active rollout per model.
    Column("active_model", String(MAX_ID_CHARS), nullable=True, unique=True),
    Column("challenger_version", String(MAX_ID_CHARS), nullable=False),
    Column("champion_version", String(MAX_ID_CHARS), nullable=False),
    Column("status", String(32), nullable=False),
    Column("phase_index", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("decided", Boolean, nullable=False),
    Column("reason", Text, nullable=True),
    Column("plan", Text, nullable=False),
    Column("state", Text, nullable=False),
    # The rollout spec this rollout runs under (JSON of the validated spec), when it was given one of its own at
    # start; NULL: the controller's spec.
    Column("spec", Text, nullable=True),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Index("ix_rollout_rollouts_model_name", "model_name"),
)

pending_table = Table(
    "rollout_pending_actions",
    metadata,
    Column("rollout_id", String(MAX_ID_CHARS), primary_key=True),
    Column("idx", Integer, primary_key=True, autoincrement=False),
    Column("state_version", Integer, nullable=False),  # the transition that emitted the action
    Column("action", Text, nullable=False),
)

decisions_table = Table(
    "rollout_decisions",
    metadata,
    Column("rollout_id", String(MAX_ID_CHARS), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("at", Double, nullable=False),
    Column("from_status", String(32), nullable=False),
    Column("to_status", String(32), nullable=False),
    Column("phase_index", Integer, nullable=False),
    Column("state_version", Integer, nullable=False),
    Column("action_summary", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("metrics", Text, nullable=False),
)

analyses_table = Table(
    "rollout_analyses",
    metadata,
    Column("rollout_id", String(MAX_ID_CHARS), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("at", Double, nullable=False),
    Column("phase_index", Integer, nullable=False),
    Column("samples", Integer, nullable=False),
    Column("verdict", String(32), nullable=False),  # the combined verdict: pass, fail or inconclusive
    Column("verdicts", Text, nullable=False),
    Column("values", Text, nullable=False),
    # What was judged: the log window, and for a replay the requests asked for, found and replayed (JSON).
    Column("window", Text, nullable=True),
    Column("state_version", Integer, nullable=False),  # the rollout's version once this analysis was applied
    Column("transition", Boolean, nullable=False),  # whether it caused a transition (saved with it)
)

deliveries_table = Table(
    "rollout_deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(MAX_ID_CHARS * 2), nullable=False, unique=True),
    Column("rollout_id", String(MAX_ID_CHARS), nullable=False),
    Column("hook", String(MAX_ID_CHARS), nullable=False),
    Column("event", String(64), nullable=False),
    Column("url", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("status", String(16), nullable=False),  # pending, delivered, failed (gates: go, wait)
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", Double, nullable=False),
    Column("created_at", Double, nullable=False),
    Index("ix_rollout_deliveries_due", "status", "next_attempt_at"),
)

attempts_table = Table(
    "rollout_delivery_attempts",
    metadata,
    Column("delivery_id", Integer, primary_key=True, autoincrement=False),
    Column("attempt", Integer, primary_key=True, autoincrement=False),
    Column("at", Double, nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("duration_s", Double, nullable=False),
)

leases_table = Table(
    "rollout_leases",
    metadata,
    Column("name", String(MAX_ID_CHARS), primary_key=True),
    Column("holder", String(MAX_ID_CHARS), nullable=False),
    Column("expires_at", Double, nullable=False),
)


class RolloutStoreError(Exception):
    """Base class of the store's refusals."""


class RolloutExists(RolloutStoreError):
    def __init__(self, rollout_id: str) -> None:
        super().__init__(f"rollout {rollout_id!r} already exists")
        self.rollout_id = rollout_id


class ActiveRolloutExists(RolloutStoreError):
    """The model already has a rollout that has not finished."""

    def __init__(self, model_name: str, active_rollout_id: str) -> None:
        super().__init__(f"model {model_name!r} already has an active rollout: {active_rollout_id!r}")
        self.model_name = model_name
        self.active_rollout_id = active_rollout_id


class StaleState(RolloutStoreError):
    """Compare-and-set lost: the rollout moved on since the caller read version ``expected``."""

    def __init__(self, rollout_id: str, expected: int, current: int) -> None:
        super().__init__(f"rollout {rollout_id!r}: expected version {expected}, current is {current}")
        self.rollout_id = rollout_id
        self.expected = expected
        self.current = current


class UnknownRollout(RolloutStoreError, KeyError):
    def __init__(self, rollout_id: object) -> None:
        super().__init__(rollout_id)
        self.rollout_id = rollout_id

    def __str__(self) -> str:  # KeyError's default quotes the repr
        return f"unknown rollout {self.rollout_id!r}"


def _check_name(field: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ID_CHARS:
        raise ValueError(f"{field} must be a non-empty string of at most {MAX_ID_CHARS} characters, got {value!r}")
    return value


def _check_time(field: str, value: object, *, positive: bool = False) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{field} must be > 0, got {value!r}")
    return float(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _state_columns(state: RolloutState, model_name: str) -> dict[str, Any]:
    return {
        "active_model": None if state.terminal else model_name,
        "status": state.status,
        "phase_index": state.phase_index,
        "version": state.version,
        "decided": state.decided,
        "reason": state.reason,
        "state": _dumps(state.to_dict()),
        "updated_at": time.time(),
    }


class RolloutStore:
    """Thread-safe (one pooled connection per call); share one instance per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine = make_engine(url)
        create_tables(self._engine, metadata)
        self._add_new_columns()

    def _add_new_columns(self) -> None:
        """Columns added after a table was first created (nullable, so old rows stay valid): a database made by
        an earlier version gets them with ``ALTER TABLE ... ADD COLUMN``, which SQLite and PostgreSQL both take."""
        inspector = inspect(self._engine)
        preparer = self._engine.dialect.identifier_preparer
        for table in metadata.sorted_tables:
            present = {column["name"] for column in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in present or not column.nullable:
                    continue
                kind = column.type.compile(dialect=self._engine.dialect)
                statement = f"ALTER TABLE {preparer.quote(table.name)} ADD COLUMN {preparer.quote(column.name)} {kind}"
                try:
                    with self._engine.begin() as conn:
                        conn.execute(text(statement))
                except (OperationalError, ProgrammingError):  # another process added it first
                    pass

    def close(self) -> None:
        self._engine.dispose()

    def _read(self) -> AbstractContextManager[Connection]:
        return read_transaction(self._engine)

    def _write(self) -> AbstractContextManager[Connection]:
        return write_transaction(self._engine)

    # -- rollouts -----------------------------------------------------------------------------------------------

    @staticmethod
    def _active(conn: Connection, model_name: str) -> str | None:
        query = select(rollouts_table.c.rollout_id).where(rollouts_table.c.active_model == model_name)
        return conn.execute(query).scalar_one_or_none()

    @staticmethod
    def _exists(conn: Connection, rollout_id: str) -> bool:
        query = select(rollouts_table.c.rollout_id).where(rollouts_table.c.rollout_id == rollout_id)
        return conn.execute(query).first() is not None

    def create(self, plan: RolloutPlan, state: RolloutState, spec: dict[str, Any] | None = None) -> None:
        """Store a new rollout (with ``spec``, the rollout spec of its own, if given). Raises RolloutExists, or
        ActiveRolloutExists when its model has an active one."""
        rollout_id = _check_name("rollout_id", plan.rollout_id)
        _check_name("model_name", plan.model_name)
        if state.rollout_id != rollout_id:
            raise ValueError(f"state is for rollout {state.rollout_id!r}, plan for {rollout_id!r}")
        now = time.time()
        row = {
            "rollout_id": rollout_id,
            "model_name": plan.model_name,
            "challenger_version": plan.challenger_version,
            "champion_version": plan.champion_version,
            "plan": _dumps(plan.to_dict()),
            "spec": None if spec is None else _dumps(spec),
            "created_at": now,
            **_state_columns(state, plan.model_name),
        }
        try:
            with self._write() as conn:
                self._refuse_duplicate(conn, plan, state)
                conn.execute(insert(rollouts_table).values(**row))
        except IntegrityError:
            # Lost a race (a database without BEGIN IMMEDIATE): say which constraint the winner took.
            with self._read() as conn:
                self._refuse_duplicate(conn, plan, state)
            raise

    def _refuse_duplicate(self, conn: Connection, plan: RolloutPlan, state: RolloutState) -> None:
        if self._exists(conn, plan.rollout_id):
            raise RolloutExists(plan.rollout_id)
        active = None if state.terminal else self._active(conn, plan.model_name)
        if active is not None:
            raise ActiveRolloutExists(plan.model_name, active)

    def get(self, rollout_id: str) -> tuple[RolloutPlan, RolloutState, list[Action]]:
        """The plan, the latest state and the actions not yet completed, in order."""
        with self._read() as conn:
            row = conn.execute(
                select(rollouts_table.c.plan, rollouts_table.c.state).where(rollouts_table.c.rollout_id == rollout_id)
            ).first()
            if row is None:
                raise UnknownRollout(rollout_id)
            pending = self._pending(conn, rollout_id)
        plan = RolloutPlan.from_dict(json.loads(row.plan))
        state = RolloutState.from_dict(json.loads(row.state))
        return plan, state, [action for _, action in pending]

    def spec_of(self, rollout_id: str) -> dict[str, Any] | None:
        """The rollout spec the rollout was started with (a mapping), or None: it runs under the controller's."""
        with self._read() as conn:
            row = conn.execute(select(rollouts_table.c.spec).where(rollouts_table.c.rollout_id == rollout_id)).first()
        if row is None:
            raise UnknownRollout(rollout_id)
        return None if row.spec is None else json.loads(row.spec)

    def active(self, model_name: str) -> str | None:
        """The id of the model's non-terminal rollout, if any."""
        with self._read() as conn:
            return self._active(conn, model_name)

    def list_rollouts(self, limit: int = 50, model_name: str | None = None) -> list[dict[str, Any]]:
        """Summaries, newest first."""
        pending_count = (
            select(func.count())
            .select_from(pending_table)
            .where(pending_table.c.rollout_id == rollouts_table.c.rollout_id)
            .scalar_subquery()
        )
        c = rollouts_table.c
        query = select(
            c.rollout_id,
            c.model_name,
            c.challenger_version,
            c.champion_version,
            c.status,
            c.phase_index,
            c.version,
            c.decided,
            c.reason,
            c.created_at,
            c.updated_at,
            (c.active_model.is_not(None)).label("active"),
            pending_count.label("pending_actions"),
        )
        if model_name is not None:
            query = query.where(c.model_name == model_name)
        query = query.order_by(c.created_at.desc(), c.rollout_id.desc()).limit(max(0, limit))
        with self._read() as conn:
            rows = [dict(row._mapping) for row in conn.execute(query)]
        for row in rows:
            row["decided"] = bool(row["decided"])
            row["active"] = bool(row["active"])
        return rows

    def save(
        self,
        rollout_id: str,
        new_state: RolloutState,
        pending_actions: list[Action],
        expected_version: int,
        analysis: AnalysisResult | None = None,
    ) -> None:
        """Write a transition: the new state, its actions (replacing any not completed: the new transition
        supersedes them), its decisions and the analysis that caused it (if any), atomically, and only if the
        stored version is ``expected_version`` (else StaleState, and nothing changes)."""
        if new_state.rollout_id != rollout_id:
            raise ValueError(f"state is for rollout {new_state.rollout_id!r}, not {rollout_id!r}")
        if not isinstance(expected_version, int) or isinstance(expected_version, bool):
            raise ValueError(f"expected_version must be an int, got {expected_version!r}")
        if new_state.version <= expected_version:
            raise ValueError(f"a transition must raise the version: {expected_version} -> {new_state.version}")
        encoded = [_dumps(action_to_dict(action)) for action in pending_actions]
        decisions = [action.decision for action in pending_actions if isinstance(action, RecordDecision)]
        try:
            with self._write() as conn:
                model_name = conn.execute(
                    select(rollouts_table.c.model_name).where(rollouts_table.c.rollout_id == rollout_id)
                ).scalar_one_or_none()
                if model_name is None:
                    raise UnknownRollout(rollout_id)
                updated = conn.execute(
                    update(rollouts_table)
                    .where(rollouts_table.c.rollout_id == rollout_id, rollouts_table.c.version == expected_version)
                    .values(**_state_columns(new_state, model_name))
                )
                if updated.rowcount != 1:
                    current = conn.execute(
                        select(rollouts_table.c.version).where(rollouts_table.c.rollout_id == rollout_id)
                    ).scalar_one()
                    raise StaleState(rollout_id, expected_version, current)
                conn.execute(delete(pending_table).where(pending_table.c.rollout_id == rollout_id))
                if encoded:
                    conn.execute(
                        insert(pending_table),
                        [
                            {"rollout_id": rollout_id, "idx": i, "state_version": new_state.version, "action": text}
                            for i, text in enumerate(encoded)
                        ],
                    )
                if decisions:
                    last = conn.execute(
                        select(func.max(decisions_table.c.seq)).where(decisions_table.c.rollout_id == rollout_id)
                    ).scalar_one_or_none()
                    first = 0 if last is None else last + 1
                    conn.execute(
                        insert(decisions_table),
                        [
                            {
                                "rollout_id": rollout_id,
                                "seq": first + i,
                                "at": d.at,
                                "from_status": d.from_status,
                                "to_status": d.to_status,
                                "phase_index": d.phase_index,
                                "state_version": new_state.version,
                                "action_summary": d.action_summary,
                                "reason": d.reason,
                                "metrics": _dumps(d.metrics),
                            }
                            for i, d in enumerate(decisions)
                        ],
                    )
                if analysis is not None:
                    self._insert_analysis(conn, rollout_id, analysis, new_state.version, transition=True)
        except IntegrityError:
            # Reactivating a terminal rollout while another one of its model is active (the state machine never
            # does this, but a hand-written state might).
            with self._read() as conn:
                model_name = conn.execute(
                    select(rollouts_table.c.model_name).where(rollouts_table.c.rollout_id == rollout_id)
                ).scalar_one()
                active = self._active(conn, model_name)
            if active is not None and active != rollout_id:
                raise ActiveRolloutExists(model_name, active) from None
            raise

    # -- pending actions ----------------------------------------------------------------------------------------

    @staticmethod
    def _pending(conn: Connection, rollout_id: str) -> list[tuple[int, Action]]:
        query = (
            select(pending_table.c.idx, pending_table.c.action)
            .where(pending_table.c.rollout_id == rollout_id)
            .order_by(pending_table.c.idx)
        )
        return [(row.idx, action_from_dict(json.loads(row.action))) for row in conn.execute(query)]

    def pending_actions(self, rollout_id: str) -> list[tuple[int, Action]]:
        """``(index, action)`` for each action of the latest transition not yet completed, in order; the index is
        the action's position in the list given to ``save``."""
        with self._read() as conn:
            if not self._exists(conn, rollout_id):
                raise UnknownRollout(rollout_id)
            return self._pending(conn, rollout_id)

    def complete_action(self, rollout_id: str, index: int, state_version: int | None = None) -> bool:
        """Mark an action done. False when it was already done (or superseded); with ``state_version``, only an
        action emitted by that transition is completed."""
        with self._write() as conn:
            if not self._exists(conn, rollout_id):
                raise UnknownRollout(rollout_id)
            query = delete(pending_table).where(pending_table.c.rollout_id == rollout_id, pending_table.c.idx == index)
            if state_version is not None:
                query = query.where(pending_table.c.state_version == state_version)
            return conn.execute(query).rowcount == 1

    # -- decision log -------------------------------------------------------------------------------------------

    def decisions(self, rollout_id: str) -> list[dict[str, Any]]:
        """Every decision recorded for the rollout, oldest first, metrics decoded."""
        c = decisions_table.c
        query = select(decisions_table).where(c.rollout_id == rollout_id).order_by(c.seq)
        with self._read() as conn:
            rows = [dict(row._mapping) for row in conn.execute(query)]
        for row in rows:
            row["metrics"] = json.loads(row["metrics"])
        return rows

    # -- analyses -----------------------------------------------------------------------------------------------

    @staticmethod
    def _insert_analysis(
        conn: Connection, rollout_id: str, result: AnalysisResult, state_version: int, *, transition: bool
    ) -> int:
        c = analyses_table.c
        last = conn.execute(select(func.max(c.seq)).where(c.rollout_id == rollout_id)).scalar_one_or_none()
        seq = 0 if last is None else last + 1
        conn.execute(
            insert(analyses_table).values(
                rollout_id=rollout_id,
                seq=seq,
                at=result.at,
                phase_index=result.phase_index,
                samples=result.samples,
                verdict=combine_verdicts(result.verdicts.values()),
                verdicts=_dumps(result.verdicts),
                values=_dumps(result.values),
                window=None if result.window is None else _dumps(result.window),
                state_version=state_version,
                transition=transition,
            )
        )
        return seq

    def record_analysis(self, rollout_id: str, result: AnalysisResult, state_version: int) -> int:
        """Record an analysis that caused no transition (inconclusive, or passing without the gates met). Its
        sequence number is returned."""
        with self._write() as conn:
            if not self._exists(conn, rollout_id):
                raise UnknownRollout(rollout_id)
            return self._insert_analysis(conn, rollout_id, result, state_version, transition=False)

    def analyses(self, rollout_id: str, after_seq: int = -1, limit: int | None = None) -> list[dict[str, Any]]:
        """The rollout's analyses with ``seq > after_seq``, oldest first (``limit``: the newest that many)."""
        c = analyses_table.c
        query = select(analyses_table).where(c.rollout_id == rollout_id, c.seq > after_seq)
        newest = limit is not None
        query = query.order_by(c.seq.desc()).limit(max(0, limit or 0)) if newest else query.order_by(c.seq)
        with self._read() as conn:
            rows = [dict(row._mapping) for row in conn.execute(query)]
        if newest:
            rows.reverse()
        for row in rows:
            row["verdicts"] = json.loads(row["verdicts"])
            row["values"] = json.loads(row["values"])
            row["window"] = None if row["window"] is None else json.loads(row["window"])
            row["transition"] = bool(row["transition"])
        return rows

    def prune_analyses(self, model_name: str, keep_rollouts: int) -> int:
        """Thin the analyses of the model's finished rollouts beyond its newest `keep_rollouts` finished ones:
        delete those that caused no transition, keep those that did (with the decision log, the evidence of every
        decision stays). Like Argo Rollouts' analysis-run history limits: without it the table grows by one row
        per look of every rollout ever run. Active rollouts are never touched. Returns the rows deleted."""
        r, c = rollouts_table.c, analyses_table.c
        finished = (
            select(r.rollout_id)
            .where(r.model_name == model_name, r.active_model.is_(None))
            .order_by(r.updated_at.desc(), r.rollout_id.desc())
            .offset(max(0, keep_rollouts))
        )
        deleted = 0
        with self._write() as conn:
            old = [row[0] for row in conn.execute(finished)]
            for start in range(0, len(old), PRUNE_CHUNK):  # bounded IN lists, whatever the database
                chunk = old[start : start + PRUNE_CHUNK]
                gone = conn.execute(delete(analyses_table).where(c.rollout_id.in_(chunk), c.transition.is_(False)))
                deleted += int(gone.rowcount or 0)
        return deleted

    def latest_analysis(self, rollout_id: str) -> AnalysisResult | None:
        rows = self.analyses(rollout_id, limit=1)
        if not rows:
            return None
        row = rows[0]
        return AnalysisResult(
            at=row["at"],
            phase_index=row["phase_index"],
            samples=row["samples"],
            verdicts=row["verdicts"],
            values=row["values"],
            window=row["window"],
        )

    # -- hook deliveries ------------------------------------------------------------------------------------

    def enqueue_delivery(
        self, key: str, rollout_id: str, hook: str, event: str, url: str, body: str, now: float, status: str = "pending"
    ) -> int | None:
        """Queue one delivery (idempotent by ``key``: a re-run of the same decision queues nothing new). Returns
        its id, or None when the key was already queued."""
        c = deliveries_table.c
        try:
            with self._write() as conn:
                if conn.execute(select(c.id).where(c.key == key)).first() is not None:
                    return None
                result = conn.execute(
                    insert(deliveries_table).values(
                        key=key,
                        rollout_id=rollout_id,
                        hook=hook,
                        event=event,
                        url=url,
                        body=body,
                        status=status,
                        attempts=0,
                        next_attempt_at=now,
                        created_at=now,
                    )
                )
                return int(result.inserted_primary_key[0])
        except IntegrityError:
            return None

    def due_deliveries(self, now: float, limit: int = 20) -> list[dict[str, Any]]:
        """Pending deliveries whose next attempt is due, oldest first."""
        c = deliveries_table.c
        query = (
            select(deliveries_table)
            .where(c.status == "pending", c.next_attempt_at <= now)
            .order_by(c.next_attempt_at, c.id)
            .limit(limit)
        )
        with self._read() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def record_attempt(
        self,
        delivery_id: int,
        at: float,
        status_code: int | None,
        error: str | None,
        duration_s: float,
        new_status: str,
        next_attempt_at: float | None = None,
    ) -> int:
        """Record one attempt of a delivery and its outcome; returns the attempt's number (1-based)."""
        c = deliveries_table.c
        with self._write() as conn:
            attempts = conn.execute(select(c.attempts).where(c.id == delivery_id)).scalar_one() + 1
            conn.execute(
                insert(attempts_table).values(
                    delivery_id=delivery_id,
                    attempt=attempts,
                    at=at,
                    status_code=status_code,
                    error=error,
                    duration_s=duration_s,
                )
            )
            values: dict[str, Any] = {"attempts": attempts, "status": new_status}
            if next_attempt_at is not None:
                values["next_attempt_at"] = next_attempt_at
            conn.execute(update(deliveries_table).where(c.id == delivery_id).values(**values))
            return attempts

    def deliveries(self, rollout_id: str) -> list[dict[str, Any]]:
        """Every delivery of the rollout's hooks with its attempts, oldest first."""
        c, a = deliveries_table.c, attempts_table.c
        with self._read() as conn:
            rows = [
                dict(row._mapping)
                for row in conn.execute(select(deliveries_table).where(c.rollout_id == rollout_id).order_by(c.id))
            ]
            ids = [row["id"] for row in rows]
            attempts: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
            if ids:
                query = select(attempts_table).where(a.delivery_id.in_(ids)).order_by(a.delivery_id, a.attempt)
                for row in conn.execute(query):
                    attempts[row.delivery_id].append(dict(row._mapping))
        for row in rows:
            row["attempt_log"] = attempts[row["id"]]
        return rows

    # -- leases -------------------------------------------------------------------------------------------------

    def acquire_lease(self, name: str, holder: str, ttl_s: float, now: float) -> bool:
        """Take or renew the lease until ``now + ttl_s``; True if it was free, expired (``expires_at <= now``) or
        already held by ``holder``. Atomic: of several racers, exactly one wins."""
        _check_name("name", name)
        _check_name("holder", holder)
        expires_at = _check_time("now", now) + _check_time("ttl_s", ttl_s, positive=True)
        c = leases_table.c
        try:
            with self._write() as conn:
                taken = conn.execute(
                    update(leases_table)
                    .where(c.name == name, (c.holder == holder) | (c.expires_at <= now))
                    .values(holder=holder, expires_at=expires_at)
                )
                if taken.rowcount == 1:
                    return True
                if conn.execute(select(c.name).where(c.name == name)).first() is not None:
                    return False  # held by someone else, unexpired
                conn.execute(insert(leases_table).values(name=name, holder=holder, expires_at=expires_at))
                return True
        except IntegrityError:
            return False  # another process inserted the first row between our check and INSERT

    def release_lease(self, name: str, holder: str) -> bool:
        """Give the lease up; False if ``holder`` did not hold it (nothing changes then)."""
        c = leases_table.c
        with self._write() as conn:
            return conn.execute(delete(leases_table).where(c.name == name, c.holder == holder)).rowcount == 1

    def lease_holder(self, name: str, now: float) -> str | None:
        """Who holds the lease at ``now`` (None when free or expired)."""
        c = leases_table.c
        with self._read() as conn:
            return conn.execute(select(c.holder).where(c.name == name, c.expires_at > now)).scalar_one_or_none()
