"""Sessions and their event log: persistence (`SessionStore`) and `SessionService`."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from .agents import AgentService, normalize_model, normalize_tools
from .changes import ChangeBus
from .clock import now
from .environments import EnvironmentService
from .errors import ConflictError, InvalidRequestError, NotFoundError
from .ids import new_id
from .instances import InstanceRegistry
from .models import (
    AgentRef,
    AgentWithOverrides,
    SessionCreateParams,
    SessionUpdateParams,
    UserEvent,
)
from .paths import READABLE_ROOTS, container_path
from .store import (
    Database,
    Json,
    Order,
    Page,
    decode_cursor,
    dumps,
    encode_cursor,
    event_from_row,
    insert_events,
    paginate_by_id,
)

logger = logging.getLogger(__name__)

IDLE_STATUSES = frozenset({"idle", "terminated"})
ZERO_USAGE: Json = {
    "input_tokens": 0,
    "output_tokens": 0,
    "cache_read_input_tokens": 0,
    "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
    "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
}


class SessionRuntime(Protocol):
    """What the domain needs from the agent loop and sandbox layer (implemented in `runner`)."""

    async def provision(self, session: Json, environment: Json) -> str:
        """Create the session's sandbox; return its id.

        Raises:
            BackendUnavailableError: the sandbox backend cannot be used.
        """
        ...

    async def destroy(self, session_id: str, sandbox_id: str | None) -> None:
        """Remove the session's sandbox and workspace (idempotent)."""
        ...

    def wake(self, session_id: str) -> None:
        """Client events are waiting for a session this process owns: process them."""
        ...

    async def read_file(
        self, session_id: str, path: str, *, max_bytes: int, roots: Sequence[str]
    ) -> bytes:
        """Bytes of a file in the session's container whose real path is under `roots`.

        Raises:
            NotFoundError: no such file.
            InvalidRequestError: not a regular file, too large, or outside `roots`.
            BackendUnavailableError: the sandbox cannot be reached.
        """
        ...


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A session row: the API object plus the bookkeeping columns."""

    session: Json
    owner: str | None
    sandbox_id: str | None


def _decode_session(row: sqlite3.Row) -> Json:
    body: Json = json.loads(row["body"])
    body["status"] = row["status"]
    body["archived_at"] = row["archived_at"]
    return body


def _missing(session_id: str) -> NotFoundError:
    msg = f"session {session_id} not found; call list_sessions to see existing sessions"
    return NotFoundError(msg)


class SessionStore:
    """All SQL about sessions and events. Every method is one transaction."""

    def __init__(self, db: Database, bus: ChangeBus) -> None:
        self.db = db
        self.bus = bus

    async def get(self, session_id: str) -> SessionRecord | None:
        row = await self.db.read(
            lambda c: c.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
        )
        if row is None:
            return None
        return SessionRecord(_decode_session(row), row["owner"], row["sandbox_id"])

    async def require(self, session_id: str) -> SessionRecord:
        record = await self.get(session_id)
        if record is None:
            raise _missing(session_id)
        return record

    async def append(
        self,
        session_id: str,
        events: Sequence[Json],
        *,
        status: str | None = None,
        usage: Json | None = None,
        processed: Iterable[str] = (),
        check: Callable[[sqlite3.Connection, Json], None] | None = None,
        queued: bool = False,
    ) -> list[Json]:
        """Append events atomically, optionally changing status, usage and `processed_at` marks.

        `usage` is added to the session's running totals. `processed` names queued client
        events to mark processed now. `check(conn, session)` may raise to abort the whole
        write. `queued=True` stores the events with `processed_at` null (client events).
        """
        stamp = now()

        def write(conn: sqlite3.Connection) -> list[Json]:
            row = conn.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None:
                raise _missing(session_id)
            session = _decode_session(row)
            if check is not None:
                check(conn, session)
            stored = insert_events(conn, session_id, events, processed=not queued)
            for event_id in processed:
                conn.execute(
                    "UPDATE events SET processed_at = ? WHERE id = ? AND processed_at IS NULL",
                    (stamp, event_id),
                )
            changed = False
            if status is not None and status != session["status"]:
                session["status"] = status
                changed = True
            if usage:
                session["usage"] = add_usage(session.get("usage") or ZERO_USAGE, usage)
                changed = True
            if changed:
                session["updated_at"] = stamp
                conn.execute(
                    "UPDATE sessions SET status = ?, body = ? WHERE id = ?",
                    (session["status"], dumps(session), session_id),
                )
            return stored

        stored = await self.db.write(write)
        self.bus.notify(session_id)
        return stored

    async def events(self, session_id: str, *, after_position: int = 0) -> list[Json]:
        """Every event after `after_position`, in log order."""
        rows = await self.db.read(
            lambda c: c.execute(
                "SELECT processed_at, body FROM events WHERE session_id = ? AND position > ? "
                "ORDER BY position",
                (session_id, after_position),
            ).fetchall()
        )
        return [event_from_row(r) for r in rows]

    async def pending(self, session_id: str) -> list[Json]:
        """Client events not yet processed, in the order they were sent."""
        rows = await self.db.read(
            lambda c: c.execute(
                "SELECT processed_at, body FROM events WHERE session_id = ? "
                "AND processed_at IS NULL ORDER BY seq",
                (session_id,),
            ).fetchall()
        )
        return [event_from_row(r) for r in rows]

    async def mark_processed(self, session_id: str, event_ids: Sequence[str]) -> None:
        if not event_ids:
            return
        stamp = now()

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE events SET processed_at = ? WHERE id = ? AND processed_at IS NULL",
                [(stamp, e) for e in event_ids],
            )

        await self.db.write(write)
        self.bus.notify(session_id)

    async def set_columns(self, session_id: str, **columns: Any) -> None:
        """Update bookkeeping columns (`owner`, `sandbox_id`)."""
        allowed = {"owner", "sandbox_id"}
        if not columns or set(columns) - allowed:
            msg = f"set_columns takes only {sorted(allowed)}"
            raise ValueError(msg)
        assignments = ", ".join(f"{k} = ?" for k in columns)
        await self.db.write(
            lambda c: c.execute(
                f"UPDATE sessions SET {assignments} WHERE id = ?",
                (*columns.values(), session_id),
            )
        )

    async def claim(self, session_id: str, instance: str, previous: str | None) -> bool:
        """Take ownership if nobody else did meanwhile (compare-and-set on `owner`)."""
        return await self.db.write(
            lambda c: (
                c.execute(
                    "UPDATE sessions SET owner = ? WHERE id = ? AND owner IS ?",
                    (instance, session_id, previous),
                ).rowcount
                == 1
            )
        )

    async def all_sessions(self) -> list[SessionRecord]:
        rows = await self.db.read(lambda c: c.execute("SELECT * FROM sessions").fetchall())
        return [SessionRecord(_decode_session(r), r["owner"], r["sandbox_id"]) for r in rows]

    async def session_ids_with_pending(self) -> list[str]:
        rows = await self.db.read(
            lambda c: c.execute(
                "SELECT DISTINCT session_id FROM events WHERE processed_at IS NULL"
            ).fetchall()
        )
        return [str(r[0]) for r in rows]


def add_usage(total: Json, delta: Json) -> Json:
    """Add token counts (nested dicts add per key)."""
    result = json.loads(json.dumps(total))
    for key, value in delta.items():
        if isinstance(value, dict):
            result[key] = add_usage(result.get(key) or {}, value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            result[key] = (result.get(key) or 0) + value
    return result


@dataclass(frozen=True, slots=True)
class WaitResult:
    """What `wait_for_session` returns: the status and the events after the cursor."""

    session: Json
    events: list[Json]
    next_after: str | None
    """The id of the last event returned (pass it as `after` next time)."""
    done: bool
    """True when the session is waiting for input (idle or terminated) with nothing queued."""


class SessionService:
    """The session lifecycle and its events, as the MCP tools and the REST API see them."""

    def __init__(
        self,
        store: SessionStore,
        agents: AgentService,
        environments: EnvironmentService,
        instances: InstanceRegistry,
        runtime: SessionRuntime,
    ) -> None:
        self._store = store
        self._db = store.db
        self._agents = agents
        self._environments = environments
        self._instances = instances
        self._runtime = runtime

    # ------------------------------------------------------------------------------ lifecycle

    async def create(self, params: SessionCreateParams) -> Json:
        """Create a session and its container; with `initial_events` it starts running.

        Raises:
            NotFoundError: unknown agent, version or environment.
            ConflictError: the agent or environment is archived.
            BackendUnavailableError: the container could not be created (nothing is kept).
        """
        agent = await self._resolve_agent(params.agent)
        environment = await self._environments.retrieve(params.environment_id)
        if environment["archived_at"] is not None:
            msg = (
                f"environment {environment['id']} is archived; new sessions cannot use it. "
                "Pick another environment"
            )
            raise ConflictError(msg)
        stamp = now()
        session: Json = {
            "id": new_id("sesn"),
            "type": "session",
            "title": params.title,
            "status": "idle",
            "agent": agent,
            "environment_id": environment["id"],
            "resources": [],
            "vault_ids": [],
            "metadata": dict(params.metadata),
            "budget": None,
            "outcome_evaluations": [],
            "deployment_id": None,
            "stats": {"active_seconds": 0.0, "duration_seconds": 0.0},
            "usage": json.loads(json.dumps(ZERO_USAGE)),
            "created_at": stamp,
            "updated_at": stamp,
            "archived_at": None,
        }
        initial = [e.model_dump(exclude_none=True) for e in params.initial_events]

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO sessions (id, body, status, agent_id, agent_version, environment_id, "
                "owner) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    session["id"],
                    dumps(session),
                    "idle",
                    agent["id"],
                    agent["version"],
                    environment["id"],
                    self._instances.id,
                ),
            )
            insert_events(conn, session["id"], initial, processed=False)

        await self._db.write(insert)
        try:
            sandbox_id = await self._runtime.provision(session, environment)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._forget(session["id"])
            raise
        await self._store.set_columns(session["id"], sandbox_id=sandbox_id)
        if initial:
            self._runtime.wake(session["id"])
        return await self.retrieve(session["id"])

    async def _resolve_agent(self, selector: Any) -> Json:
        if isinstance(selector, str):
            agent = await self._agents.retrieve(selector)
        elif isinstance(selector, AgentRef | AgentWithOverrides):
            agent = await self._agents.retrieve(selector.id, selector.version)
        else:  # pragma: no cover - validated by the params model
            msg = "agent must be an id or {type, id, version}"
            raise InvalidRequestError(msg)
        if agent["archived_at"] is not None:
            msg = (
                f"agent {agent['id']} is archived; new sessions cannot use it. "
                "Create or pick another agent"
            )
            raise ConflictError(msg)
        snapshot: Json = {
            "type": "agent",
            "id": agent["id"],
            "version": agent["version"],
            **{k: agent[k] for k in ("name", "model", "system", "description")},
            "tools": agent["tools"],
            "mcp_servers": agent["mcp_servers"],
            "skills": agent["skills"],
            "multiagent": None,
            "execution_identity": {"type": "service_account"},
        }
        if isinstance(selector, AgentWithOverrides):
            fields = selector.model_fields_set
            if "model" in fields and selector.model is not None:
                snapshot["model"] = normalize_model(selector.model)
            if "system" in fields:
                snapshot["system"] = selector.system
            if "tools" in fields:
                snapshot["tools"] = normalize_tools(selector.tools or [])
            if "mcp_servers" in fields:
                snapshot["mcp_servers"] = [s.model_dump() for s in selector.mcp_servers or []]
            if "skills" in fields:
                snapshot["skills"] = [s.model_dump() for s in selector.skills or []]
        return snapshot

    async def _forget(self, session_id: str) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM events WHERE session_id = ?", (session_id,))
            conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

        await self._db.write(delete)

    async def retrieve(self, session_id: str) -> Json:
        return (await self._store.require(session_id)).session

    async def list(
        self,
        *,
        limit: int = 20,
        page: str | None = None,
        order: Order = "desc",
        agent_id: str | None = None,
        statuses: Sequence[str] | None = None,
        include_archived: bool = False,
    ) -> Page:
        sql = "SELECT * FROM sessions WHERE 1=1"
        args: list[Any] = []
        if agent_id:
            sql += " AND agent_id = ?"
            args.append(agent_id)
        if statuses:
            sql += f" AND status IN ({', '.join('?' for _ in statuses)})"
            args.extend(statuses)
        if not include_archived:
            sql += " AND archived_at IS NULL"
        return await self._db.read(
            lambda c: paginate_by_id(
                c, sql, args, limit=limit, page=page, order=order, decode=_decode_session
            )
        )

    async def update(self, session_id: str, params: SessionUpdateParams) -> Json:
        changed: Json = {}

        def check(conn: sqlite3.Connection, session: Json) -> None:
            if session["archived_at"] is not None:
                msg = f"session {session_id} is archived and read-only"
                raise ConflictError(msg)

        record = await self._store.require(session_id)
        session = dict(record.session)
        if "title" in params.model_fields_set and params.title != session["title"]:
            changed["title"] = session["title"] = params.title
        if params.metadata:
            metadata = dict(session["metadata"])
            for key, value in params.metadata.items():
                if value is None:
                    metadata.pop(key, None)
                else:
                    metadata[key] = value
            if metadata != session["metadata"]:
                changed["metadata"] = session["metadata"] = metadata
        if not changed:
            return session
        session["updated_at"] = now()

        def write(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None:
                raise _missing(session_id)
            current = _decode_session(row)
            check(conn, current)
            current.update(changed, updated_at=session["updated_at"])
            conn.execute("UPDATE sessions SET body = ? WHERE id = ?", (dumps(current), session_id))
            insert_events(conn, session_id, [{"type": "session.updated", **changed}])

        await self._db.write(write)
        self._store.bus.notify(session_id)
        return await self.retrieve(session_id)

    # --------------------------------------------------------------------------------- events

    async def send_events(self, session_id: str, events: Sequence[UserEvent]) -> list[Json]:
        """Queue client events for the session, in order; `user.interrupt` jumps the queue.

        Returns as soon as the events are stored (durably); the agent loop takes them up.

        Raises:
            NotFoundError: no such session.
            ConflictError: the session is archived or terminated.
            InvalidRequestError: an event does not fit the session's state.
        """
        if not events:
            msg = "send at least one event"
            raise InvalidRequestError(msg)
        payloads = [e.model_dump(exclude_none=True) for e in events]

        def check(conn: sqlite3.Connection, session: Json) -> None:
            if session["archived_at"] is not None:
                msg = f"session {session_id} is archived and accepts no events"
                raise ConflictError(msg)
            if session["status"] == "terminated":
                msg = f"session {session_id} is terminated and accepts no events; start a new one"
                raise ConflictError(msg)
            for payload in payloads:
                if payload["type"] in ("user.tool_confirmation", "user.custom_tool_result"):
                    msg = (
                        f"{payload['type']} is not supported by this server yet; "
                        "use always_allow tools"
                    )
                    raise InvalidRequestError(msg)

        stored = await self._store.append(session_id, payloads, check=check, queued=True)
        await self._dispatch(session_id)
        return stored

    async def _dispatch(self, session_id: str) -> None:
        """Make sure a live process will process the session's queued events."""
        record = await self._store.require(session_id)
        if record.owner == self._instances.id:
            self._runtime.wake(session_id)
        elif not self._instances.is_alive(record.owner) and await self._store.claim(
            session_id, self._instances.id, record.owner
        ):
            logger.info("taking over session %s from %s", session_id, record.owner)
            self._runtime.wake(session_id)

    async def list_events(
        self,
        session_id: str,
        *,
        limit: int = 1000,
        page: str | None = None,
        order: Order = "asc",
        types: Sequence[str] | None = None,
    ) -> Page:
        await self._store.require(session_id)

        def select(conn: sqlite3.Connection) -> Page:
            sql = "SELECT position, processed_at, body FROM events WHERE session_id = ?"
            args: list[Any] = [session_id]
            if types:
                sql += f" AND type IN ({', '.join('?' for _ in types)})"
                args.extend(types)
            if page:
                key = decode_cursor(page, order)
                sql += " AND position > ?" if order == "asc" else " AND position < ?"
                args.append(key)
            sql += f" ORDER BY position {'ASC' if order == 'asc' else 'DESC'} LIMIT ?"
            args.append(limit + 1)
            rows = conn.execute(sql, args).fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            next_page = encode_cursor(order, int(rows[-1]["position"])) if more and rows else None
            return Page([event_from_row(r) for r in rows], next_page)

        return await self._db.read(select)

    async def wait(self, session_id: str, *, after: str | None, timeout: float) -> WaitResult:
        """Return once the session needs input (idle with nothing queued) or `timeout` passes.

        Events after the event id `after` (all events when None) are returned either way.

        Raises:
            NotFoundError: no such session, or `after` is not one of its events.
        """
        position = 0
        if after:
            row = await self._db.read(
                lambda c: c.execute(
                    "SELECT position FROM events WHERE session_id = ? AND id = ?",
                    (session_id, after),
                ).fetchone()
            )
            if row is None:
                await self._store.require(session_id)
                msg = (
                    f"event {after} is not in session {session_id}; pass the `next_after` "
                    "value of the previous call, or omit `after` to start from the beginning"
                )
                raise NotFoundError(msg)
            position = int(row[0])
        with anyio.move_on_after(max(0.0, timeout)):
            while True:
                token = self._store.bus.token(session_id)
                record = await self._store.require(session_id)
                if await self._settled(record):
                    break
                await token.wait()
        record = await self._store.require(session_id)
        events = await self._store.events(session_id, after_position=position)
        return WaitResult(
            session=record.session,
            events=events,
            next_after=events[-1]["id"] if events else after,
            done=await self._settled(record),
        )

    # ---------------------------------------------------------------------------------- files

    async def read_file(self, session_id: str, path: str, *, max_bytes: int) -> tuple[str, bytes]:
        """The (normalised path, bytes) of a file in the session's container.

        Raises:
            NotFoundError: no such session or file.
            InvalidRequestError: the path leaves the session's directories, or the file is not
                a regular file or too large.
        """
        resolved = container_path(path)
        await self._store.require(session_id)
        data = await self._runtime.read_file(
            session_id, resolved, max_bytes=max_bytes, roots=READABLE_ROOTS
        )
        return resolved, data

    async def _settled(self, record: SessionRecord) -> bool:
        if record.session["status"] not in IDLE_STATUSES:
            return False
        return not await self._store.pending(record.session["id"])
