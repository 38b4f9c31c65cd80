"""A unix-socket relay in front of the Docker daemon that a test can take down and bring back.

To the server behind it, `stop()` looks like the daemon going away: new connections are
refused and every open one (API calls, attached exec streams) is cut. `start()` brings it back.
The daemon and its containers keep running, as with Docker's live-restore.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.abc


def daemon_socket() -> str:
    """Path of the daemon's unix socket, from DOCKER_HOST or Docker's default."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        raise RuntimeError(f"the relay needs a unix-socket DOCKER_HOST, not {host}")
    return host.removeprefix("unix://")


class SocketRelay:
    """Relays `path` to `target`; run it with `async with relay.running(task_group)`."""

    def __init__(self, path: Path, target: str) -> None:
        self.path = path
        self.target = target
        self._scope: anyio.CancelScope | None = None
        self._group: anyio.abc.TaskGroup | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SocketRelay]:
        async with anyio.create_task_group() as group:
            self._group = group
            await self.start()
            try:
                yield self
            finally:
                await self.stop()
                group.cancel_scope.cancel()

    async def start(self) -> None:
        assert self._group is not None, "start() runs inside running()"
        assert self._scope is None, "the relay is already running"
        self.path.unlink(missing_ok=True)
        listener = await anyio.create_unix_listener(self.path)
        self._scope = await self._group.start(self._serve, listener)

    async def stop(self) -> None:
        """Refuse new connections and cut every open one."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
        self.path.unlink(missing_ok=True)

    async def _serve(
        self,
        listener: anyio.abc.SocketListener,
        *,
        task_status: anyio.abc.TaskStatus[anyio.CancelScope] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            async with listener, anyio.create_task_group() as connections:
                while True:
                    client = await listener.accept()
                    connections.start_soon(self._relay, client)

    async def _relay(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            try:
                upstream = await anyio.connect_unix(self.target)
            except OSError:
                return
            async with upstream, anyio.create_task_group() as pumps:

                async def pump(
                    source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream
                ) -> None:
                    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        async for chunk in source:
                            await sink.send(chunk)
                        with contextlib.suppress(OSError):
                            await sink.send_eof()
                    # one direction ending does not end the other (half-close), except on error

                pumps.start_soon(pump, client, upstream)
                pumps.start_soon(pump, upstream, client)
