"""Alembic environment for coilguard (PostgreSQL and SQLite).

The database URL is, in order: ``config.attributes["url"]`` (what :mod:`services.db.migrate` sets),
``-x url=...`` on the ``alembic`` command line, the ``sqlalchemy.url`` option, and finally
``COILGUARD_DATABASE_URL`` through the project's settings. A caller may also hand over an open
connection as ``config.attributes["connection"]``; it is used as it is.

Concurrent runs (several pods starting at once) are serialized: a PostgreSQL advisory lock, or
SQLite's write lock taken at ``BEGIN IMMEDIATE``; the ones that wait then find the database at head.

On SQLite every upgrade or downgrade runs in one real transaction (SQLite has transactional DDL,
but Python's sqlite3 module would otherwise commit statement by statement), with foreign keys off
while tables are rebuilt by batch operations and checked with ``PRAGMA foreign_key_check`` before
the commit: a failed migration leaves the database as it was.
"""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection, event, pool

from services.db.engine import SQLITE_BUSY_TIMEOUT_MS, is_sqlite, make_engine
from services.db.models import Base, UtcDateTime

config = context.config
target_metadata = Base.metadata

PG_MIGRATION_LOCK = 0x636F_696C_6775_6172  # "coilguar": the advisory lock that serializes migrations
SQLITE_MIGRATION_BUSY_TIMEOUT_MS = 120_000

if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    url = (
        config.attributes.get("url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        from services.config import load_settings

        url = load_settings().database_url
    return str(url)


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Autogenerate writes ``UtcDateTime`` as the plain type it stores, so revisions do not import models."""
    if type_ == "type" and isinstance(obj, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def configure_options(sqlite: bool) -> dict[str, Any]:
    return {
        "target_metadata": target_metadata,
        "render_item": render_item,
        "render_as_batch": sqlite,  # SQLite cannot ALTER most things: rebuild the table instead
        "compare_type": True,
        # Server defaults are compared on PostgreSQL, where revisions should be generated; SQLite has no
        # identity columns and would ask for them on every run.
        "compare_server_default": not sqlite,
    }


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: print the SQL instead of running it."""
    url = database_url()
    context.configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **configure_options(is_sqlite(url)),
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(connection=connection, **configure_options(connection.dialect.name == "sqlite"))
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Several pods may run `coilguard db upgrade` at once: one migrates, the others wait for
            # its commit and then find the database at head (the version is read after the lock).
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})")
        context.run_migrations()


def _begin_sqlite(conn: Connection) -> None:
    # IMMEDIATE takes the write lock now, so a second migrating process waits here (busy_timeout)
    # instead of failing when it tries to write after reading.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _run_sqlite(connection: Connection) -> None:
    dbapi = connection.connection.driver_connection
    assert dbapi is not None
    dbapi.isolation_level = None  # we say BEGIN ourselves, so that DDL is inside the transaction
    dbapi.execute("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction: before BEGIN
    dbapi.execute(f"PRAGMA busy_timeout={SQLITE_MIGRATION_BUSY_TIMEOUT_MS}")
    event.listen(connection, "begin", _begin_sqlite)
    try:
        with connection.begin():  # Alembic sees an outer transaction and runs everything inside it
            _run(connection)
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"migration would leave rows that break foreign keys: {broken[:10]}")
    finally:
        event.remove(connection, "begin", _begin_sqlite)
        dbapi.execute("PRAGMA foreign_keys=ON")
        dbapi.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        dbapi.isolation_level = ""


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if given is not None:
        _run(given)
        return
    engine = make_engine(database_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                _run_sqlite(connection)
            else:
                _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
