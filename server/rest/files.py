"""`/v1/files`: multipart upload, list (`scope_id`, `ids`), metadata, content, delete."""

from __future__ import annotations

import mimetypes
from typing import TYPE_CHECKING

import anyio
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from server.core.errors import ManagedAgentsError, RequestTooLargeError

from ._wire import Query, idempotency_key, invalid, json_response, route

if TYPE_CHECKING:
    from server.app import Services

MAX_PAGE = 1000
MAX_IDS = 100
MULTIPART_OVERHEAD = 1 << 20
"""Allowance for the multipart framing around the file when checking Content-Length."""
UPLOAD_FIELDS = frozenset({"file", "expires_in_seconds"})


def routes(services: Services) -> list[Route]:
    files = services.files

    async def upload(request: Request) -> Response:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > files.max_upload_bytes + MULTIPART_OVERHEAD:
            msg = (
                f"the upload is {declared} bytes, over the {files.max_upload_bytes}-byte limit "
                "(MANAGED_AGENTS_MAX_UPLOAD_MB)"
            )
            raise RequestTooLargeError(msg)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            invalid("upload the file as multipart/form-data with the bytes in a `file` part")
        try:
            form = await request.form(max_files=1, max_fields=len(UPLOAD_FIELDS))
        except HTTPException as exc:
            invalid(f"the multipart body could not be read: {exc.detail}")
        try:
            unknown = sorted(set(form.keys()) - UPLOAD_FIELDS)
            if unknown:
                invalid(f"unknown multipart field(s) {unknown}; send only `file`")
            if form.get("expires_in_seconds") not in (None, ""):
                invalid(
                    "expires_in_seconds is not supported by this server: files are kept until "
                    "you delete them (DELETE /v1/files/{file_id}); omit it"
                )
            part = form.get("file")
            if not isinstance(part, UploadFile):
                invalid("the multipart body needs a `file` part holding the file's bytes")
            content_type = (part.content_type or "").split(";")[0].strip() or None
            if content_type == "application/octet-stream":
                content_type = None  # httpx's default: the name says more
            # As the API does: keep the name's last component; no name becomes `unnamed`.
            filename = part.filename or "unnamed" + (
                mimetypes.guess_extension(content_type or "") or ""
            )
            meta = await files.upload_stream(
                part.file,
                filename=filename,
                mime_type=content_type,
                idempotency_key=idempotency_key(request),
            )
        finally:
            await form.close()
        return json_response(meta)

    async def list_files(request: Request) -> Response:
        query = Query(request)
        ids = query.values("ids")
        if ids:
            if query.text("page") or query.text("limit"):
                invalid("ids cannot be combined with page or limit; send one or the other")
            if len(ids) > MAX_IDS:
                invalid(f"ids may name at most {MAX_IDS} files, got {len(ids)}")
        page = await files.list(
            scope_id=query.text("scope_id"),
            ids=ids or None,
            limit=MAX_IDS if ids else query.limit(default=20, high=MAX_PAGE),
            page=query.text("page"),
        )
        return json_response(page.to_json())

    async def metadata(request: Request) -> Response:
        return json_response(await files.retrieve(request.path_params["file_id"]))

    async def content(request: Request) -> Response:
        meta, path = await files.blob_path(request.path_params["file_id"])
        # FileResponse finds a missing file only after the endpoint returned, too late for an
        # error envelope.
        if not await anyio.Path(path).is_file():
            msg = f"the content of file {meta['id']} is missing from the data dir's blob store"
            raise ManagedAgentsError(msg)
        return FileResponse(
            path,
            media_type=meta["mime_type"],
            filename=meta["filename"],
            content_disposition_type="attachment",
        )

    async def delete(request: Request) -> Response:
        return json_response(await files.delete(request.path_params["file_id"]))

    return [
        route("/files", GET=list_files, POST=upload),
        route("/files/{file_id}", GET=metadata, DELETE=delete),
        route("/files/{file_id}/content", GET=content),
    ]
