"""Database engines shared by the control plane's store and the rollout controller's store.

Portable SQLAlchemy Core. SQLite gets connection-level setup (WAL, busy timeout, BEGIN IMMEDIATE for writes) so
that the gateway, the slots, the controller and the API can share one file; Postgres gets a pre-ping pool so a
restarted server does not poison it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

SQLITE_BUSY_TIMEOUT_MS = 10_000
# Execution option a writer sets on its connection: on SQLite its transaction starts with BEGIN IMMEDIATE.
WRITE_OPTION = "control_plane_write"


def _configure_sqlite(engine: Engine) -> None:
    """Let several processes share the file: WAL (readers never block the writer), a busy timeout, and
    BEGIN IMMEDIATE for writes so a writer takes the lock before reading the current generation instead of
    failing at COMMIT with a stale snapshot."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (see _on_begin)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")  # safe with WAL; durable across process crashes
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)  # a restarted Postgres must not poison the pool
    database = parsed.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
    _configure_sqlite(engine)
    return engine


def create_tables(engine: Engine, metadata: MetaData) -> None:
    """Create the tables of ``metadata`` that do not exist yet."""
    try:
        metadata.create_all(engine)
    except (OperationalError, ProgrammingError, IntegrityError):
        # Another process created them between our existence check and CREATE (Postgres reports that as a
        # unique violation in its catalog); the retry sees them.
        metadata.create_all(engine)


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn, conn.begin():
        yield conn


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that writes: on SQLite it takes the write lock at BEGIN (see `_configure_sqlite`)."""
    with engine.connect() as conn:
        conn.execution_options(**{WRITE_OPTION: True})
        with conn.begin():
            yield conn
