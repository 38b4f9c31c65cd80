"""Run the real HTTP app (uvicorn on a pre-bound loopback socket) inside a test's task."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import anyio
import uvicorn

from sandbox.docker import DockerBackend
from server.app import Services, build_server, open_services
from server.http import build_http_app
from server.rest import end_streams, routes
from server.settings import Settings
from tests.conftest import model_for
from tests.fakes.messages_api import FakeMessagesAPI

if TYPE_CHECKING:
    from starlette.applications import Starlette


@dataclass(frozen=True, slots=True)
class RunningServer:
    url: str
    token: str | None
    services: Services

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test process owns signals
        return

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield

    async def shutdown(self, sockets: Any = None) -> None:
        # As `serve` does: open REST event streams would hold the shutdown up.
        end_streams(cast("Starlette", self.config.app))
        await super().shutdown(sockets)


@contextlib.asynccontextmanager
async def http_server(
    settings: Settings,
    fake_api: FakeMessagesAPI,
    *,
    token: str | None = "test-token",
    rest: dict[str, Any] | None = None,
    **http: Any,
) -> AsyncIterator[RunningServer]:
    """The app `serve --transport http` runs, with Docker and the fake model API.

    `rest` are options of the REST routes (e.g. `heartbeat_interval`).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = replace(settings, token=token)
    try:
        async with open_services(
            settings, backend=DockerBackend(), model=model_for(fake_api)
        ) as services:
            app = build_http_app(
                build_server(settings, services=services),
                token=token,
                routes=routes(services, **(rest or {})),
                **http,
            )
            server = _Server(uvicorn.Config(app, log_config=None, lifespan="on"))
            async with anyio.create_task_group() as group:
                group.start_soon(server.serve, [sock])
                with anyio.fail_after(20):
                    while not server.started:  # noqa: ASYNC110 - uvicorn exposes only a flag
                        await anyio.sleep(0.01)
                try:
                    yield RunningServer(f"http://127.0.0.1:{port}", token, services)
                finally:
                    server.should_exit = True
    finally:
        sock.close()
