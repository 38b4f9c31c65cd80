"""MCP resources a client can attach: a session's transcript and the files in its workspace."""

from __future__ import annotations

import contextlib

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError

from server.core.errors import ManagedAgentsError, NotFoundError
from server.present import transcript_markdown

from ._common import services

TRANSCRIPT = "session://{session_id}/transcript"
FILES = "session://{session_id}/files/{+path}"
FILE_LIMIT = 1 << 20
LISTED_SESSIONS = 50


def transcript_uri(session_id: str) -> str:
    return f"session://{session_id}/transcript"


async def announce_new_session(ctx: Context) -> None:
    """Tell the client the resource list changed (a session appeared). Best effort."""
    with contextlib.suppress(Exception):
        await ctx.notify_resources_changed()
    if ctx.protocol_version != "2026-07-28":
        with contextlib.suppress(Exception):
            await ctx.session.send_resource_list_changed()


def register(mcp: MCPServer) -> None:
    @mcp.resource(
        TRANSCRIPT,
        title="Session transcript",
        description="A session's conversation as Markdown: messages, tool calls (outputs "
        "clipped), errors.",
        mime_type="text/markdown",
    )
    async def session_transcript(session_id: str, ctx: Context) -> str:
        try:
            store = services(ctx).store
            record = await store.require(session_id)
            events = await store.events(session_id)
        except NotFoundError as exc:
            raise ResourceNotFoundError(str(exc)) from exc
        return transcript_markdown(record.session, events)

    @mcp.resource(
        FILES,
        title="Session file",
        description="A file from a session's sandbox (paths under /workspace, /mnt/session, "
        "/tmp, /home/agent; relative paths start at /workspace).",
    )
    async def session_file(session_id: str, path: str, ctx: Context) -> str | bytes:
        try:
            _, data, size = await services(ctx).sessions.read_file(
                session_id, path, length=FILE_LIMIT
            )
        except NotFoundError as exc:
            raise ResourceNotFoundError(str(exc)) from exc
        except ManagedAgentsError as exc:
            raise ResourceError(str(exc)) from exc
        if size > len(data):
            msg = f"{path} is {size} bytes; resources stop at {FILE_LIMIT}: use read_file"
            raise ResourceError(msg)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data
