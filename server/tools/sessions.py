"""MCP tools for sessions and their events: start, get, list, send, wait, list, read files."""

from __future__ import annotations

from typing import Annotated, Literal

from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

from server.core.errors import InvalidRequestError
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
from server.core.store import encode_cursor
from server.present import fit_events

from ._common import (
    CREATES,
    DESTROYS,
    READ_ONLY,
    RUNS_AGENT,
    UPDATES,
    IdempotencyKey,
    Json,
    ProgressReporter,
    fit_page,
    last_stop_reason,
    services,
    tool_errors,
)
from ._schemas import FileText, Page, Sent, WaitOutput
from .resources import announce_new_session

SessionId = Annotated[str, Field(description="The session's id (`sesn_…`).")]
MAX_WAIT_S = 45.0
READ_LIMIT = 30_000


def _as_text(path: str, data: bytes, *, complete: bool) -> tuple[str, int]:
    """The chunk as text, and how many of its bytes that text covers.

    A multi-byte character cut at a chunk's end is left for the next chunk.

    Raises:
        InvalidRequestError: the file is not UTF-8 text.
    """
    for cut in range(1 if complete else 4):
        try:
            return data[: len(data) - cut].decode("utf-8"), len(data) - cut
        except UnicodeDecodeError:
            continue
    msg = (
        f"{path} is not a text file; it cannot be shown here. Files the sub-agent writes to "
        "/mnt/session/outputs/ become downloadable after its turn (list_files with "
        "scope_id=<session id>, then download_file); ask it to copy the file there"
    )
    raise InvalidRequestError(msg)


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
        idempotency_key: IdempotencyKey = None,
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
            session = await services(ctx).sessions.create(params, idempotency_key=idempotency_key)
        await announce_new_session(ctx)
        return session

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
    ) -> Page:
        """List sessions, newest first, with their status (filter by agent or status).

        Returns `{data, next_page}`; pass `next_page` as `page` for more.
        """
        with tool_errors():
            result = await services(ctx).sessions.list(
                limit=limit,
                page=page,
                agent_id=agent_id,
                agent_version=agent_version,
                statuses=statuses,
                include_archived=include_archived,
            )
            return Page(data=result.data, next_page=result.next_page)

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
    ) -> Sent:
        """Send an event to a session and return at once (the event is stored and queued).

        A `user.message` starts a turn, or joins the running one; `user.interrupt` stops the
        current turn. Then call `wait_for_session` to follow the work.
        """
        with tool_errors():
            stored = await services(ctx).sessions.send_events(session_id, [event])
            return Sent(data=stored)

    @mcp.tool(title="Send message", annotations=RUNS_AGENT)
    async def send_message(
        ctx: Context,
        session_id: SessionId,
        text: Annotated[str, Field(min_length=1, description="What to ask the sub-agent.")],
    ) -> Sent:
        """Send a text `user.message` to a session (shorthand for `send_event`) and return at
        once. Then call `wait_for_session`."""
        with tool_errors():
            event = UserMessageEvent(type="user.message", content=text)  # type: ignore[arg-type]
            stored = await services(ctx).sessions.send_events(session_id, [event])
            return Sent(data=stored)

    @mcp.tool(title="Interrupt session", annotations=RUNS_AGENT)
    async def interrupt_session(ctx: Context, session_id: SessionId) -> Sent:
        """Stop what the session is doing (model stream and running command); it goes idle.

        Shorthand for `send_event` with `{"type": "user.interrupt"}`.
        """
        with tool_errors():
            event = UserInterruptEvent(type="user.interrupt")
            stored = await services(ctx).sessions.send_events(session_id, [event])
            return Sent(data=stored)

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
        detail: Annotated[
            Literal["summary", "full"],
            Field(
                description="`summary`: compact messages and tool calls (outputs clipped); "
                "`full`: the stored events."
            ),
        ] = "summary",
    ) -> WaitOutput:
        """Wait until the session needs input (idle) or `timeout_s` passes, whichever is first.

        Returns `status`, `done` (true when the sub-agent finished or needs you), the turn's
        `stop_reason`, the events after `after`, and `next_after`. If `done` is false (or
        `more` is true), call again with `after` = `next_after`. Sends progress notifications
        while waiting.
        """
        with tool_errors():
            result = await services(ctx).sessions.wait(
                session_id,
                after=after,
                timeout=min(timeout_s, MAX_WAIT_S),
                on_events=ProgressReporter(ctx),
            )
        items, last, more = fit_events(result.events, full=detail == "full")
        return WaitOutput(
            session_id=session_id,
            status=result.session["status"],
            done=result.done and not more,
            stop_reason=last_stop_reason(result.events) if result.done else None,
            events=items,
            next_after=last or after,
            more=more,
        )

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
    ) -> Page:
        """List a session's stored events in order. Returns `{data, next_page}`; a page is cut
        short (with a `next_page`) when it would be too large for one result."""
        with tool_errors():
            result = await services(ctx).sessions.list_events(
                session_id, limit=limit, page=page, order=order, types=types
            )
            sessions = services(ctx).sessions

            async def cursor_after(event: Json) -> str:
                position = await sessions.event_position(session_id, event["id"])
                return encode_cursor(order, position)

            data, cursor = await fit_page(result.data, result.next_page, cursor_after)
            return Page(data=data, next_page=cursor)

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
        offset: Annotated[int, Field(ge=0, description="Byte offset to start at.")] = 0,
        limit: Annotated[
            int, Field(ge=1, le=READ_LIMIT, description=f"Bytes to read (≤{READ_LIMIT}).")
        ] = READ_LIMIT,
    ) -> FileText:
        """Read a text file from a session's sandbox (e.g. something the sub-agent wrote).

        Long files come in chunks: the result says how many bytes remain and the
        `next_offset` to continue from. Binary files are refused (download them instead).
        """
        with tool_errors():
            resolved, data, size = await services(ctx).sessions.read_file(
                session_id, path, offset=offset, length=limit
            )
            text, used = _as_text(resolved, data, complete=offset + len(data) >= size)
        end = offset + used
        return FileText(
            path=resolved,
            size=size,
            offset=offset,
            content=text,
            next_offset=end if end < size else None,
            remaining=size - end,
        )

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
        """List the files mounted in a session (read-only under /mnt/session/uploads/).

        Returns `{data}` with each resource's id, file_id and mount_path.
        """
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
