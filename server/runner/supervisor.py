"""Owns this process's session workers and sandboxes; implements the domain's `SessionRuntime`.

One worker task per session with queued events, all children of one task group entered in the
server's lifespan. Start-up recovers sessions whose owning process died mid-turn and removes
containers that belong to no session.
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
import tarfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from sandbox.base import OUTPUTS_DIR, UPLOADS_DIR, Sandbox, SandboxBackend, SandboxSpec
from sandbox.errors import SandboxError, SandboxNotFound, SandboxPathError, SandboxUnavailable
from server.core.errors import BackendUnavailableError, InvalidRequestError, NotFoundError
from server.core.files import FileService
from server.core.instances import InstanceRegistry
from server.core.session_store import SessionRecord, SessionStore
from server.settings import Settings

from .loop import MAX_OUTPUT_FILE, TurnRunner
from .model import ModelClient
from .toolset import Toolset

logger = logging.getLogger(__name__)

Json = dict[str, Any]
LABEL = "managed-agents-mcp"
SESSION_LABEL = "managed-agents-mcp.session"
HOME_LABEL = "managed-agents-mcp.home"
ORPHAN_SWEEP_DELAY = 2.0


class Supervisor:
    """Runs session turns in this process and manages their sandboxes."""

    def __init__(
        self,
        store: SessionStore,
        instances: InstanceRegistry,
        backend: SandboxBackend,
        model: ModelClient,
        settings: Settings,
        files: FileService,
    ) -> None:
        self._store = store
        self._instances = instances
        self._backend = backend
        self._model = model
        self._settings = settings
        self._files = files
        self._runner = TurnRunner(store, model, settings, self, files)
        self._output_index: dict[str, dict[str, str]] = {}
        """Session id → output path → "size mtime" seen at the last collection."""
        self._home_label = hashlib.sha256(str(settings.home.resolve()).encode()).hexdigest()[:16]
        self._sandboxes: dict[str, Sandbox] = {}
        self._sandbox_locks: dict[str, anyio.Lock] = {}
        self._workers: dict[str, bool] = {}
        """Session id → "woken again while running" flag, for sessions with a live worker."""
        self._task_group: anyio.abc.TaskGroup | None = None

    # ------------------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Supervisor:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._watch_other_processes)
        self._task_group.start_soon(self._recover)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Cancel running turns (they record the shutdown), close shells, stop our containers.

        Shielded and bounded, so a stuck daemon cannot hold the server's exit forever.
        """
        assert self._task_group is not None
        self._task_group.cancel_scope.cancel()
        try:
            return await self._task_group.__aexit__(exc_type, exc, tb)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                await self._stop_sandboxes()

    async def _stop_sandboxes(self) -> None:
        sandboxes, self._sandboxes = self._sandboxes, {}
        for session_id, sandbox in sandboxes.items():
            try:
                await sandbox.aclose()
                await self._backend.stop(sandbox.id)
            except SandboxError as exc:
                logger.warning("could not stop the sandbox of %s: %s", session_id, exc)

    # ------------------------------------------------------------------------ SessionRuntime

    def labels(self, session_id: str) -> dict[str, str]:
        return {LABEL: "1", SESSION_LABEL: session_id, HOME_LABEL: self._home_label}

    def _spec(self, session_id: str, environment: Json) -> SandboxSpec:
        networking = (environment.get("config") or {}).get("networking") or {}
        network = "egress" if networking.get("type", "unrestricted") == "unrestricted" else "none"
        return SandboxSpec(
            image=self._settings.image,
            name=f"ma-{session_id}",
            labels=self.labels(session_id),
            network=network,
            limits=self._settings.limits,
        )

    async def provision(self, session: Json, environment: Json) -> str:
        spec = self._spec(session["id"], environment)
        try:
            sandbox = await self._backend.create(spec)
        except SandboxError as exc:
            raise _unavailable(exc) from exc
        self._sandboxes[session["id"]] = sandbox
        return sandbox.id

    async def destroy(self, session_id: str, sandbox_id: str | None) -> None:
        sandbox = self._sandboxes.pop(session_id, None)
        self._output_index.pop(session_id, None)
        if sandbox is not None:
            await sandbox.aclose()
        try:
            await self._backend.remove(sandbox_id or f"ma-{session_id}")
        except SandboxError as exc:
            raise _unavailable(exc) from exc

    async def stop(self, session_id: str, sandbox_id: str | None) -> None:
        sandbox = self._sandboxes.pop(session_id, None)
        if sandbox is not None:
            await sandbox.aclose()
        try:
            await self._backend.stop(sandbox_id or f"ma-{session_id}")
        except SandboxError as exc:
            raise _unavailable(exc) from exc

    async def mount_files(self, session_id: str, mounts: Sequence[tuple[str, Path]]) -> None:
        try:
            await _write_mounts(await self.sandbox_for(session_id), mounts)
        except SandboxError as exc:
            raise _unavailable(exc) from exc

    async def unmount_file(self, session_id: str, path: str) -> None:
        try:
            sandbox = await self.sandbox_for(session_id)
            await sandbox.exec(["rm", "-f", "--", path], user="0")
        except SandboxError as exc:
            raise _unavailable(exc) from exc

    async def collect_outputs(self, session_id: str) -> list[tuple[str, bytes]]:
        """New or changed files under /mnt/session/outputs/ since the last collection."""
        sandbox = self._sandboxes.get(session_id)
        if sandbox is None:
            return []
        listing = await sandbox.exec(
            [
                "sh",
                "-c",
                f"cd {OUTPUTS_DIR} 2>/dev/null || exit 0; "
                "find . -type f -printf '%s %T@ %P\\n' 2>/dev/null | head -n 1000",
            ]
        )
        seen = self._output_index.setdefault(session_id, {})
        changed: list[str] = []
        for line in listing.stdout.decode(errors="replace").splitlines():
            parts = line.split(" ", 2)
            if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) > MAX_OUTPUT_FILE:
                continue
            size, stamp, path = parts
            if seen.get(path) != f"{size} {stamp}":
                seen[path] = f"{size} {stamp}"
                changed.append(path)
        if not changed:
            return []
        archive = await sandbox.exec(
            ["tar", "-c", "-f", "-", "-C", OUTPUTS_DIR, "--", *changed],
            max_output=len(changed) * MAX_OUTPUT_FILE + (1 << 20),
            timeout=300,
        )
        return _read_tar(archive.stdout)

    def wake(self, session_id: str) -> None:
        if session_id in self._workers:
            self._workers[session_id] = True
            return
        if self._task_group is None:
            logger.warning("session %s woken before the supervisor started", session_id)
            return
        self._workers[session_id] = False
        self._task_group.start_soon(self._worker, session_id)

    async def read_file(
        self, session_id: str, path: str, *, max_bytes: int, roots: Sequence[str]
    ) -> bytes:
        try:
            sandbox = await self.sandbox_for(session_id)
            return await sandbox.read_file(path, max_bytes=max_bytes, roots=roots)
        except SandboxPathError as exc:
            if "no such file" in str(exc):
                raise NotFoundError(f"{exc} in session {session_id}") from exc
            raise InvalidRequestError(str(exc)) from exc
        except SandboxError as exc:
            raise _unavailable(exc) from exc

    # -------------------------------------------------------------------------------- workers

    async def _worker(self, session_id: str) -> None:
        try:
            while True:
                self._workers[session_id] = False
                record = await self._store.get(session_id)
                if record is None or record.owner != self._instances.id:
                    return
                if not await self._store.pending(session_id):
                    if not self._workers[session_id]:
                        return
                    continue
                await self._runner.process(session_id)
        except Exception:
            logger.exception("worker of session %s failed", session_id)
        finally:
            self._workers.pop(session_id, None)

    async def toolset_for(self, session_id: str) -> Toolset:
        return Toolset(
            await self.sandbox_for(session_id), max_timeout=self._settings.max_tool_timeout
        )

    async def sandbox_for(self, session_id: str) -> Sandbox:
        """The session's running sandbox: cached, re-attached, or re-created if it is gone."""
        lock = self._sandbox_locks.setdefault(session_id, anyio.Lock())
        async with lock:
            sandbox = self._sandboxes.get(session_id)
            if sandbox is not None:
                return sandbox
            record = await self._store.require(session_id)
            name = record.sandbox_id or f"ma-{session_id}"
            try:
                sandbox = await self._backend.attach(name)
            except SandboxNotFound:
                logger.warning("the sandbox of %s is gone; creating a new one", session_id)
                environment = await self._environment(record)
                sandbox = await self._backend.create(self._spec(session_id, environment))
                await self._store.set_columns(session_id, sandbox_id=sandbox.id)
            # A stopped or re-created container has empty tmpfs mounts: put the files back.
            mounts = []
            for resource in await self._store.resources(session_id):
                _, blob = await self._files.blob_path(resource["file_id"])
                mounts.append((resource["mount_path"], blob))
            await _write_mounts(sandbox, mounts)
            self._sandboxes[session_id] = sandbox
            return sandbox

    async def _environment(self, record: SessionRecord) -> Json:
        import json

        row = await self._store.db.read(
            lambda c: c.execute(
                "SELECT body FROM environments WHERE id = ?", (record.session["environment_id"],)
            ).fetchone()
        )
        return json.loads(row[0]) if row else {}

    # ------------------------------------------------------------------------------- recovery

    async def _recover(self) -> None:
        """Finish what dead processes left behind: stuck turns, queued events, orphan containers."""
        try:
            for record in await self._store.all_sessions():
                if self._instances.is_alive(record.owner):
                    continue
                session_id = record.session["id"]
                if not await self._store.claim(session_id, self._instances.id, record.owner):
                    continue
                if record.session["status"] in ("running", "rescheduling"):
                    await self._abandon_turn(session_id)
                if await self._store.pending(session_id):
                    self.wake(session_id)
            # Loading docker-py and asking the daemon can wait until the client's handshake is
            # done: MCP clients time a stdio server's start.
            await anyio.sleep(ORPHAN_SWEEP_DELAY)
            await self._remove_orphans()
        except (SandboxError, OSError) as exc:
            logger.warning("start-up recovery could not finish: %s", exc)

    async def _abandon_turn(self, session_id: str) -> None:
        events = await self._store.events(session_id)
        answered = {e.get("tool_use_id") for e in events if e["type"] == "agent.tool_result"}
        closing: list[Json] = [
            {
                "type": "agent.tool_result",
                "tool_use_id": e["id"],
                "content": [
                    {
                        "type": "text",
                        "text": "The server stopped while this tool call ran; its outcome is "
                        "unknown and it was not run again.",
                    }
                ],
                "is_error": True,
            }
            for e in events
            if e["type"] == "agent.tool_use" and e["id"] not in answered
        ]
        record = await self._store.require(session_id)
        await self._store.append(
            session_id,
            [
                *closing,
                {
                    "type": "session.error",
                    "error": {
                        "type": "unknown_error",
                        "message": (
                            "the server stopped during this turn, which was abandoned; send a "
                            "message to continue"
                        ),
                        "retry_status": {"type": "exhausted"},
                    },
                },
                {"type": "session.usage", "usage": record.session["usage"], "budget": None},
                {
                    "type": "session.status_idle",
                    "stop_reason": {"type": "retries_exhausted"},
                    "stop_details": None,
                },
            ],
            status="idle",
        )

    async def _remove_orphans(self) -> None:
        known = {r.session["id"] for r in await self._store.all_sessions()}
        for info in await self._backend.list({LABEL: "1", HOME_LABEL: self._home_label}):
            if info.labels.get(SESSION_LABEL) not in known:
                logger.info("removing orphan sandbox %s", info.name)
                await self._backend.remove(info.id)

    async def _watch_other_processes(self) -> None:
        async def on_change(session_ids: set[str]) -> None:
            for session_id in session_ids:
                record = await self._store.get(session_id)
                if record is not None and record.owner == self._instances.id:
                    self.wake(session_id)

        await self._store.bus.watch(
            self._store.db, on_change, interval=self._settings.poll_interval
        )


async def _write_mounts(sandbox: Sandbox, mounts: Sequence[tuple[str, Path]]) -> None:
    """Extract the files, read-only and owned by root, under /mnt/session/uploads/ in one go."""
    if not mounts:
        return

    def pack() -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path, blob in mounts:
                info = tar.gettarinfo(str(blob), arcname=posixpath.relpath(path, UPLOADS_DIR))
                info.mode, info.uid, info.gid, info.uname, info.gname = 0o444, 0, 0, "", ""
                with blob.open("rb") as data:
                    tar.addfile(info, data)
        return buffer.getvalue()

    payload = await anyio.to_thread.run_sync(pack)
    result = await sandbox.exec(
        ["tar", "-x", "-f", "-", "-C", UPLOADS_DIR, "--no-same-owner"],
        user="0",
        stdin=payload,
        timeout=300,
    )
    if result.exit_code != 0:
        reason = result.stderr.decode(errors="replace").strip()
        msg = f"mounting files failed: {reason or f'tar exit {result.exit_code}'}"
        raise SandboxError(msg, op="mount")


def _read_tar(data: bytes) -> list[tuple[str, bytes]]:
    """Regular files of an archive made by our own `tar -c` (nothing is extracted to disk)."""
    files: list[tuple[str, bytes]] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            handle = tar.extractfile(member)
            if handle is not None:
                files.append((posixpath.normpath(member.name).lstrip("/"), handle.read()))
    return files


def _unavailable(exc: SandboxError) -> BackendUnavailableError:
    if isinstance(exc, SandboxUnavailable):
        return BackendUnavailableError(str(exc))
    return BackendUnavailableError(f"the session's container could not be created: {exc}")
