"""Engine, sessions and migrations. Nothing here runs at import time."""

from __future__ import annotations

import functools
import itertools
import logging
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple

from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    Select,
    Update,
    bindparam,
    create_engine,
    event,
    insert,
    inspect,
    update,
)
from sqlalchemy.engine import URL, CursorResult, Dialect, make_url
from sqlalchemy.exc import DBAPIError, MultipleResultsFound, NoResultFound, NoSuchModuleError
from sqlalchemy.orm import Session, make_transient_to_detached, sessionmaker

logger = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
_Ts = TypeVarTuple("_Ts")


class DatabaseError(Exception):
    """The database cannot be used as it is (unreachable, or behind on migrations)."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached or written just now: locked by another process past
    the busy timeout, disk full, connection lost, server shutting down.

    A temporary failure of the pass, never a property of the message in flight: the
    caller rolls back, leaves the mailbox progress where it is and retries with backoff.
    """


class DatabaseUrlError(ValueError):
    """The database URL is not one twoway can use: not a URL, not SQLite or PostgreSQL, or
    a driver that is not installed. Bad input (exit 2), never worth a retry."""


BACKENDS = ("sqlite", "postgresql")
PG_CONNECT_TIMEOUT = 10
"""Seconds to wait for a PostgreSQL server that does not answer (the URL's own
`connect_timeout` wins): a host that drops packets is reported, not waited on for minutes."""


def redact(url: str) -> str:
    """`url` with its password written as `***`, for messages and logs (also when it does
    not parse: whatever stands between `user:` and `@` is hidden)."""
    try:
        return make_url(url).render_as_string(hide_password=True)[:300]
    except Exception:  # not a URL for SQLAlchemy: hide the userinfo by hand
        pass
    scheme, sep, rest = url.partition("://")
    body = rest if sep else scheme
    authority, slash, path = body.partition("/")
    if "@" in authority:
        userinfo, _, host = authority.rpartition("@")
        if ":" in userinfo:
            authority = f"{userinfo.split(':', 1)[0]}:***@{host}"
    shown = (f"{scheme}://" if sep else "") + authority + slash + path
    return shown[:300]


def parse_url(url: str) -> URL:
    """The parsed database URL, or DatabaseUrlError saying why twoway cannot use it."""
    try:
        u = make_url(url)
    except Exception:  # ArgumentError, or ValueError for a bad port
        raise DatabaseUrlError(
            f"bad database URL {redact(url)!r}: not a URL "
            "(expected sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/NAME)"
        ) from None
    if u.get_backend_name() not in BACKENDS:
        raise DatabaseUrlError(
            f"bad database URL {redact(url)!r}: twoway works with sqlite and postgresql, "
            f"not {u.get_backend_name()}"
        )
    if u.get_backend_name() == "postgresql" and u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    try:
        u.get_dialect().import_dbapi()
    except (ImportError, NoSuchModuleError):  # a driver that is not installed, or unknown
        raise DatabaseUrlError(
            f"bad database URL {u.render_as_string(hide_password=True)!r}: driver "
            f"{u.drivername} is not installed (use sqlite:/// or postgresql+psycopg://)"
        ) from None
    return u


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a database URL (for `config check`), or None when it can."""
    try:
        parse_url(url)
    except DatabaseUrlError as e:
        return str(e)
    return None


def cannot_open(url: str | URL, exc: BaseException) -> DatabaseError:
    """`exc`, raised while connecting to `url`, as one line for people: the database with
    its password hidden, and the driver's reason without SQLAlchemy's decoration."""
    u = url if isinstance(url, URL) else None
    shown = u.render_as_string(hide_password=True) if u is not None else redact(str(url))
    orig = getattr(exc, "orig", None) or exc
    if isinstance(orig, OSError) and orig.strerror:
        reason = f"{orig.strerror}: {orig.filename}" if orig.filename else orig.strerror
    else:
        lines = [ln.strip() for ln in str(orig).strip().splitlines() if ln.strip()]
        reason = "; ".join(lines[:2])[:300] if lines else orig.__class__.__name__
    if u is not None and u.password:
        reason = reason.replace(str(u.password), "***")
    if u is not None and u.get_backend_name() == "sqlite" and "unable to open" in reason:
        folder = Path(u.database or ".").parent
        reason += f" (is {folder} a folder this user can write to?)"
    err = DatabaseError(f"cannot open the database {shown}: {reason}")
    err.__cause__ = exc
    return err


# SQLite result texts of conditions outside any one statement (sqlite3 has no codes
# before Python 3.11's sqlite_errorcode, and wrapped errors lose them).
_SQLITE_TEMPORARY = (
    "database is locked",
    "database table is locked",
    "database schema is locked",
    "database or disk is full",
    "disk i/o error",
    "unable to open database file",
    "attempt to write a readonly database",
)
# PostgreSQL SQLSTATE classes and codes that describe the server, not the statement:
# 08 connection, 53 insufficient resources (disk full, out of memory, too many
# connections), 57P operator intervention (shutdown, crash recovery), 40 serialization
# failure and deadlock (retry the transaction), 55P03 lock not available.
_PG_TEMPORARY_PREFIXES = ("08", "53", "57P", "40", "55P03")


def as_unavailable(exc: BaseException) -> DatabaseUnavailable:
    """`exc` (for which `is_unavailable` holds) as a DatabaseUnavailable for people."""
    if isinstance(exc, DatabaseUnavailable):
        return exc
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    detail = lines[0][:300] if lines else orig.__class__.__name__
    err = DatabaseUnavailable(f"the database is unavailable: {detail}")
    err.__cause__ = exc
    return err


def is_conflict(exc: BaseException) -> bool:
    """Whether `exc` is a deadlock or serialization failure (SQLSTATE 40P01, 40001): the
    transaction collided with another worker's and may simply be tried again."""
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, DBAPIError):
        code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        return code in ("40P01", "40001")
    return False


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database is unavailable now rather than that the statement
    is wrong (see DatabaseUnavailable). Walks the cause chain."""
    from sqlalchemy.exc import DBAPIError

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DatabaseUnavailable):
            return True
        if isinstance(e, DBAPIError):
            if e.connection_invalidated:
                return True
            orig = e.orig
            code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
            if isinstance(code, str) and code.startswith(_PG_TEMPORARY_PREFIXES):
                return True
            text = str(orig).lower()
            lost = "connection" in text and any(w in text for w in ("refused", "lost", "closed"))
            if e.__class__.__name__ in ("OperationalError", "InterfaceError") and (
                lost or any(t in text for t in _SQLITE_TEMPORARY)
            ):
                return True
        e = e.__cause__ or e.__context__
    return False


def open_engine(url: str, *, busy_timeout: float = 30.0) -> Engine:
    """An engine for `url` that has just connected once, or DatabaseUrlError (bad URL) or
    DatabaseError (the database cannot be reached or opened), each one line for people.

    Every command opens its database here (through `App.open`), so each says the same.
    """
    engine = make_engine(url, busy_timeout=busy_timeout)
    try:
        with engine.connect():
            pass
    except Exception as e:  # connection failures come in many driver-specific types
        engine.dispose()
        raise cannot_open(engine.url, e) from e
    return engine


def make_engine(url: str, *, busy_timeout: float = 30.0) -> Engine:
    """An engine for `url` (not connected yet); SQLite gets WAL, foreign keys and a busy
    timeout (seconds a statement waits for another process's lock before failing).
    DatabaseUrlError when the URL is not one twoway can use."""
    u = parse_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            try:
                Path(u.database).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise cannot_open(u, e) from e
        busy_ms = max(1, int(busy_timeout * 1000))
        engine = create_engine(u, connect_args={"timeout": busy_timeout})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy own BEGIN so a transaction is one unit of work.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock up front: no deadlock-prone lock upgrades.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    args = {} if "connect_timeout" in u.query else {"connect_timeout": PG_CONNECT_TIMEOUT}
    return create_engine(u, connect_args=args, pool_pre_ping=True)


# The tables whose plans depend on their size; small ones (mailbox_state, leases) are not.
_GROWING = ("leads", "enrollments", "outbound_messages", "inbound_messages", "lead_events")


def refresh_statistics(engine: Engine) -> None:
    """Give the query planner fresh table statistics (after an import, and periodically).

    SQLite has none unless ANALYZE runs; `analysis_limit` bounds the work to a sample of
    each index (well under a second at a million leads). PostgreSQL's autovacuum keeps
    them up to date in steady state; right after a bulk import it may lag, so ANALYZE
    the growing tables then (a sample of each, whatever its size). Failures are logged
    and ignored: statistics are an optimisation, never a reason to fail a command.
    """
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                conn.exec_driver_sql("PRAGMA analysis_limit=1000")
                conn.exec_driver_sql("ANALYZE")
                conn.exec_driver_sql("PRAGMA optimize")
            else:
                conn.exec_driver_sql("ANALYZE " + ", ".join(_GROWING))
            conn.commit()
    except Exception as e:  # optimisation only; the next refresh tries again
        logger.warning("could not refresh the database statistics: %s", e)


def core(session: Session) -> Connection:
    """The session's connection, for a prebuilt Core statement: without the ORM's
    per-statement machinery, after the flush the ORM would do before it (unless the
    caller turned autoflush off, as the inbound lifecycle does)."""
    if session.autoflush:
        session.flush()
    return session.connection()


@functools.cache
def _for_driver(
    stmt: Insert | Update | Select[Any], dialect: Dialect
) -> tuple[str, Callable[[Mapping[str, Any]], Any]] | None:
    """`stmt` as the driver's SQL, and how to turn its parameters into the driver's:
    what SQLAlchemy does on every execution (the statement's cache key, the compiled
    cache, an execution context for ORM-aware results), done once. None for a statement
    that needs SQLAlchemy at each execution: a list (expanding) parameter, or a column
    default computed in Python."""
    compiled = stmt.compile(dialect=dialect)
    binds = compiled.bind_names  # each parameter and its name in the SQL
    if any(bind.expanding for bind in binds) or compiled.insert_prefetch:
        return None
    defaults = {name: bind.effective_value for bind, name in binds.items() if not bind.required}
    processors = {
        name: proc
        for bind, name in binds.items()
        if (proc := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
    }
    names = {name: compiled.escaped_bind_names.get(name, name) for name in binds.values()}
    order = compiled.positiontup
    # qmark / numeric drivers (sqlite3): the values in the SQL's order, as a tuple
    in_order = None if order is None else _tuple_getter(order)

    def params(values: Mapping[str, Any]) -> Any:
        merged = {**defaults, **values} if defaults else dict(values)
        for key, proc in processors.items():
            if key in merged:
                merged[key] = proc(merged[key])
        if in_order is not None:
            return in_order(merged)
        return {escaped: merged[key] for key, escaped in names.items()}  # (extra keys ignored)

    return compiled.string, params


def _tuple_getter(keys: Sequence[str]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """A mapping's values at `keys`, as a tuple (operator.itemgetter, whatever their number)."""
    if len(keys) == 1:
        key = keys[0]
        return lambda m: (m[key],)
    if not keys:
        return lambda m: ()
    return operator.itemgetter(*keys)


class DriverResult:
    """What `run` returns: the rows of a RETURNING (the driver's raw values) and the row
    count, with the few CursorResult methods the inbound and send paths use."""

    __slots__ = ("_rows", "returns_rows", "rowcount")

    def __init__(self, rows: Sequence[Any], returns_rows: bool, rowcount: int) -> None:
        self._rows, self.returns_rows = rows, returns_rows
        self.rowcount = len(rows) if returns_rows else rowcount

    def all(self) -> list[Any]:
        return list(self._rows)

    def one(self) -> Any:
        if len(self._rows) != 1:
            raise MultipleResultsFound() if self._rows else NoResultFound()
        return self._rows[0]

    def scalars(self) -> Iterator[Any]:
        return (row[0] for row in self._rows)


def run(
    conn: Connection, stmt: Insert | Update | Select[Any], values: Mapping[str, Any]
) -> DriverResult | CursorResult[Any]:
    """Execute a prebuilt INSERT or UPDATE of the inbound path (run for most messages):
    compiled once per dialect and sent on the driver's own cursor. SQLAlchemy's own
    execution costs more than the statement here (for an INSERT ... RETURNING, the
    result's metadata is built again at every execution); what it does around the
    statement is kept: the connection's transaction begun, the engine's cursor events
    fired (statement counts and captures see it), a driver error raised as SQLAlchemy's
    (IntegrityError, OperationalError...) with the connection invalidated on a
    disconnect. The rows are the driver's raw values, so this is for DML whose
    RETURNING, if any, names integer columns."""
    prebuilt = _for_driver(stmt, conn.dialect)
    if prebuilt is None:
        return conn.execute(stmt, values)
    sql, params = prebuilt
    return _on_cursor(conn, sql, params(values))


def fetch(conn: Connection, stmt: Select[*_Ts], values: Mapping[str, Any]) -> list[tuple[*_Ts]]:
    """The rows of a prebuilt SELECT run on most inbound messages, as tuples, each column
    converted as SQLAlchemy converts it (a datetime read back as one): sent as driver SQL
    by `run`, a third of the cost of SQLAlchemy's own execution of a small lookup."""
    prebuilt = _for_driver(stmt, conn.dialect)
    if prebuilt is None:
        return [row._tuple() for row in conn.execute(stmt, values)]
    sql, params = prebuilt
    rows: list[Any] = _on_cursor(conn, sql, params(values)).all()
    convert = _result_processors(stmt, conn.dialect)
    if convert:
        rows = [
            tuple(v if f is None or v is None else f(v) for f, v in zip(convert, row, strict=True))
            for row in rows
        ]
    return rows


@functools.cache
def _result_processors(stmt: Select[*tuple[Any, ...]], dialect: Dialect) -> tuple[Any, ...] | None:
    """How each selected column's driver value becomes SQLAlchemy's (None: all as they come)."""
    found = tuple(
        column.type.dialect_impl(dialect).result_processor(dialect, None)
        for column in stmt.selected_columns
    )
    return found if any(f is not None for f in found) else None


def run_many(conn: Connection, model: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """INSERT `rows` of `model` in the order given: one executemany on the driver's
    cursor per run of rows naming the same columns (what `run` is to one statement:
    SQLAlchemy's executemany builds every row's parameters through its compiled
    statement, which costs more than the driver's insert of it). The cursor events are
    fired and driver errors raised as SQLAlchemy's, as by `run`."""
    for keys, group in itertools.groupby(rows, key=lambda row: frozenset(row)):
        batch = list(group)
        stmt = _insert_columns(model, keys)
        prebuilt = _for_driver(stmt, conn.dialect)
        if prebuilt is None:
            conn.execute(stmt, batch)
            continue
        sql, params = prebuilt
        _on_cursor(conn, sql, [params(row) for row in batch], many=True)


def run_alone(
    conn: Connection, stmt: Update | Select[Any], values: Mapping[str, Any]
) -> DriverResult | CursorResult[Any]:
    """Execute one prebuilt UPDATE (or a SELECT of data-modifying CTEs, on PostgreSQL) as
    a transaction of its own, and return its result: on `conn`, which has none open, in
    the driver's autocommit mode, which commits the statement with it: SQLite takes its
    write lock at the statement's start, as BEGIN IMMEDIATE would, and PostgreSQL runs it
    in one round trip instead of three (BEGIN, the statement, COMMIT). Elsewhere, or for a statement `run` cannot prebuild, in a
    transaction begun for it. The engine's cursor events fire and driver errors are
    SQLAlchemy's, as with `run`."""
    if conn.in_transaction():
        raise RuntimeError("run_alone needs a connection with no transaction open")
    prebuilt = _for_driver(stmt, conn.dialect)
    driver = conn.connection.dbapi_connection
    name = conn.dialect.name
    if prebuilt is None or driver is None or name not in ("sqlite", "postgresql"):
        with conn.begin():
            return run(conn, stmt, values)
    sql, params = prebuilt
    if name == "sqlite":  # the driver never begins one itself here (see `connect`)
        assert getattr(driver, "isolation_level", "") is None
        return _on_cursor(conn, sql, params(values), alone=True)
    driver.autocommit = True
    try:
        return _on_cursor(conn, sql, params(values), alone=True)
    finally:
        if not conn.invalidated:
            driver.autocommit = False


def _on_cursor(
    conn: Connection, sql: str, args: Any, many: bool = False, alone: bool = False
) -> DriverResult:
    """Execute driver SQL on the connection's own cursor within its transaction (`alone`:
    with none, see `run_alone`), with the engine's cursor events and SQLAlchemy's
    handling of driver errors."""
    if not alone and not conn.in_transaction():
        conn.begin()  # as an execution would (autobegin; SQLite's BEGIN IMMEDIATE)
    dialect, fairy, dispatch = conn.dialect, conn.connection, conn.dispatch
    cursor = fairy.cursor()
    try:
        if dispatch.before_cursor_execute:
            dispatch.before_cursor_execute(conn, cursor, sql, args, None, many)
        if many:
            cursor.executemany(sql, args)
        else:
            cursor.execute(sql, args)
        returns = cursor.description is not None
        result = DriverResult(cursor.fetchall() if returns else [], returns, cursor.rowcount)
        if dispatch.after_cursor_execute:
            dispatch.after_cursor_execute(conn, cursor, sql, args, None, many)
    except dialect.loaded_dbapi.Error as e:
        lost = dialect.is_disconnect(e, fairy.dbapi_connection, cursor)
        if lost:
            conn.invalidate(e)
        raise DBAPIError.instance(
            sql, args, e, dialect.loaded_dbapi.Error, connection_invalidated=lost, dialect=dialect
        ) from e
    finally:
        cursor.close()
    return result


@functools.cache
def _insert_columns(model: Any, keys: frozenset[str]) -> Insert:
    """INSERT of the columns `keys` of the model's table, built once per set of columns."""
    return insert(model).values({key: bindparam(key) for key in sorted(keys)})


@functools.cache
def _insert(model: Any) -> Insert:
    """INSERT INTO the model's table, built once (building one costs what running it does)."""
    return insert(model)


@functools.cache
def _insert_returning(model: Any, keys: frozenset[str]) -> Insert:
    """INSERT of the columns `keys`, returning the primary key (for `add_new`)."""
    mapper = inspect(model)
    return (
        insert(model)
        .values({key: bindparam(key) for key in sorted(keys)})
        .returning(*mapper.primary_key)
    )


_Row = TypeVar("_Row")


def add_new(session: Session, model: type[_Row], **values: Any) -> _Row:
    """INSERT a new row of `model` at once by a prebuilt statement (`run`) and return it
    joined to the session as if loaded (its columns as given; one it was not given is
    loaded when read). The object is made as a query makes one it loads, without the
    instrumented constructor's bookkeeping of each attribute; the ORM's flush of one new
    object costs several times its statement. For rows written one at a time on the
    inbound path."""
    mapper = inspect(model)
    obj: _Row = mapper.class_manager.new_instance()
    obj.__dict__.update(values)
    _insert_loaded(session, mapper, obj, values)
    return obj


def _insert_loaded(session: Session, mapper: Any, obj: Any, values: dict[str, Any]) -> None:
    stmt = _insert_returning(mapper.class_, frozenset(values))
    pk = run(session.connection(), stmt, values).one()
    for column, value in zip(mapper.primary_key, pk, strict=True):
        obj.__dict__[mapper.get_property_by_column(column).key] = value
    make_transient_to_detached(obj)
    session.add(obj)


def write_changes(session: Session, obj: Any) -> bool:
    """UPDATE the columns changed on a loaded object now, by a prebuilt statement (`run`),
    and mark them written, as the ORM's flush would: for the one lead an inbound message
    changes (its status, score, owner...), whose flush costs several times its statement.
    Returns False, leaving it all to the flush, for anything else: an object not
    persistent or unchanged, a change of a relationship or of an expired column, a
    mapper with a composite key or version column."""
    state = inspect(obj)
    if not (state.persistent and state.modified) or state.session is not session:
        return False
    if "_pending_mutations" in state.__dict__:  # a collection's backref in flight
        return False
    mapper = state.mapper
    pk = _simple_key(mapper)
    if pk is None:
        return False
    changed: dict[str, Any] = {}
    for key in state.committed_state:
        if key not in mapper.column_attrs or key not in state.dict:
            return False
        if state.attrs[key].history.has_changes():
            changed[key] = state.dict[key]
    if not changed:
        return False
    stmt = _update_columns(mapper.class_, frozenset(changed))
    result = run(session.connection(), stmt, {**changed, "_pk": getattr(obj, pk)})
    if result.rowcount != 1:
        raise RuntimeError(f"{mapper.class_.__name__} {getattr(obj, pk)} was not updated")
    state._commit_all(state.dict, session.identity_map)
    return True


@functools.cache
def _simple_key(mapper: Any) -> str | None:
    """The attribute of the mapper's one primary-key column; None when it has a composite
    key or a version counter, which `write_changes` leaves to the flush."""
    if len(mapper.primary_key) != 1 or mapper.version_id_col is not None:
        return None
    key: str = mapper.get_property_by_column(mapper.primary_key[0]).key
    return key


@functools.cache
def _update_columns(model: Any, keys: frozenset[str]) -> Update:
    """UPDATE of the columns `keys` of one row of the model's table (`_pk`), built once."""
    mapper = inspect(model)
    column = mapper.primary_key[0]
    return (
        update(model)
        .where(column == bindparam("_pk"))
        .values({key: bindparam(key) for key in sorted(keys)})
    )


_DEFERRED = "twoway.deferred_rows"


def defer_inserts(session: Session) -> None:
    """Let this unit of work collect rows written with `insert_row` and write them
    together: one executemany a table (`write_deferred`, and before it commits), ids in
    the order the rows were given. For rows nothing in the unit of work reads back
    before they are written."""
    session.info.setdefault(_DEFERRED, {})


def deferring(session: Session) -> bool:
    """Whether this unit of work defers inserts (`defer_inserts`)."""
    return _DEFERRED in session.info


def insert_row(session: Session, model: Any, row: dict[str, Any]) -> None:
    """INSERT one row of `model` (Core, every column named): now, or with the others of
    its table when the unit of work defers inserts."""
    pending: dict[Any, list[dict[str, Any]]] | None = session.info.get(_DEFERRED)
    if pending is None:
        session.execute(_insert(model), row)
    else:
        pending.setdefault(model, []).append(row)


def deferred_rows(session: Session, model: Any) -> list[dict[str, Any]]:
    """The rows of `model` given to `insert_row` and not written yet: an UPDATE of that
    table in the same unit of work must change these too (they are not in the table)."""
    pending: dict[Any, list[dict[str, Any]]] | None = session.info.get(_DEFERRED)
    return pending.get(model, []) if pending else []


def write_deferred(session: Session, *models: Any) -> None:
    """Write the deferred rows of `models` (all of them when none is named)."""
    pending: dict[Any, list[dict[str, Any]]] | None = session.info.get(_DEFERRED)
    if not pending:
        return
    for model in models or list(pending):
        rows = pending.pop(model, None)
        if rows:
            run_many(session.connection(), model, rows)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions for `engine`; whatever a unit of work kept for its commit (the reps'
    assignment counters, buffered timeline events) is written just before it commits."""
    factory = sessionmaker(engine, expire_on_commit=False)

    @event.listens_for(factory, "before_commit")
    def _deferred(session: Session) -> None:
        from worker.assign import write_assignments
        from worker.leads import flush_events

        flush_events(session)
        write_deferred(session)
        write_assignments(session)

    return factory


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session


def _alembic_config(engine: Engine) -> Any:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine) -> None:
    """Apply every pending migration (each with its version record in one transaction)."""
    from alembic import command

    command.upgrade(_alembic_config(engine), "head")


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def ensure_schema(engine: Engine) -> None:
    """Bring the database to the current schema or refuse with a clear message.

    SQLite (the embedded default) upgrades itself; PostgreSQL must be upgraded on purpose
    with `twoway db upgrade`, unless it is empty.
    """
    try:
        current = current_revision(engine)
        has_tables = bool(inspect(engine).get_table_names())
    except Exception as e:  # connection failures come in many driver-specific types
        raise cannot_open(engine.url, e) from e
    head = head_revision()
    if current == head:
        return
    if engine.dialect.name == "sqlite" or not has_tables:
        upgrade(engine)
        return
    raise DatabaseError(
        f"the database is at migration {current or 'none'}, this twoway needs {head}: "
        "run `twoway db upgrade`"
    )
