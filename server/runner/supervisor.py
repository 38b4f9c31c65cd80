"""Owns this process's session workers and sandboxes; implements the domain's `SessionRuntime`.

One worker task per session with queued events, all children of one task group entered in the
server's lifespan. Start-up recovers sessions whose owning process died mid-turn and removes
containers that belong to no session.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from sandbox.base import Sandbox, SandboxBackend
from sandbox.errors import SandboxError, SandboxPathError, SandboxUnavailable
from server.core.errors import BackendUnavailableError, InvalidRequestError, NotFoundError
from server.core.files import FileService
from server.core.instances import InstanceRegistry
from server.core.session_store import SessionStore
from server.settings import Settings

from .loop import TurnRunner
from .model import ModelClient
from .sandboxes import SandboxManager, write_mounts
from .toolset import Toolset

logger = logging.getLogger(__name__)

Json = dict[str, Any]
ORPHAN_SWEEP_DELAY = 2.0


class Supervisor:
    """Runs session turns in this process; delegates sandboxes to a `SandboxManager`."""

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
        self.sandboxes = SandboxManager(store, instances, backend, settings, files)
        self._runner = TurnRunner(store, model, settings, self, files)
        self._workers: dict[str, bool] = {}
        """Session id → "woken again while running" flag, for sessions with a live worker."""
        self._task_group: anyio.abc.TaskGroup | None = None
        self._stack = contextlib.AsyncExitStack()

    # ------------------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Supervisor:
        async with contextlib.AsyncExitStack() as stack:
            # Outermost: the egress proxies outlive the turns that use them.
            await stack.enter_async_context(self.sandboxes.egress)
            stack.push_async_callback(self._stop_sandboxes)
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
            self.sandboxes.bind(self._task_group)
            self._task_group.start_soon(self._watch_other_processes)
            self._task_group.start_soon(self._recover)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Cancel running turns (they record the shutdown), stop this process's sandboxes,
        then close the egress proxies. Bounded, so a stuck daemon cannot hold the exit."""
        assert self._task_group is not None
        self._task_group.cancel_scope.cancel()
        return await self._stack.__aexit__(exc_type, exc, tb)

    async def _stop_sandboxes(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(30):
            await self.sandboxes.stop_all()

    # ------------------------------------------------------------------------ SessionRuntime

    def prepare_environment(self, environment: Json) -> None:
        """Start building the environment's image (and its warm pool) now."""
        self.sandboxes.images.prepare(environment)
        if self._task_group is not None and self._settings.warm_pool > 0:
            self._task_group.start_soon(self.sandboxes.prewarm, environment)

    async def provision(self, session: Json, environment: Json) -> str:
        try:
            return (await self.sandboxes.provision(session, environment)).id
        except SandboxError as exc:
            raise _unavailable(exc) from exc

    async def destroy(self, session_id: str, sandbox_id: str | None) -> None:
        try:
            await self.sandboxes.destroy(session_id, sandbox_id)
        except SandboxError as exc:
            raise _unavailable(exc) from exc

    async def stop(self, session_id: str, sandbox_id: str | None) -> None:
        try:
            await self.sandboxes.stop(session_id, sandbox_id)
        except SandboxError as exc:
            raise _unavailable(exc) from exc

    async def mount_files(self, session_id: str, mounts: Sequence[tuple[str, Path]]) -> None:
        try:
            await write_mounts(await self._sandbox_for(session_id), mounts)
        except SandboxError as exc:
            raise _unavailable(exc) from exc

    async def unmount_file(self, session_id: str, path: str) -> None:
        try:
            sandbox = await self._sandbox_for(session_id)
            await sandbox.exec(["rm", "-f", "--", path], user="0")
        except SandboxError as exc:
            raise _unavailable(exc) from exc

    async def read_file(
        self, session_id: str, path: str, *, offset: int, length: int, roots: Sequence[str]
    ) -> tuple[bytes, int]:
        try:
            sandbox = await self._sandbox_for(session_id)
            return await sandbox.read_range(path, offset=offset, length=length, roots=roots)
        except SandboxPathError as exc:
            if "no such file" in str(exc):
                raise NotFoundError(f"{exc} in session {session_id}") from exc
            raise InvalidRequestError(str(exc)) from exc
        except SandboxError as exc:
            raise _unavailable(exc) from exc

    def wake(self, session_id: str) -> None:
        if session_id in self._workers:
            self._workers[session_id] = True
            return
        if self._task_group is None:
            logger.warning("session %s woken before the supervisor started", session_id)
            return
        self._workers[session_id] = False
        self._task_group.start_soon(self._worker, session_id)

    async def _sandbox_for(self, session_id: str) -> Sandbox:
        record = await self._store.require(session_id)
        return await self.sandboxes.sandbox_for(
            session_id, owner=record.owner == self._instances.id
        )

    # ------------------------------------------------------------------- SandboxAccess (loop)

    async def toolset_for(self, session_id: str) -> Toolset:
        sandbox = await self.sandboxes.sandbox_for(session_id)
        return Toolset(sandbox, max_timeout=await self._limit(session_id, "command_timeout_s"))

    async def collect_outputs(self, session_id: str) -> list[tuple[str, bytes]]:
        return await self.sandboxes.collect_outputs(session_id)

    async def forget(self, session_id: str) -> None:
        await self.sandboxes.forget(session_id)

    async def turn_timeout(self, session_id: str) -> float | None:
        value = await self._limit(session_id, "turn_timeout_s")
        return value if value != self._settings.max_tool_timeout else None

    async def _limit(self, session_id: str, name: str) -> float:
        environment = await self.sandboxes.environment_of(session_id)
        limits = (environment.get("config") or {}).get("limits") or {}
        return float(limits.get(name) or self._settings.max_tool_timeout)

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
        events = await self._store.events(session_id, types=("agent.tool_use", "agent.tool_result"))
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
        async def known() -> set[str]:
            return {r.session["id"] for r in await self._store.all_sessions()}

        await self.sandboxes.remove_orphans(known)

    async def _watch_other_processes(self) -> None:
        async def on_change(session_ids: set[str]) -> None:
            for session_id in session_ids:
                record = await self._store.get(session_id)
                if record is not None and record.owner == self._instances.id:
                    self.wake(session_id)

        await self._store.bus.watch(
            self._store.db, on_change, interval=self._settings.poll_interval
        )


def _unavailable(exc: SandboxError) -> BackendUnavailableError:
    if isinstance(exc, SandboxUnavailable):
        return BackendUnavailableError(str(exc))
    return BackendUnavailableError(f"the session's container could not be created: {exc}")
