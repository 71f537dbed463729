"""Where the bench's stores live: SQLite files in its temporary directory, or throwaway
databases on a PostgreSQL server (``bench --db``), created per step and dropped at the end."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

from sqlalchemy import URL, create_engine, text

from .db import parse_url
from .errors import StoreError, driver_message, safe_url


class SQLiteTarget:
    backend = "sqlite"

    def __init__(self, tmp: Path):
        self.tmp = tmp

    def describe(self) -> str:
        return f"SQLite {sqlite3.sqlite_version} files in {self.tmp.parent}"

    def create(self, name: str) -> str:
        return f"sqlite:///{self.tmp / (name + '.db')}"

    def drop(self, name: str) -> None:
        for suffix in (".db", ".db-wal", ".db-shm"):
            (self.tmp / (name + suffix)).unlink(missing_ok=True)

    def close(self) -> None:
        pass


class PostgresTarget:
    """Throwaway databases on the server of ``url`` (whose own database is only connected to)."""

    backend = "postgresql"

    def __init__(self, url: URL):
        self.url = url  # (db.parse_url: with its driver)
        self.prefix = f"wis_bench_{uuid.uuid4().hex[:10]}"
        self.created: list[str] = []
        self.admin = create_engine(self.url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 10})
        try:
            with self.admin.connect() as conn:
                self.version = conn.execute(text("SHOW server_version")).scalar_one()
        except Exception as exc:  # any failure to connect is the user's to fix
            self.admin.dispose()
            raise StoreError(f"cannot connect to {safe_url(self.url)}: {_first_line(exc)}") from exc

    def describe(self) -> str:
        return (f"PostgreSQL {self.version.split()[0]} on the server of {safe_url(self.url)} "
                f"(throwaway databases {self.prefix}_*)")

    def create(self, name: str) -> str:
        database = f"{self.prefix}_{name}"
        try:
            with self.admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{database}"'))
        except Exception as exc:  # e.g. no CREATEDB privilege
            raise StoreError(f"cannot create database {database} (the role needs CREATEDB): "
                             f"{_first_line(exc)}") from exc
        self.created.append(database)
        return self.url.set(database=database).render_as_string(hide_password=False)

    def drop(self, name: str) -> None:
        database = f"{self.prefix}_{name}"
        if database in self.created:
            with self.admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
            self.created.remove(database)

    def close(self) -> None:
        try:
            for database in list(self.created):
                self.drop(database.removeprefix(self.prefix + "_"))
        finally:
            self.admin.dispose()


def _first_line(exc: BaseException) -> str:
    return driver_message(getattr(exc, "orig", None) or exc)


def target(db: str | None, tmp: Path):
    if db is None:
        return SQLiteTarget(tmp)
    url = parse_url(db)
    if url.get_backend_name() != "postgresql":
        raise StoreError(f"bench --db takes a PostgreSQL URL (got {safe_url(url)}); "
                         "without --db the bench runs on SQLite files in --workdir")
    return PostgresTarget(url)
