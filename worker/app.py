"""The runtime context handed down explicitly: config, database and clock."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from worker import db
from worker.config import Clock, Config


@dataclass
class App:
    """Everything a command or the worker needs; built once at the entry point."""

    config: Config
    engine: Engine
    sessions: sessionmaker[Session]
    now: Clock

    @classmethod
    def open(cls, config: Config, clock: Clock, *, migrate: bool = True) -> App:
        """Connect to the configured database, upgrading the schema when that is safe.

        DatabaseUrlError for a URL twoway cannot use, DatabaseError when the database
        cannot be reached, opened or used as it is (see `db.open_engine`)."""
        engine = db.open_engine(config.database, busy_timeout=config.workers.busy_timeout)
        if migrate:
            db.ensure_schema(engine)
        return cls(config, engine, db.session_factory(engine), clock)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: committed when the block ends, rolled back on error."""
        with db.transaction(self.sessions) as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()
