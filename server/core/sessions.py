"""Sessions: lifecycle (create, update, archive, delete) and their events (send, list, wait)."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio

from .actions import ACTION_EVENTS, ANSWERS, outstanding_actions
from .agents import AgentService, normalize_model, normalize_tools
from .clock import now
from .environments import EnvironmentService
from .errors import ConflictError, InvalidRequestError, NotFoundError
from .idempotency import IdempotencyKeys, create_once
from .ids import new_id
from .instances import InstanceRegistry
from .models import (
    AgentRef,
    AgentWithOverrides,
    McpServerParam,
    SessionCreateParams,
    SessionUpdateParams,
    UserEvent,
    check_agent_shape,
)
from .paths import READABLE_ROOTS, container_path
from .resources import ResourceService
from .session_store import (
    ZERO_USAGE,
    SessionRecord,
    SessionStore,
    decode_session,
    session_not_found,
)
from .store import (
    Json,
    Order,
    Page,
    TimeFilter,
    decode_cursor,
    dumps,
    encode_cursor,
    event_from_row,
    insert_events,
    paginate_by_id,
)

logger = logging.getLogger(__name__)

WAITING_STATUSES = frozenset({"idle", "terminated"})
BUSY_STATUSES = frozenset({"running", "rescheduling"})


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

    async def stop(self, session_id: str, sandbox_id: str | None) -> None:
        """Stop the session's sandbox, keeping its workspace (idempotent)."""
        ...

    def wake(self, session_id: str) -> None:
        """Client events are waiting for a session this process owns: process them."""
        ...

    async def read_file(
        self, session_id: str, path: str, *, offset: int, length: int, roots: Sequence[str]
    ) -> tuple[bytes, int]:
        """Up to `length` bytes from `offset` of a file in the session's container whose real
        path is under `roots`, and the file's size.

        Raises:
            NotFoundError: no such file.
            InvalidRequestError: not a regular file, too large, or outside `roots`.
            BackendUnavailableError: the sandbox cannot be reached.
        """
        ...

    async def mount_files(self, session_id: str, mounts: Sequence[tuple[str, Path]]) -> None:
        """Copy host files (blob paths) read-only into the container at the given paths."""
        ...

    async def unmount_file(self, session_id: str, path: str) -> None:
        """Remove a mounted file from the container."""
        ...


@dataclass(frozen=True, slots=True)
class WaitResult:
    """What `wait_for_session` returns: the status and the events after the cursor."""

    session: Json
    events: list[Json]
    next_after: str | None
    """The id of the last event returned (pass it as `after` next time)."""
    done: bool
    """True when the session waits for input (idle or terminated) with nothing queued."""


def _check_client_event(conn: sqlite3.Connection, session_id: str, payloads: list[Json]) -> None:
    """Send-time rules that need the log: answers must match open tool uses; files must exist."""
    open_ids: dict[str, Json] = {}
    if any(p["type"] in ANSWERS for p in payloads):
        # Only the events that open or settle an action: a long log is not decoded whole.
        rows = conn.execute(
            "SELECT processed_at, body FROM events WHERE session_id = ? "
            f"AND type IN ({', '.join('?' for _ in ACTION_EVENTS)}) ORDER BY position",
            (session_id, *ACTION_EVENTS),
        ).fetchall()
        open_ids = {e["id"]: e for e in outstanding_actions(event_from_row(r) for r in rows)}
    for payload in payloads:
        kind = payload["type"]
        if kind == "user.tool_confirmation":
            target = open_ids.pop(payload["tool_use_id"], None)
            if target is None or target["type"] != "agent.tool_use":
                waiting = [i for i, e in open_ids.items() if e["type"] == "agent.tool_use"]
                msg = (
                    f"tool_use_id {payload['tool_use_id']} is not a tool call waiting for "
                    f"confirmation in session {session_id}; waiting: {waiting or 'none'}"
                )
                raise InvalidRequestError(msg)
        elif kind == "user.custom_tool_result":
            target = open_ids.pop(payload["custom_tool_use_id"], None)
            if target is None or target["type"] != "agent.custom_tool_use":
                waiting = [i for i, e in open_ids.items() if e["type"] == "agent.custom_tool_use"]
                msg = (
                    f"custom_tool_use_id {payload['custom_tool_use_id']} is not a custom tool "
                    f"call waiting for a result in session {session_id}; waiting: "
                    f"{waiting or 'none'}"
                )
                raise InvalidRequestError(msg)
        for block in payload.get("content") or []:
            source = block.get("source") or {}
            if (
                source.get("type") == "file"
                and not conn.execute(
                    "SELECT 1 FROM files WHERE id = ?", (source.get("file_id"),)
                ).fetchone()
            ):
                msg = f"{block['type']} block refers to unknown file {source.get('file_id')}"
                raise InvalidRequestError(msg)


class SessionService:
    """The session lifecycle and its events, as the MCP tools and the REST API see them."""

    def __init__(
        self,
        store: SessionStore,
        agents: AgentService,
        environments: EnvironmentService,
        instances: InstanceRegistry,
        runtime: SessionRuntime,
        resources: ResourceService,
        keys: IdempotencyKeys | None = None,
    ) -> None:
        self._keys = keys
        self._store = store
        self._db = store.db
        self._agents = agents
        self._environments = environments
        self._instances = instances
        self._runtime = runtime
        self._resources = resources

    # ------------------------------------------------------------------------------ lifecycle

    async def create(
        self, params: SessionCreateParams, *, idempotency_key: str | None = None
    ) -> Json:
        """Create a session and its container; with `initial_events` it starts running.

        Resources are validated before anything is created, and a failure at any step leaves
        nothing behind. A repeat with the same `idempotency_key` returns the first session
        (see idempotency.py).

        Raises:
            NotFoundError: unknown agent, version, environment or file.
            ConflictError: the agent or environment is archived.
            InvalidRequestError: a resource is malformed.
            BackendUnavailableError: the container could not be created.
        """
        return await create_once(
            self._keys,
            "sessions",
            idempotency_key,
            params.model_dump(mode="json"),
            prefix="sesn",
            create=lambda session_id: self._create(session_id, params),
            fetch=self.retrieve,
        )

    async def create_as(self, session_id: str, params: SessionCreateParams) -> Json:
        """`create` with a given (fresh) id, for callers that hold an idempotency key."""
        return await self._create(session_id, params)

    async def _create(self, session_id: str, params: SessionCreateParams) -> Json:
        agent = await self._resolve_agent(params.agent)
        environment = await self._environments.retrieve(params.environment_id)
        if environment["archived_at"] is not None:
            msg = (
                f"environment {environment['id']} is archived; new sessions cannot use it. "
                "Pick another environment"
            )
            raise ConflictError(msg)
        if params.resources:
            await self._resources.validate(params.resources)
        stamp = now()
        session: Json = {
            "id": session_id,
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
            _check_client_event(conn, session["id"], initial)
            insert_events(conn, session["id"], initial, processed=False)

        await self._db.write(insert)
        sandbox_id: str | None = None
        try:
            sandbox_id = await self._runtime.provision(session, environment)
            await self._store.set_columns(session["id"], sandbox_id=sandbox_id)
            if params.resources:
                await self._resources.attach(session["id"], params.resources)
        except BaseException:
            with anyio.CancelScope(shield=True):
                if sandbox_id is not None:
                    await self._runtime.destroy(session["id"], sandbox_id)
                await self._forget(session["id"])
            raise
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
            tools = selector.tools if "tools" in fields else None
            servers = selector.mcp_servers if "mcp_servers" in fields else None
            if tools is not None or servers is not None:
                check_agent_shape(
                    tools if tools is not None else [],
                    servers
                    if servers is not None
                    else [McpServerParam.model_validate(s) for s in agent["mcp_servers"]],
                )
            if "model" in fields and selector.model is not None:
                snapshot["model"] = normalize_model(selector.model)
            if "system" in fields:
                snapshot["system"] = selector.system
            if tools is not None:
                snapshot["tools"] = normalize_tools(tools)
            if servers is not None:
                snapshot["mcp_servers"] = [s.model_dump() for s in servers]
            if "skills" in fields:
                snapshot["skills"] = [s.model_dump() for s in selector.skills or []]
        return snapshot

    async def _forget(self, session_id: str) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM events WHERE session_id = ?", (session_id,))
            conn.execute("DELETE FROM session_resources WHERE session_id = ?", (session_id,))
            conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

        await self._db.write(delete)
        await self._resources.files.delete_scope(session_id)

    async def retrieve(self, session_id: str) -> Json:
        record = await self._store.require(session_id)
        session = record.session
        session["resources"] = await self._store.resources(session_id)
        return session

    async def list(
        self,
        *,
        limit: int = 20,
        page: str | None = None,
        order: Order = "desc",
        agent_id: str | None = None,
        agent_version: int | None = None,
        statuses: Sequence[str] | None = None,
        include_archived: bool = False,
        created_at: TimeFilter | None = None,
    ) -> Page:
        sql = "SELECT * FROM sessions WHERE 1=1"
        args: list[Any] = []
        clauses, bounds = (created_at or TimeFilter()).sql("json_extract(body, '$.created_at')")
        sql += clauses
        args.extend(bounds)
        if agent_id:
            sql += " AND agent_id = ?"
            args.append(agent_id)
        if agent_version is not None:
            sql += " AND agent_version = ?"
            args.append(agent_version)
        if statuses:
            sql += f" AND status IN ({', '.join('?' for _ in statuses)})"
            args.extend(statuses)
        if not include_archived:
            sql += " AND archived_at IS NULL"
        return await self._db.read(
            lambda c: paginate_by_id(
                c, sql, args, limit=limit, page=page, order=order, decode=decode_session
            )
        )

    async def _require_quiet(self, session_id: str, action: str) -> SessionRecord:
        """The session, if it is not running and has nothing queued; else a conflict."""
        record = await self._store.require(session_id)
        if record.session["status"] in BUSY_STATUSES or await self._store.pending(session_id):
            msg = (
                f"session {session_id} is running; cannot {action} it now. Send a "
                "user.interrupt (or wait_for_session until done), then try again"
            )
            raise ConflictError(msg)
        return record

    async def update(self, session_id: str, params: SessionUpdateParams) -> Json:
        """Change title, metadata (per-key patch) or, while idle, the agent's tools.

        Emits `session.updated` with the changed fields; a no-op changes nothing.

        Raises:
            ConflictError: the session is archived, or running while tools change.
        """
        record = await self._store.require(session_id)
        if record.session["archived_at"] is not None:
            msg = f"session {session_id} is archived and read-only"
            raise ConflictError(msg)
        session = record.session
        changed: Json = {}
        if "title" in params.model_fields_set and params.title != session["title"]:
            changed["title"] = params.title
        if params.metadata:
            metadata = dict(session["metadata"])
            for key, value in params.metadata.items():
                if value is None:
                    metadata.pop(key, None)
                else:
                    metadata[key] = value
            if len(metadata) > 16:
                msg = f"metadata would have {len(metadata)} keys; at most 16 are allowed"
                raise InvalidRequestError(msg)
            if metadata != session["metadata"]:
                changed["metadata"] = metadata
        if params.agent is not None:
            agent = dict(session["agent"])
            fields = params.agent.model_fields_set
            tools = params.agent.tools if "tools" in fields else None
            servers = params.agent.mcp_servers if "mcp_servers" in fields else None
            check_agent_shape(
                tools if tools is not None else [],
                servers
                if servers is not None
                else [McpServerParam.model_validate(s) for s in agent["mcp_servers"]],
            )
            if tools is not None:
                agent["tools"] = normalize_tools(tools)
            if servers is not None:
                agent["mcp_servers"] = [s.model_dump() for s in servers]
            if agent != session["agent"]:
                await self._require_quiet(session_id, "change the tools of")
                changed["agent"] = agent
        if not changed:
            return await self.retrieve(session_id)
        stamp = now()

        def write(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None:
                raise session_not_found(session_id)
            current = json.loads(row["body"])
            current.update(changed, updated_at=stamp)
            conn.execute("UPDATE sessions SET body = ? WHERE id = ?", (dumps(current), session_id))
            insert_events(conn, session_id, [{"type": "session.updated", **changed}])

        await self._db.write(write)
        self._store.bus.notify(session_id)
        return await self.retrieve(session_id)

    async def archive(self, session_id: str) -> Json:
        """Make the session read-only and `terminated` (history kept); stop its container.

        Raises:
            ConflictError: the session is running or has queued events.
        """
        record = await self._require_quiet(session_id, "archive")
        if record.session["archived_at"] is None:
            # An archived session is `terminated` (the API's transition); it keeps its history.
            await self._store.append(
                session_id, [{"type": "session.status_terminated"}], status="terminated"
            )
            stamp = now()
            await self._db.write(
                lambda c: c.execute(
                    "UPDATE sessions SET archived_at = ? WHERE id = ? AND archived_at IS NULL",
                    (stamp, session_id),
                )
            )
            self._store.bus.notify(session_id)
            await self._runtime.stop(session_id, record.sandbox_id)
        return await self.retrieve(session_id)

    async def delete(self, session_id: str) -> Json:
        """Delete the session: its container and workspace, events, resources and files.

        Emits `session.deleted` to anyone following the session.

        Raises:
            ConflictError: the session is running or has queued events.
            BackendUnavailableError: the container could not be removed (nothing is deleted).
        """
        record = await self._require_quiet(session_id, "delete")
        await self._runtime.destroy(session_id, record.sandbox_id)
        await self._forget(session_id)
        self._store.bus.mark_deleted(
            session_id, {"type": "session.deleted", "id": new_id("sevt"), "processed_at": now()}
        )
        return {"id": session_id, "type": "session_deleted"}

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
            _check_client_event(conn, session_id, payloads)

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
        created_at: TimeFilter | None = None,
    ) -> Page:
        """A page of the session's events; `created_at` bounds their `processed_at` (as the
        API does), so queued events are left out of a bounded listing."""
        await self._store.require(session_id)

        def select(conn: sqlite3.Connection) -> Page:
            sql = "SELECT position, processed_at, body FROM events WHERE session_id = ?"
            args: list[Any] = [session_id]
            clauses, bounds = (created_at or TimeFilter()).sql("processed_at")
            sql += clauses
            args.extend(bounds)
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

    async def event_position(self, session_id: str, event_id: str) -> int:
        """The log position of `event_id` in the session.

        Raises:
            NotFoundError: no such session, or the event is not one of its events.
        """
        row = await self._db.read(
            lambda c: c.execute(
                "SELECT position FROM events WHERE session_id = ? AND id = ?",
                (session_id, event_id),
            ).fetchone()
        )
        if row is None:
            await self._store.require(session_id)
            msg = (
                f"event {event_id} is not in session {session_id}; pass the `next_after` "
                "value of the previous call, or omit `after` to start from the beginning"
            )
            raise NotFoundError(msg)
        return int(row[0])

    async def wait(
        self,
        session_id: str,
        *,
        after: str | None,
        timeout: float,
        on_events: Callable[[list[Json]], Awaitable[None]] | None = None,
    ) -> WaitResult:
        """Return once the session needs input (idle with nothing queued) or `timeout` passes.

        Events after the event id `after` (all events when None) are returned either way;
        `on_events` hears about them as they arrive (for progress notifications).

        Raises:
            NotFoundError: no such session, or `after` is not one of its events.
        """
        position = await self.event_position(session_id, after) if after else 0
        reported = 0
        with anyio.move_on_after(max(0.0, timeout)):
            while True:
                token = self._store.bus.token(session_id)
                record = await self._store.require(session_id)
                if on_events is not None:
                    arrived = await self._store.events(session_id, after_position=position)
                    if len(arrived) > reported:
                        await on_events(arrived)
                        reported = len(arrived)
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

    async def _settled(self, record: SessionRecord) -> bool:
        if record.session["status"] not in WAITING_STATUSES:
            return False
        return not await self._store.pending(record.session["id"])

    # ---------------------------------------------------------------------------------- files

    async def read_file(
        self, session_id: str, path: str, *, offset: int = 0, length: int
    ) -> tuple[str, bytes, int]:
        """(normalised path, up to `length` bytes from `offset`, file size) of a container file.

        Raises:
            NotFoundError: no such session or file.
            InvalidRequestError: the path leaves the session's directories, the file is not a
                regular file, or `offset` is past its end.
        """
        resolved = container_path(path)
        await self._store.require(session_id)
        data, size = await self._runtime.read_file(
            session_id, resolved, offset=offset, length=length, roots=READABLE_ROOTS
        )
        return resolved, data, size
