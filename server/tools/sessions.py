"""MCP tools for sessions and their events: start, get, list, send, wait, list, read files."""

from __future__ import annotations

from typing import Annotated, Literal

from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

from server.core.models import (
    AgentSelector,
    FileResourceParam,
    SessionAgentUpdate,
    SessionCreateParams,
    SessionUpdateParams,
    UserEvent,
    UserInterruptEvent,
    UserMessageEvent,
)

from ._common import CREATES, DESTROYS, READ_ONLY, RUNS_AGENT, UPDATES, Json, services, tool_errors

SessionId = Annotated[str, Field(description="The session's id (`sesn_…`).")]
MAX_WAIT_S = 45.0
READ_FILE_LIMIT = 1 << 20


def _last_stop_reason(events: list[Json]) -> Json | None:
    for event in reversed(events):
        if event["type"] == "session.status_idle":
            return event.get("stop_reason")
        if event["type"] == "session.status_running":
            return None
    return None


def register(mcp: MCPServer) -> None:
    @mcp.tool(title="Start session", annotations=CREATES)
    async def start_session(
        ctx: Context,
        agent: Annotated[
            AgentSelector,
            Field(
                description="An agent id (uses its latest version), or "
                '`{"type": "agent", "id": ..., "version": N}` to pin a version.'
            ),
        ],
        environment_id: Annotated[str, Field(description="The environment (`env_…`) to run in.")],
        title: str | None = None,
        metadata: dict[str, str] | None = None,
        initial_events: Annotated[
            list[UserMessageEvent] | None,
            Field(description="Optional user.message events to start working on at once."),
        ] = None,
        resources: Annotated[
            list[FileResourceParam] | None,
            Field(
                description='Uploaded files to mount read-only: `[{"type": "file", "file_id": '
                '..., "mount_path": "/mnt/session/uploads/data.csv"}]` (up to 500).'
            ),
        ] = None,
    ) -> Json:
        """Start a session: a sub-agent with its own sandbox container, idle until you send work.

        Returns the session object. Next: `send_event` with a `user.message`, then
        `wait_for_session`.
        """
        with tool_errors():
            params = SessionCreateParams(
                agent=agent,
                environment_id=environment_id,
                title=title,
                metadata=metadata or {},
                initial_events=initial_events or [],
                resources=resources or [],
            )
            return await services(ctx).sessions.create(params)

    @mcp.tool(title="Get session", annotations=READ_ONLY)
    async def get_session(ctx: Context, session_id: SessionId) -> Json:
        """Get a session: its status (idle, running, rescheduling, terminated), usage and agent."""
        with tool_errors():
            return await services(ctx).sessions.retrieve(session_id)

    @mcp.tool(title="List sessions", annotations=READ_ONLY)
    async def list_sessions(
        ctx: Context,
        limit: Annotated[int, Field(ge=1, le=100)] = 20,
        page: Annotated[str | None, Field(description="`next_page` of the previous call.")] = None,
        agent_id: str | None = None,
        agent_version: Annotated[int | None, Field(ge=1)] = None,
        statuses: list[Literal["idle", "running", "rescheduling", "terminated"]] | None = None,
        include_archived: bool = False,
    ) -> Json:
        """List sessions, newest first. Returns `{data, next_page}`."""
        with tool_errors():
            result = await services(ctx).sessions.list(
                limit=limit,
                page=page,
                agent_id=agent_id,
                agent_version=agent_version,
                statuses=statuses,
                include_archived=include_archived,
            )
            return result.to_json()

    @mcp.tool(title="Send event", annotations=RUNS_AGENT)
    async def send_event(
        ctx: Context,
        session_id: SessionId,
        event: Annotated[
            UserEvent,
            Field(
                description='A user event, e.g. `{"type": "user.message", "content": '
                '[{"type": "text", "text": "..."}]}` or `{"type": "user.interrupt"}`.'
            ),
        ],
    ) -> Json:
        """Send an event to a session and return at once (the event is stored and queued).

        A `user.message` starts a turn, or joins the running one; `user.interrupt` stops the
        current turn. Then call `wait_for_session` to follow the work.
        """
        with tool_errors():
            stored = await services(ctx).sessions.send_events(session_id, [event])
            return {"data": stored}

    @mcp.tool(title="Send message", annotations=RUNS_AGENT)
    async def send_message(
        ctx: Context,
        session_id: SessionId,
        text: Annotated[str, Field(min_length=1, description="What to ask the sub-agent.")],
    ) -> Json:
        """Send a text `user.message` to a session (shorthand for `send_event`) and return at
        once. Then call `wait_for_session`."""
        with tool_errors():
            event = UserMessageEvent(type="user.message", content=text)  # type: ignore[arg-type]
            stored = await services(ctx).sessions.send_events(session_id, [event])
            return {"data": stored}

    @mcp.tool(title="Interrupt session", annotations=RUNS_AGENT)
    async def interrupt_session(ctx: Context, session_id: SessionId) -> Json:
        """Stop what the session is doing (model stream and running command); it goes idle.

        Shorthand for `send_event` with `{"type": "user.interrupt"}`.
        """
        with tool_errors():
            event = UserInterruptEvent(type="user.interrupt")
            stored = await services(ctx).sessions.send_events(session_id, [event])
            return {"data": stored}

    @mcp.tool(title="Wait for session", annotations=READ_ONLY)
    async def wait_for_session(
        ctx: Context,
        session_id: SessionId,
        after: Annotated[
            str | None,
            Field(description="`next_after` from the previous call; omit to get all events."),
        ] = None,
        timeout_s: Annotated[
            float, Field(ge=0, description=f"Seconds to wait, at most {MAX_WAIT_S:g}.")
        ] = 30.0,
    ) -> Json:
        """Wait until the session needs input (idle) or `timeout_s` passes, whichever is first.

        Returns `status`, `done` (true when the sub-agent finished or needs you), the
        `stop_reason` of the turn, the `events` after `after`, and `next_after`. If `done` is
        false, call again with `after` = `next_after`.
        """
        with tool_errors():
            result = await services(ctx).sessions.wait(
                session_id, after=after, timeout=min(timeout_s, MAX_WAIT_S)
            )
            return {
                "session_id": session_id,
                "status": result.session["status"],
                "done": result.done,
                "stop_reason": _last_stop_reason(result.events) if result.done else None,
                "events": result.events,
                "next_after": result.next_after,
            }

    @mcp.tool(title="List events", annotations=READ_ONLY)
    async def list_events(
        ctx: Context,
        session_id: SessionId,
        limit: Annotated[int, Field(ge=1, le=1000)] = 50,
        page: Annotated[str | None, Field(description="`next_page` of the previous call.")] = None,
        order: Literal["asc", "desc"] = "asc",
        types: Annotated[
            list[str] | None,
            Field(description='Only these event types, e.g. `["agent.message"]`.'),
        ] = None,
    ) -> Json:
        """List a session's stored events in order. Returns `{data, next_page}`."""
        with tool_errors():
            result = await services(ctx).sessions.list_events(
                session_id, limit=limit, page=page, order=order, types=types
            )
            return result.to_json()

    @mcp.tool(title="Read file", annotations=READ_ONLY)
    async def read_file(
        ctx: Context,
        session_id: SessionId,
        path: Annotated[
            str,
            Field(
                description="Path in the session's container; relative paths start at "
                "/workspace. Allowed under /workspace, /mnt/session, /tmp and /home/agent."
            ),
        ],
    ) -> Json:
        """Read a text file from a session's sandbox (e.g. something the sub-agent wrote)."""
        with tool_errors():
            resolved, data = await services(ctx).sessions.read_file(
                session_id, path, max_bytes=READ_FILE_LIMIT
            )
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                from server.core.errors import InvalidRequestError

                msg = f"{resolved} is not UTF-8 text; it cannot be shown as text"
                raise InvalidRequestError(msg) from None
            return {"path": resolved, "size": len(data), "content": text}

    @mcp.tool(title="Update session", annotations=UPDATES)
    async def update_session(
        ctx: Context,
        session_id: SessionId,
        title: str | None = None,
        metadata: Annotated[
            dict[str, str | None] | None,
            Field(description="Per-key patch: a string sets a key, null deletes it."),
        ] = None,
        agent: Annotated[
            SessionAgentUpdate | None,
            Field(description="`{tools, mcp_servers}` for this session only; only while idle."),
        ] = None,
    ) -> Json:
        """Change a session's title or metadata, or (while idle) its tools. Emits
        `session.updated`."""
        changes: dict[str, object] = {}
        if title is not None:
            changes["title"] = title
        if metadata is not None:
            changes["metadata"] = metadata
        if agent is not None:
            changes["agent"] = agent
        with tool_errors():
            params = SessionUpdateParams.model_validate(changes)
            return await services(ctx).sessions.update(session_id, params)

    @mcp.tool(title="Archive session", annotations=DESTROYS)
    async def archive_session(ctx: Context, session_id: SessionId) -> Json:
        """Archive a session: its history stays readable, it accepts no more events, and its
        container is stopped. Refused while it runs (interrupt it first)."""
        with tool_errors():
            return await services(ctx).sessions.archive(session_id)

    @mcp.tool(title="Delete session", annotations=DESTROYS)
    async def delete_session(ctx: Context, session_id: SessionId) -> Json:
        """Delete a session with its container, workspace, events and files. Refused while it
        runs (interrupt it first). Cannot be undone."""
        with tool_errors():
            return await services(ctx).sessions.delete(session_id)

    @mcp.tool(title="Add session resource", annotations=CREATES)
    async def add_session_resource(
        ctx: Context,
        session_id: SessionId,
        file_id: Annotated[str, Field(description="An uploaded file (`file_…`).")],
        mount_path: Annotated[
            str | None,
            Field(
                description="Absolute path; it is rooted under /mnt/session/uploads/ "
                "(default /mnt/session/uploads/<file_id>)."
            ),
        ] = None,
    ) -> Json:
        """Mount an uploaded file read-only into a session's container (running or idle).

        The resource gets its own session-scoped copy of the file (a new `file_id`).
        """
        with tool_errors():
            param = FileResourceParam(type="file", file_id=file_id, mount_path=mount_path)
            return await services(ctx).resources.add(session_id, param)

    @mcp.tool(title="List session resources", annotations=READ_ONLY)
    async def list_session_resources(ctx: Context, session_id: SessionId) -> Json:
        """List the files mounted in a session. Returns `{data}`."""
        with tool_errors():
            return {"data": await services(ctx).resources.list(session_id)}

    @mcp.tool(title="Delete session resource", annotations=DESTROYS)
    async def delete_session_resource(
        ctx: Context,
        session_id: SessionId,
        resource_id: Annotated[str, Field(description="The resource's id (`sesrsc_…`).")],
    ) -> Json:
        """Unmount a file from a session and delete its session-scoped copy."""
        with tool_errors():
            return await services(ctx).resources.delete(session_id, resource_id)
