"""Shared fixtures: a real Docker daemon (or a skip/fail), the fake Messages API, MCP clients."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import tempfile
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from sandbox.docker import DockerBackend
from sandbox.images import DEFAULT_IMAGE
from server.app import Services, build_server, open_services
from server.runner.model import AnthropicModelClient
from server.settings import Settings
from tests.fakes.messages_api import FakeMessagesAPI

REQUIRE_DOCKER = os.environ.get("REQUIRE_DOCKER") == "1"
REQUIRE_BWRAP = os.environ.get("REQUIRE_BWRAP") == "1"
IMAGE = os.environ.get("MANAGED_AGENTS_IMAGE") or DEFAULT_IMAGE


def _docker_problem() -> str | None:
    """Why Docker tests cannot run here, or None when they can."""
    import docker
    import docker.errors

    try:
        # docker-py leaves its probe socket open when no daemon answers; collect it here so the
        # warnings-as-errors setting does not turn a skip into an error.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            try:
                client = docker.from_env(timeout=10)
            finally:
                gc.collect()
    except Exception as exc:
        return f"no Docker daemon answers ({type(exc).__name__}: {exc}); set DOCKER_HOST"
    try:
        client.ping()
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        return f"image {IMAGE} is missing; run `managed-agents-mcp image build --offline`"
    except Exception as exc:
        return f"no Docker daemon answers ({type(exc).__name__}); set DOCKER_HOST"
    finally:
        client.close()
    return None


@pytest.fixture(scope="session")
def docker_ready() -> None:
    problem = _docker_problem()
    if problem is None:
        return
    if REQUIRE_DOCKER:
        pytest.fail(f"REQUIRE_DOCKER=1 but {problem}")
    pytest.skip(problem)


def _bwrap_problem() -> str | None:
    """Why bubblewrap tests cannot run here, or None when they can."""
    import anyio

    from sandbox.bubblewrap import BubblewrapBackend
    from sandbox.errors import SandboxUnavailable

    async def probe() -> str | None:
        try:
            await BubblewrapBackend(Path(tempfile.gettempdir()) / "ma-bwrap-probe").ping()
        except SandboxUnavailable as exc:
            return str(exc)
        return None

    return anyio.run(probe)


@pytest.fixture(scope="session")
def bwrap_ready() -> None:
    problem = _bwrap_problem()
    if problem is None:
        return
    if REQUIRE_BWRAP:
        pytest.fail(f"REQUIRE_BWRAP=1 but {problem}")
    pytest.skip(problem)


@pytest.fixture(autouse=True)
def _backend_gate(request: pytest.FixtureRequest) -> None:
    """Tests marked `docker` / `bubblewrap` skip when that backend is missing, or fail under
    REQUIRE_DOCKER=1 / REQUIRE_BWRAP=1."""
    if request.node.get_closest_marker("docker") is not None:
        request.getfixturevalue("docker_ready")
    if request.node.get_closest_marker("bubblewrap") is not None:
        request.getfixturevalue("bwrap_ready")


def home_label(home: Path) -> str:
    return hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:16]


def remove_labelled(home: Path) -> None:
    """Remove every container and volume the server made for `home` (test teardown)."""
    import docker
    import docker.errors

    client = docker.from_env()
    try:
        label = f"managed-agents-mcp.home={home_label(home)}"
        for container in client.containers.list(all=True, filters={"label": label}):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
        for volume in client.volumes.list(filters={"label": label}):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                volume.remove(force=True)
    finally:
        client.close()


@pytest.fixture
def home(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh data dir; containers made for it are removed afterwards."""
    path = tmp_path / "home"
    path.mkdir()
    yield path
    if request.node.get_closest_marker("docker") is not None:
        remove_labelled(path)


@pytest.fixture
def fake_api() -> Iterator[FakeMessagesAPI]:
    with FakeMessagesAPI() as fake:
        yield fake


@pytest.fixture
def settings(home: Path) -> Settings:
    return Settings(home=home, image=IMAGE, retry_delay=0.01, poll_interval=0.05, warm_pool=0)


def model_for(fake: FakeMessagesAPI) -> AnthropicModelClient:
    return AnthropicModelClient(api_key="test-key", base_url=fake.url)


# pytest-asyncio sets async fixtures up and tears them down in different tasks, which anyio task
# groups (the server's lifespan) do not allow; so fixtures hand out async context managers and
# each test holds them with `async with` in its own task.
OpenServices = Callable[..., contextlib.AbstractAsyncContextManager[Services]]
OpenMCP = Callable[..., contextlib.AbstractAsyncContextManager["ToolCaller"]]


@pytest.fixture
def open_services_for(settings: Settings, fake_api: FakeMessagesAPI) -> OpenServices:
    """`async with open_services_for() as services:` over real Docker and the fake API."""

    def opener(**overrides: Any) -> contextlib.AbstractAsyncContextManager[Services]:
        return open_services(
            replace(settings, **overrides) if overrides else settings,
            backend=DockerBackend(),
            model=model_for(fake_api),
        )

    return opener


class ToolCaller:
    """Calls MCP tools and returns structured results, failing loudly on tool errors."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def __call__(self, name: str, args: dict[str, Any] | None = None) -> Any:
        result = await self.client.call_tool(name, args or {})
        assert not result.is_error, f"{name} failed: {result.content}"
        return result.structured_content

    async def error(self, name: str, args: dict[str, Any] | None = None) -> str:
        """Call a tool that must fail; return its error text."""
        result = await self.client.call_tool(name, args or {})
        assert result.is_error, f"{name} unexpectedly succeeded: {result.structured_content}"
        text = result.content[0]
        assert text.type == "text"
        return text.text


@pytest.fixture
def open_mcp(settings: Settings, fake_api: FakeMessagesAPI) -> OpenMCP:
    """`async with open_mcp() as mcp:` gives an in-process MCP client on a server backed by
    real Docker and the fake model API."""

    @contextlib.asynccontextmanager
    async def opener(**overrides: Any) -> AsyncIterator[ToolCaller]:
        server = build_server(
            replace(settings, **overrides) if overrides else settings,
            backend=DockerBackend(),
            model=model_for(fake_api),
        )
        async with Client(server) as client:
            yield ToolCaller(client)

    return opener


@pytest.fixture
def new_agent() -> Callable[..., dict[str, Any]]:
    """Arguments for create_agent with the built-in toolset."""

    def make(**overrides: Any) -> dict[str, Any]:
        args: dict[str, Any] = {
            "name": "worker",
            "model": "claude-sonnet-4-6",
            "tools": [{"type": "agent_toolset_20260401"}],
        }
        args.update(overrides)
        return args

    return make
