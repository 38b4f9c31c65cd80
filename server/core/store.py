"""SQLite persistence for agents, environments, sessions and the append-only event log.

One connection, used from a worker thread one call at a time (sqlite3 is blocking). WAL with
`synchronous=FULL`: a write that returned is on disk. Several server processes may share one
database file; writes take `BEGIN IMMEDIATE` and wait on each other through `busy_timeout`.
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import anyio.to_thread

from .clock import now
from .errors import InvalidRequestError
from .ids import new_id

logger = logging.getLogger(__name__)

T = TypeVar("T")
Json = dict[str, Any]
Order = Literal["asc", "desc"]

MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = []
migration = MIGRATIONS.append


def _execute_all(conn: sqlite3.Connection, script: str) -> None:
    """Run `;`-separated statements inside the caller's transaction (unlike `executescript`)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


@migration
def m001_initial(conn: sqlite3.Connection) -> None:
    _execute_all(
        conn,
        """
        CREATE TABLE agents (
            id TEXT PRIMARY KEY,
            latest_version INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            archived_at TEXT
        );
        CREATE TABLE agent_versions (
            agent_id TEXT NOT NULL REFERENCES agents(id),
            version INTEGER NOT NULL,
            body TEXT NOT NULL,
            PRIMARY KEY (agent_id, version)
        );
        CREATE TABLE environments (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            body TEXT NOT NULL,
            archived_at TEXT
        );
        CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            body TEXT NOT NULL,
            status TEXT NOT NULL,
            agent_id TEXT NOT NULL,
            agent_version INTEGER NOT NULL,
            environment_id TEXT NOT NULL,
            owner TEXT,
            sandbox_id TEXT,
            archived_at TEXT
        );
        CREATE INDEX sessions_environment ON sessions(environment_id);
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id TEXT NOT NULL,
            position INTEGER NOT NULL,
            id TEXT NOT NULL UNIQUE,
            type TEXT NOT NULL,
            processed_at TEXT,
            body TEXT NOT NULL,
            UNIQUE (session_id, position)
        );
        CREATE INDEX events_pending ON events(session_id, seq) WHERE processed_at IS NULL;
        """,
    )


@migration
def m002_files(conn: sqlite3.Connection) -> None:
    _execute_all(
        conn,
        """
        CREATE TABLE files (
            id TEXT PRIMARY KEY,
            sha256 TEXT NOT NULL,
            scope_id TEXT,
            origin TEXT NOT NULL,
            path TEXT,
            body TEXT NOT NULL
        );
        CREATE INDEX files_scope ON files(scope_id, origin, path);
        CREATE INDEX files_sha256 ON files(sha256);
        CREATE TABLE session_resources (
            id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL,
            file_id TEXT NOT NULL,
            mount_path TEXT NOT NULL,
            body TEXT NOT NULL,
            UNIQUE (session_id, mount_path)
        );
        """,
    )


@migration
def m003_idempotency_keys(conn: sqlite3.Connection) -> None:
    _execute_all(
        conn,
        """
        CREATE TABLE idempotency_keys (
            scope TEXT NOT NULL,
            key TEXT NOT NULL,
            request_hash TEXT NOT NULL,
            resource_id TEXT NOT NULL,
            owner TEXT,
            completed INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            PRIMARY KEY (scope, key)
        );
        CREATE INDEX idempotency_keys_created ON idempotency_keys(created_at);
        """,
    )


class Database:
    """One SQLite connection, driven from worker threads one call at a time."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._limiter = anyio.CapacityLimiter(1)
        self._closed = False

    @classmethod
    async def open(cls, path: Path) -> Database:
        """Open (creating if needed) the database at `path` and bring its schema up to date."""

        def connect() -> sqlite3.Connection:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            _migrate(conn)
            return conn

        conn = await anyio.to_thread.run_sync(connect)
        return cls(conn, path)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` in the database thread."""
        return await anyio.to_thread.run_sync(fn, self._conn, limiter=self._limiter)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` in one `BEGIN IMMEDIATE` transaction; roll back if it raises."""

        def transaction(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await anyio.to_thread.run_sync(transaction, self._conn, limiter=self._limiter)

    async def data_version(self) -> int:
        """A number that changes whenever another connection commits (cross-process wake-ups)."""
        return await self.read(lambda c: int(c.execute("PRAGMA data_version").fetchone()[0]))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._conn.close, limiter=self._limiter)


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT)")
    conn.execute("BEGIN IMMEDIATE")
    try:
        done = {row[0] for row in conn.execute("SELECT name FROM migrations")}
        for step in MIGRATIONS:
            if step.__name__ not in done:
                logger.info("applying migration %s", step.__name__)
                step(conn)
                conn.execute(
                    "INSERT INTO migrations (name, applied_at) VALUES (?, ?)",
                    (step.__name__, now()),
                )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# ------------------------------------------------------------------------------------ pagination


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list: the API's `{data, next_page}`."""

    data: list[Json]
    next_page: str | None

    def to_json(self) -> Json:
        return {"data": self.data, "next_page": self.next_page}


@dataclass(frozen=True, slots=True)
class TimeFilter:
    """Bounds on a timestamp column (the list endpoints' `created_at[gt|gte|lt|lte]`).

    Values are in the API's timestamp format (`clock.format_time`), which every stored
    timestamp shares, so comparing the text compares the times.
    """

    gt: str | None = None
    gte: str | None = None
    lt: str | None = None
    lte: str | None = None

    def sql(self, column: str) -> tuple[str, list[str]]:
        """` AND <column> <op> ?` clauses (empty when unbounded) and their arguments."""
        clauses: list[str] = []
        args: list[str] = []
        for op, value in ((">", self.gt), (">=", self.gte), ("<", self.lt), ("<=", self.lte)):
            if value is not None:
                clauses.append(f" AND {column} {op} ?")
                args.append(value)
        return "".join(clauses), args


def encode_cursor(order: Order, key: str | int) -> str:
    raw = json.dumps({"o": order, "k": key}, separators=(",", ":")).encode()
    return "page_" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(page: str, order: Order) -> str | int:
    """The position a cursor continues from.

    Raises:
        InvalidRequestError: the cursor is malformed or was made for the other order.
    """
    try:
        body = page.removeprefix("page_")
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        cursor_order, key = data["o"], data["k"]
    except (ValueError, KeyError, TypeError) as exc:
        msg = f"page cursor {page[:60]!r} is not valid; pass the next_page value of a previous call"
        raise InvalidRequestError(msg) from exc
    if cursor_order != order:
        msg = f"this page cursor was made for order={cursor_order!r}; keep the same order"
        raise InvalidRequestError(msg)
    if not isinstance(key, str | int):
        msg = "page cursor is not valid; pass the next_page value of a previous call"
        raise InvalidRequestError(msg)
    return key


def paginate_by_id(
    conn: sqlite3.Connection,
    sql: str,
    params: Sequence[Any],
    *,
    limit: int,
    page: str | None,
    order: Order,
    decode: Callable[[sqlite3.Row], Json],
) -> Page:
    """Run `sql` (ending in a WHERE clause) ordered by `id`, one page at a time."""
    args = list(params)
    if page:
        key = decode_cursor(page, order)
        sql += " AND id < ?" if order == "desc" else " AND id > ?"
        args.append(key)
    sql += f" ORDER BY id {'DESC' if order == 'desc' else 'ASC'} LIMIT ?"
    args.append(limit + 1)
    rows = conn.execute(sql, args).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    next_page = encode_cursor(order, rows[-1]["id"]) if more and rows else None
    return Page([decode(r) for r in rows], next_page)


# ------------------------------------------------------------------------------------ event rows


def event_from_row(row: sqlite3.Row) -> Json:
    body: Json = json.loads(row["body"])
    body["processed_at"] = row["processed_at"]
    return body


def insert_events(
    conn: sqlite3.Connection,
    session_id: str,
    events: Iterable[Json],
    *,
    processed: bool = True,
) -> list[Json]:
    """Append events to a session's log with the next gapless positions; return them as stored.

    Each event gets an `id` (unless it has one) and `processed_at` (now, or null when
    `processed` is False: client events waiting in the queue).
    """
    row = conn.execute(
        "SELECT COALESCE(MAX(position), 0) FROM events WHERE session_id = ?", (session_id,)
    ).fetchone()
    position = int(row[0])
    stored: list[Json] = []
    for event in events:
        position += 1
        body = dict(event)
        body.setdefault("id", new_id("sevt"))
        body.pop("processed_at", None)
        processed_at = now() if processed else None
        conn.execute(
            "INSERT INTO events (session_id, position, id, type, processed_at, body) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (session_id, position, body["id"], body["type"], processed_at, _dumps(body)),
        )
        stored.append({**body, "processed_at": processed_at})
    return stored


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


dumps = _dumps
