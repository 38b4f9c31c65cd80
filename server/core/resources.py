"""Session resources: uploaded files mounted read-only into a session's container."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .clock import now
from .errors import ConflictError, InvalidRequestError, NotFoundError
from .files import FileService
from .ids import new_id
from .models import FileResourceParam
from .paths import mount_path
from .session_store import SessionStore
from .store import Json, dumps

if TYPE_CHECKING:
    from .sessions import SessionRuntime

MAX_FILES_PER_SESSION = 500


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


class ResourceService:
    """Add, list and remove the files mounted in a session."""

    def __init__(self, store: SessionStore, files: FileService, runtime: SessionRuntime) -> None:
        self._store = store
        self._db = store.db
        self.files = files
        self._runtime = runtime

    async def validate(
        self, params: Sequence[FileResourceParam], existing: Sequence[Json] = ()
    ) -> list[str]:
        """Check files exist and mount paths are valid and distinct; return the mount paths.

        Raises:
            NotFoundError: a file does not exist.
            InvalidRequestError: a mount path is invalid, taken, or there are too many files.
        """
        if len(existing) + len(params) > MAX_FILES_PER_SESSION:
            msg = f"a session can mount at most {MAX_FILES_PER_SESSION} files"
            raise InvalidRequestError(msg)
        taken = [r["mount_path"] for r in existing]
        paths: list[str] = []
        for param in params:
            await self.files.retrieve(param.file_id)
            path = mount_path(param.mount_path, param.file_id)
            clash = next((t for t in taken if _overlaps(t, path)), None)
            if clash is not None:
                msg = (
                    f"mount_path {path} collides with {clash}, already mounted in this "
                    "session; choose another path"
                )
                raise ConflictError(msg)
            taken.append(path)
            paths.append(path)
        return paths

    async def attach(self, session_id: str, params: Sequence[FileResourceParam]) -> list[Json]:
        """Mount files into a session (all or none)."""
        paths = await self.validate(params, await self._store.resources(session_id))
        copies: list[Json] = []
        try:
            mounts = []
            for param, path in zip(params, paths, strict=True):
                copy = await self.files.scoped_copy(param.file_id, session_id)
                copies.append(copy)
                _, blob = await self.files.blob_path(copy["id"])
                mounts.append((path, blob))
            await self._runtime.mount_files(session_id, mounts)
        except BaseException:
            for copy in copies:
                await self.files.delete(copy["id"])
            raise
        stamp = now()
        resources = [
            {
                "id": new_id("sesrsc"),
                "type": "file",
                "file_id": copy["id"],
                "mount_path": path,
                "created_at": stamp,
                "updated_at": stamp,
            }
            for copy, path in zip(copies, paths, strict=True)
        ]

        def insert(conn: sqlite3.Connection) -> None:
            for resource in resources:
                conn.execute(
                    "INSERT INTO session_resources (id, session_id, file_id, mount_path, body) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (
                        resource["id"],
                        session_id,
                        resource["file_id"],
                        resource["mount_path"],
                        dumps(resource),
                    ),
                )

        await self._db.write(insert)
        return resources

    async def add(self, session_id: str, param: FileResourceParam) -> Json:
        """Mount one file into a (not archived) session, running or idle.

        Raises:
            NotFoundError: unknown session or file.
            ConflictError: the session is archived, or the mount path is taken.
            InvalidRequestError: the mount path is invalid.
        """
        record = await self._store.require(session_id)
        if record.session["archived_at"] is not None:
            msg = f"session {session_id} is archived and read-only"
            raise ConflictError(msg)
        (resource,) = await self.attach(session_id, [param])
        return resource

    async def list(self, session_id: str) -> list[Json]:
        await self._store.require(session_id)
        return await self._store.resources(session_id)

    async def retrieve(self, session_id: str, resource_id: str) -> Json:
        row = await self._db.read(
            lambda c: c.execute(
                "SELECT body FROM session_resources WHERE id = ? AND session_id = ?",
                (resource_id, session_id),
            ).fetchone()
        )
        if row is None:
            await self._store.require(session_id)
            msg = (
                f"resource {resource_id} not found in session {session_id}; call "
                "list_session_resources"
            )
            raise NotFoundError(msg)
        resource: Json = json.loads(row[0])
        return resource

    async def delete(self, session_id: str, resource_id: str) -> Json:
        """Remove the file from the container and forget the resource."""
        resource = await self.retrieve(session_id, resource_id)
        record = await self._store.require(session_id)
        if record.session["archived_at"] is None:
            await self._runtime.unmount_file(session_id, resource["mount_path"])
        await self._db.write(
            lambda c: c.execute("DELETE FROM session_resources WHERE id = ?", (resource_id,))
        )
        await self.files.delete(resource["file_id"])
        return {"id": resource_id, "type": "session_resource_deleted"}
