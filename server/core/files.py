"""Files: uploads and session outputs; content-addressed blobs on disk, metadata in SQLite."""

from __future__ import annotations

import contextlib
import hashlib
import json
import mimetypes
import os
import posixpath
import sqlite3
import stat
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.to_thread

from .clock import now
from .errors import InvalidRequestError, NotFoundError, RequestTooLargeError
from .idempotency import IdempotencyKeys, create_once
from .store import Database, Json, Page, dumps, paginate_by_id

CHUNK = 1 << 20
SENSITIVE_NAMES = frozenset(
    {
        ".env",
        ".netrc",
        ".git-credentials",
        ".npmrc",
        ".pypirc",
        "id_rsa",
        "id_dsa",
        "id_ecdsa",
        "id_ed25519",
        "credentials",
        "config.json",
        "kubeconfig",
    }
)
SENSITIVE_DIRS = frozenset({".ssh", ".aws", ".gnupg", ".kube", ".docker", ".azure", "gcloud"})
SENSITIVE_SUFFIXES = (".pem", ".key", ".p12", ".pfx", ".kdbx")


def _decode(row: sqlite3.Row) -> Json:
    body: Json = json.loads(row["body"])
    return body


def _missing(file_id: str) -> NotFoundError:
    msg = f"file {file_id} not found; call list_files to see the files you can use"
    return NotFoundError(msg)


def looks_sensitive(path: Path) -> str | None:
    """Why `path` looks like a credential file (None when it does not)."""
    name = path.name.lower()
    parts = {p.lower() for p in path.parts[:-1]}
    if name in SENSITIVE_NAMES or name.startswith(".env."):
        return f"its name ({path.name}) is typical of secrets"
    if name.endswith(SENSITIVE_SUFFIXES):
        return f"its extension marks a key or certificate ({path.suffix})"
    hits = parts & SENSITIVE_DIRS
    if hits:
        return f"it lives in a credentials directory ({sorted(hits)[0]})"
    return None


class BlobStore:
    """Immutable blobs named by their SHA-256, under `<home>/blobs/ab/abcdef…`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def put_stream(self, source: IO[bytes], *, limit: int) -> tuple[str, int]:
        """Copy `source` into the store (blocking); return (sha256, size).

        Raises:
            RequestTooLargeError: more than `limit` bytes arrived (nothing is kept).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(CHUNK):
                    size += len(chunk)
                    if size > limit:
                        msg = (
                            f"the file is larger than the {limit}-byte upload limit "
                            "(MANAGED_AGENTS_MAX_UPLOAD_MB)"
                        )
                        raise RequestTooLargeError(msg)
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            target = self.path(sha)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                tmp.unlink()
            else:
                tmp.replace(target)
            return sha, size
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def put_bytes(self, data: bytes, *, limit: int) -> tuple[str, int]:
        import io

        return self.put_stream(io.BytesIO(data), limit=limit)

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def remove(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(sha256).unlink()


def file_object(
    *,
    file_id: str,
    filename: str,
    size: int,
    mime_type: str | None = None,
    scope_id: str | None = None,
    downloadable: bool = True,
) -> Json:
    """A file's metadata in the API's shape."""
    return {
        "id": file_id,
        "type": "file",
        "filename": filename,
        "mime_type": mime_type or guess_mime_type(filename),
        "size_bytes": size,
        "created_at": now(),
        "downloadable": downloadable,
        "expires_at": None,
        "scope": {"type": "session", "id": scope_id} if scope_id else None,
    }


def guess_mime_type(filename: str) -> str:
    guessed, _ = mimetypes.guess_type(filename)
    if guessed:
        return guessed
    if posixpath.splitext(filename)[1].lower() in (".md", ".txt", ".log", ".csv", ".tsv"):
        return "text/plain"
    return "application/octet-stream"


def clean_filename(name: str) -> str:
    """A display name: no directories, no control characters, 1-255 characters.

    Raises:
        InvalidRequestError: nothing usable is left.
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    if not base or base in (".", ".."):
        msg = f"filename {name[:80]!r} is not usable; give a plain file name like report.csv"
        raise InvalidRequestError(msg)
    return base[:255]


class FileService:
    """Upload, list, read and delete files; session-scoped copies for mounts and outputs."""

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        *,
        max_upload_bytes: int,
        keys: IdempotencyKeys | None = None,
    ) -> None:
        self._db = db
        self.blobs = blobs
        self.max_upload_bytes = max_upload_bytes
        self._keys = keys

    async def upload_path(
        self, path: Path, *, filename: str | None = None, idempotency_key: str | None = None
    ) -> Json:
        """Store a copy of the host file at `path`.

        Uploads with an `idempotency_key` are recorded once per key and content (see
        idempotency.py); the bytes are content-addressed, so a repeat stores nothing new.

        Raises:
            InvalidRequestError: the path is not a readable regular file, or looks like a secret.
            RequestTooLargeError: it exceeds the upload limit.
        """

        def copy() -> tuple[Path, str, int]:
            source = path.expanduser()
            if not source.is_absolute():
                msg = f"path {str(path)!r} must be absolute (the server's cwd is not yours)"
                raise InvalidRequestError(msg)
            reason = looks_sensitive(source)
            if reason:
                msg = (
                    f"refusing to upload {source}: {reason}. Credentials must not reach a "
                    "sandbox; copy the non-secret content to another file and upload that"
                )
                raise InvalidRequestError(msg)
            try:
                info = source.stat()
                if not stat.S_ISREG(info.st_mode):
                    msg = f"{source} is not a regular file"
                    raise InvalidRequestError(msg)
                if info.st_size > self.max_upload_bytes:
                    msg = (
                        f"{source} is {info.st_size} bytes, over the {self.max_upload_bytes}-"
                        "byte upload limit (MANAGED_AGENTS_MAX_UPLOAD_MB)"
                    )
                    raise RequestTooLargeError(msg)
                with source.open("rb") as handle:
                    sha, size = self.blobs.put_stream(handle, limit=self.max_upload_bytes)
            except OSError as exc:
                msg = f"cannot read {source}: {exc.strerror or exc}"
                raise InvalidRequestError(msg) from exc
            return source, sha, size

        source, sha, size = await anyio.to_thread.run_sync(copy)
        return await self._insert(
            filename or source.name, sha, size, idempotency_key=idempotency_key
        )

    async def download_to(self, file_id: str, path: Path, *, overwrite: bool = False) -> Json:
        """Write the file's bytes to the host path `path`; return its metadata.

        Raises:
            InvalidRequestError: the path is relative, exists (without `overwrite`), or its
                directory is missing.
        """
        row = await self._row(file_id)
        blob = self.blobs.path(row["sha256"])

        def write() -> None:
            target = path.expanduser()
            if not target.is_absolute():
                msg = f"path {str(path)!r} must be absolute"
                raise InvalidRequestError(msg)
            if target.exists() and not overwrite:
                msg = f"{target} already exists; pass overwrite=true to replace it"
                raise InvalidRequestError(msg)
            if not target.parent.is_dir():
                msg = f"directory {target.parent} does not exist"
                raise InvalidRequestError(msg)
            with blob.open("rb") as source, target.open("wb") as out:
                while chunk := source.read(CHUNK):
                    out.write(chunk)

        await anyio.to_thread.run_sync(write)
        return _decode(row)

    async def upload_bytes(
        self,
        data: bytes,
        *,
        filename: str,
        mime_type: str | None = None,
        idempotency_key: str | None = None,
    ) -> Json:
        sha, size = await anyio.to_thread.run_sync(
            lambda: self.blobs.put_bytes(data, limit=self.max_upload_bytes)
        )
        return await self._insert(
            filename, sha, size, mime_type=mime_type, idempotency_key=idempotency_key
        )

    async def upload_stream(
        self,
        source: IO[bytes],
        *,
        filename: str,
        mime_type: str | None = None,
        idempotency_key: str | None = None,
    ) -> Json:
        """Store the bytes read from `source` (blocking reads, run in a worker thread).

        Raises:
            InvalidRequestError: `filename` is not usable (checked before anything is stored).
            RequestTooLargeError: more than the upload limit arrived (nothing is kept).
        """
        filename = clean_filename(filename)
        sha, size = await anyio.to_thread.run_sync(
            lambda: self.blobs.put_stream(source, limit=self.max_upload_bytes)
        )
        return await self._insert(
            filename, sha, size, mime_type=mime_type, idempotency_key=idempotency_key
        )

    async def _insert(
        self,
        filename: str,
        sha: str,
        size: int,
        *,
        mime_type: str | None = None,
        scope_id: str | None = None,
        origin: str = "upload",
        path: str | None = None,
        idempotency_key: str | None = None,
    ) -> Json:
        filename = clean_filename(filename)
        request = {"filename": filename, "sha256": sha, "size": size, "mime_type": mime_type}
        return await create_once(
            self._keys,
            "files",
            idempotency_key,
            request,
            prefix="file",
            create=lambda file_id: self._insert_as(
                file_id, filename, sha, size, mime_type, scope_id, origin, path
            ),
            fetch=self.retrieve,
        )

    async def _insert_as(
        self,
        file_id: str,
        filename: str,
        sha: str,
        size: int,
        mime_type: str | None,
        scope_id: str | None,
        origin: str,
        path: str | None,
    ) -> Json:
        record = file_object(
            file_id=file_id,
            filename=filename,
            size=size,
            mime_type=mime_type,
            scope_id=scope_id,
        )

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO files (id, sha256, scope_id, origin, path, body) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (record["id"], sha, scope_id, origin, path, dumps(record)),
            )

        await self._db.write(insert)
        return record

    async def retrieve(self, file_id: str) -> Json:
        row = await self._row(file_id)
        return _decode(row)

    async def _row(self, file_id: str) -> sqlite3.Row:
        row = await self._db.read(
            lambda c: c.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        )
        if row is None:
            raise _missing(file_id)
        return row

    async def content(self, file_id: str) -> tuple[Json, bytes]:
        """The file's metadata and bytes."""
        row = await self._row(file_id)
        data = await anyio.to_thread.run_sync(self.blobs.read, row["sha256"])
        return _decode(row), data

    async def blob_path(self, file_id: str) -> tuple[Json, Path]:
        row = await self._row(file_id)
        return _decode(row), self.blobs.path(row["sha256"])

    async def list(
        self,
        *,
        scope_id: str | None = None,
        ids: Sequence[str] | None = None,
        limit: int = 20,
        page: str | None = None,
    ) -> Page:
        sql = "SELECT id, body FROM files WHERE 1=1"
        args: list[Any] = []
        if scope_id:
            sql += " AND scope_id = ?"
            args.append(scope_id)
        if ids:
            sql += f" AND id IN ({', '.join('?' for _ in ids)})"
            args.extend(ids)
        return await self._db.read(
            lambda c: paginate_by_id(
                c, sql, args, limit=limit, page=page, order="desc", decode=_decode
            )
        )

    async def delete(self, file_id: str) -> Json:
        def remove(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT sha256 FROM files WHERE id = ?", (file_id,)).fetchone()
            if row is None:
                raise _missing(file_id)
            if conn.execute(
                "SELECT 1 FROM session_resources WHERE file_id = ?", (file_id,)
            ).fetchone():
                msg = (
                    f"file {file_id} is mounted in a session; delete that session resource "
                    "first (list_session_resources)"
                )
                raise InvalidRequestError(msg)
            conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
            return _unreferenced(conn, [row["sha256"]])[0]

        orphan = await self._db.write(remove)
        if orphan:
            await anyio.to_thread.run_sync(self.blobs.remove, orphan)
        return {"id": file_id, "type": "file_deleted"}

    async def scoped_copy(self, file_id: str, scope_id: str) -> Json:
        """A new file record for the same bytes, scoped to a session (what a mount refers to)."""
        row = await self._row(file_id)
        source = _decode(row)
        return await self._insert(
            source["filename"],
            row["sha256"],
            source["size_bytes"],
            mime_type=source["mime_type"],
            scope_id=scope_id,
            origin="mount",
        )

    async def record_output(
        self, session_id: str, relative_path: str, data: bytes
    ) -> tuple[Json, bool]:
        """Store (or refresh) the output file at `relative_path` of a session.

        Returns the record and whether it is new or changed.
        """
        sha, size = await anyio.to_thread.run_sync(
            lambda: self.blobs.put_bytes(data, limit=max(self.max_upload_bytes, len(data)))
        )
        return await self.record_output_blob(session_id, relative_path, sha, size)

    async def record_output_blob(
        self, session_id: str, relative_path: str, sha: str, size: int
    ) -> tuple[Json, bool]:
        """Like `record_output`, for bytes already in the blob store (`blobs.put_stream`).

        Unchanged content (the same hash at the same path) leaves the record as it is.
        Returns the record and whether it is new or changed.
        """
        existing = await self._db.read(
            lambda c: c.execute(
                "SELECT * FROM files WHERE scope_id = ? AND origin = 'output' AND path = ?",
                (session_id, relative_path),
            ).fetchone()
        )
        if existing is None:
            record = await self._insert(
                relative_path.replace("/", "_") if "/" in relative_path else relative_path,
                sha,
                size,
                scope_id=session_id,
                origin="output",
                path=relative_path,
            )
            return record, True
        if existing["sha256"] == sha:
            return _decode(existing), False
        record = _decode(existing)
        record["size_bytes"] = size
        record["created_at"] = now()

        def update(conn: sqlite3.Connection) -> str | None:
            conn.execute(
                "UPDATE files SET sha256 = ?, body = ? WHERE id = ?",
                (sha, dumps(record), record["id"]),
            )
            return _unreferenced(conn, [existing["sha256"]])[0]

        orphan = await self._db.write(update)
        if orphan:
            await anyio.to_thread.run_sync(self.blobs.remove, orphan)
        return record, True

    async def delete_scope(self, scope_id: str) -> None:
        """Delete every file scoped to a session (when the session is deleted)."""

        def remove(conn: sqlite3.Connection) -> list[str]:
            shas = [
                r[0]
                for r in conn.execute(
                    "SELECT sha256 FROM files WHERE scope_id = ?", (scope_id,)
                ).fetchall()
            ]
            conn.execute("DELETE FROM files WHERE scope_id = ?", (scope_id,))
            return [s for s in _unreferenced(conn, shas) if s]

        for sha in await self._db.write(remove):
            await anyio.to_thread.run_sync(self.blobs.remove, sha)


def _unreferenced(conn: sqlite3.Connection, shas: Iterable[str]) -> list[str | None]:
    """For each blob hash, itself if no file row uses it any more, else None."""
    result: list[str | None] = []
    for sha in shas:
        used = conn.execute("SELECT 1 FROM files WHERE sha256 = ? LIMIT 1", (sha,)).fetchone()
        result.append(None if used else sha)
    return result or [None]
