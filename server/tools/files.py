"""MCP tools for files: upload, list, get, download, delete."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Annotated

from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

from server.core.errors import InvalidRequestError, RequestTooLargeError

from ._common import CREATES, DESTROYS, READ_ONLY, IdempotencyKey, Json, services, tool_errors

FileId = Annotated[str, Field(description="The file's id (`file_…`).")]
INLINE_LIMIT = 30_000
"""Bytes a download may return inline (as text or base64) rather than into a host file."""
BASE64_UPLOAD_LIMIT = 8 << 20


def register(mcp: MCPServer) -> None:
    @mcp.tool(title="Upload file", annotations=CREATES)
    async def upload_file(
        ctx: Context,
        path: Annotated[
            str | None,
            Field(
                description="Absolute path of a file on this machine to upload (any size up "
                "to the limit)."
            ),
        ] = None,
        content_base64: Annotated[
            str | None, Field(description="Small files only (≤ 8 MiB): the bytes, base64.")
        ] = None,
        filename: Annotated[
            str | None, Field(description="Name to give the file (required with content).")
        ] = None,
        mime_type: str | None = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        """Upload a file so sessions can use it: mount it with `add_session_resource` (or
        `start_session`'s `resources`), or reference it in a message's image/document block.

        Give either `path` (a host file the server can read) or `content_base64` + `filename`.
        Files that look like credentials (.env, SSH keys, cloud configs) are refused.
        """
        with tool_errors():
            files = services(ctx).files
            if (path is None) == (content_base64 is None):
                msg = "give exactly one of `path` or `content_base64`"
                raise InvalidRequestError(msg)
            if path is not None:
                return await files.upload_path(
                    Path(path), filename=filename, idempotency_key=idempotency_key
                )
            assert content_base64 is not None
            if not filename:
                msg = "`filename` is required with `content_base64`"
                raise InvalidRequestError(msg)
            if len(content_base64) > BASE64_UPLOAD_LIMIT * 4 // 3 + 4:
                msg = "content_base64 is over 8 MiB; write the file to disk and pass `path`"
                raise RequestTooLargeError(msg)
            try:
                data = base64.b64decode(content_base64, validate=True)
            except (binascii.Error, ValueError) as exc:
                msg = "content_base64 is not valid base64"
                raise InvalidRequestError(msg) from exc
            return await files.upload_bytes(
                data, filename=filename, mime_type=mime_type, idempotency_key=idempotency_key
            )

    @mcp.tool(title="List files", annotations=READ_ONLY)
    async def list_files(
        ctx: Context,
        scope_id: Annotated[
            str | None,
            Field(
                description="A session id: only that session's files (its mounts and the "
                "outputs it wrote to /mnt/session/outputs/)."
            ),
        ] = None,
        limit: Annotated[int, Field(ge=1, le=1000)] = 20,
        page: Annotated[str | None, Field(description="`next_page` of the previous call.")] = None,
    ) -> Json:
        """List uploaded files and session outputs, newest first.

        Returns `{data, next_page}`; pass `next_page` as `page` for more.
        """
        with tool_errors():
            result = await services(ctx).files.list(scope_id=scope_id, limit=limit, page=page)
            return result.to_json()

    @mcp.tool(title="Get file", annotations=READ_ONLY)
    async def get_file(ctx: Context, file_id: FileId) -> Json:
        """Get a file's metadata: name, size, MIME type and scope (the session it belongs to).

        Download the bytes with `download_file`.
        """
        with tool_errors():
            return await services(ctx).files.retrieve(file_id)

    @mcp.tool(title="Download file", annotations=READ_ONLY)
    async def download_file(
        ctx: Context,
        file_id: FileId,
        path: Annotated[
            str | None,
            Field(
                description="Absolute host path to write the file to. Without it the content "
                f"comes back inline (text, or base64 for binary), up to {INLINE_LIMIT} bytes."
            ),
        ] = None,
        overwrite: Annotated[
            bool, Field(description="Replace an existing file at `path`.")
        ] = False,
    ) -> Json:
        """Download a file: save it to a host path, or get small files inline."""
        with tool_errors():
            files = services(ctx).files
            if path is not None:
                meta = await files.download_to(file_id, Path(path), overwrite=overwrite)
                return {"file": meta, "path": path, "size_bytes": meta["size_bytes"]}
            meta = await files.retrieve(file_id)
            if meta["size_bytes"] > INLINE_LIMIT:
                msg = (
                    f"file {file_id} is {meta['size_bytes']} bytes, too large to return inline "
                    f"(limit {INLINE_LIMIT}); pass `path` to save it to disk"
                )
                raise RequestTooLargeError(msg)
            _, data = await files.content(file_id)
            try:
                return {"file": meta, "encoding": "utf-8", "content": data.decode("utf-8")}
            except UnicodeDecodeError:
                return {
                    "file": meta,
                    "encoding": "base64",
                    "content": base64.b64encode(data).decode(),
                }

    @mcp.tool(title="Delete file", annotations=DESTROYS)
    async def delete_file(ctx: Context, file_id: FileId) -> Json:
        """Delete an uploaded file or a session output, and its stored bytes.

        Refused while the file is mounted in a session (delete that resource first).
        """
        with tool_errors():
            return await services(ctx).files.delete(file_id)
