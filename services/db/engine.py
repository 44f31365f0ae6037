"""Engines and sessions for PostgreSQL (psycopg 3) and SQLite. Nothing is cached here: callers own them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

SQLITE_BUSY_TIMEOUT_MS = 5_000


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_file(database: str | None) -> Path | None:
    """The file behind a SQLite URL's database part, or None for an in-memory database."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")  # stays "memory" for an in-memory database
        cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL, far fewer fsyncs
    finally:
        cursor.close()


PG_CONNECT_TIMEOUT_S = 10


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; ``kwargs`` go to :func:`sqlalchemy.create_engine`.

    SQLite: the database file's folder is created, every connection enforces foreign keys, uses
    WAL and waits up to 5 s for a lock, and may be used from several threads (the pool hands each
    connection to one thread at a time). PostgreSQL: connections are checked before use, so a
    restarted server costs one reconnect instead of an error, a connection attempt gives up after
    ``PG_CONNECT_TIMEOUT_S``, and one that waits on a server gone silent after three times that.
    """
    parsed = make_url(url)
    if issubclass(kwargs.get("poolclass") or parsed.get_dialect().get_pool_class(parsed), QueuePool):
        # No pooled connection free (in `coilguard up` the API shares the worker's engine): give up as soon as a
        # connect would, so that the worker's retry sees a stop within a pod's grace period, not after
        # SQLAlchemy's 30 s. Other pools (NullPool for the migrations, an in-memory SQLite's) have no such wait.
        kwargs.setdefault("pool_timeout", PG_CONNECT_TIMEOUT_S)
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_file(parsed.database)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"check_same_thread": False, **kwargs.pop("connect_args", {})}
        engine = create_engine(parsed, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    # A server that vanishes without a word (a lost node, a firewall dropping packets) must cost seconds, not the
    # minutes of the system's TCP defaults: a connection attempt gives up, an idle connection is found dead by
    # keepalives, and one waiting for an answer gives up after tcp_user_timeout. Libpq settings in the URL win.
    defaults = {
        "connect_timeout": PG_CONNECT_TIMEOUT_S,
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "tcp_user_timeout": PG_CONNECT_TIMEOUT_S * 3 * 1000,  # milliseconds
    }
    connect_args = {
        **{key: value for key, value in defaults.items() if key not in parsed.query},
        **kwargs.pop("connect_args", {}),
    }
    return create_engine(parsed, connect_args=connect_args, **kwargs)


@contextmanager
def engine_for(url: str, engine: Engine | None = None) -> Iterator[Engine]:
    """``engine`` when the caller has one (and disposes of it), else a new one for ``url``, disposed of on the
    way out: a job that runs every few minutes would otherwise leave its idle pooled connections open on the
    server until the garbage collector happened to close them."""
    if engine is not None:
        yield engine
        return
    owned = make_engine(url)
    try:
        yield owned
    finally:
        owned.dispose()


def session_factory(engine: Engine, **kwargs: Any) -> sessionmaker[Session]:
    """A ``sessionmaker`` bound to ``engine``. Objects stay readable after commit (``expire_on_commit=False``)."""
    kwargs.setdefault("expire_on_commit", False)
    return sessionmaker(bind=engine, **kwargs)
