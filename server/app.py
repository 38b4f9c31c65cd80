"""Wiring: builds the services over one database and the MCP server on top of them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.core.agents import AgentService
from server.core.changes import ChangeBus
from server.core.environments import EnvironmentService
from server.core.files import BlobStore, FileService
from server.core.instances import InstanceRegistry
from server.core.resources import ResourceService
from server.core.session_store import SessionStore
from server.core.sessions import SessionService
from server.core.store import Database
from server.settings import Settings

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

    from sandbox.base import SandboxBackend
    from server.runner.model import ModelClient
    from server.runner.supervisor import Supervisor

logger = logging.getLogger(__name__)

INSTRUCTIONS = """\
This server runs sub-agents ("sessions") in isolated Docker sandboxes, like Claude Managed Agents.
Delegation pattern: create_agent (once) and create_environment (once) -> start_session ->
send_event with a user.message -> wait_for_session (returns within its timeout; call it again
with `after` = the returned next_after until `done` is true) -> read_file for results.
Every call returns quickly; long work continues in the background between calls. Send a
user.interrupt event to stop a running session."""


@dataclass(frozen=True, slots=True)
class Services:
    """Everything a tool or route needs; one instance per server process."""

    settings: Settings
    db: Database
    agents: AgentService
    environments: EnvironmentService
    sessions: SessionService
    resources: ResourceService
    files: FileService
    store: SessionStore
    supervisor: Supervisor


@contextlib.asynccontextmanager
async def open_services(
    settings: Settings,
    *,
    backend: SandboxBackend | None = None,
    model: ModelClient | None = None,
) -> AsyncIterator[Services]:
    """Open the database, start the supervisor; on exit stop turns and close everything."""
    from server.runner.supervisor import Supervisor

    if backend is None:
        from sandbox.auto import make_backend

        backend = make_backend(settings.sandbox, docker_host=settings.docker_host)  # type: ignore[arg-type]
    if model is None:
        from server.runner.model import AnthropicModelClient

        model = AnthropicModelClient(
            api_key=settings.anthropic_api_key, base_url=settings.anthropic_base_url
        )
    settings.home.mkdir(parents=True, exist_ok=True)
    db = await Database.open(settings.database_path)
    instances = InstanceRegistry(settings.home / "instances")
    try:
        bus = ChangeBus()
        store = SessionStore(db, bus)
        agents = AgentService(db)
        files = FileService(
            db, BlobStore(settings.home / "blobs"), max_upload_bytes=settings.max_upload_bytes
        )
        supervisor = Supervisor(store, instances, backend, model, settings, files)
        environments = EnvironmentService(db, on_change=supervisor.prepare_environment)
        resources = ResourceService(store, files, supervisor)
        sessions = SessionService(store, agents, environments, instances, supervisor, resources)
        async with supervisor:
            yield Services(
                settings, db, agents, environments, sessions, resources, files, store, supervisor
            )
    finally:
        instances.close()
        await model.aclose()
        await backend.aclose()
        await db.aclose()


def build_server(
    settings: Settings,
    *,
    backend: SandboxBackend | None = None,
    model: ModelClient | None = None,
    services: Services | None = None,
) -> MCPServer:
    """The MCP server with every tool registered.

    Its lifespan opens the services, unless `services` are given already open (the HTTP
    transport shares them with the REST API).
    """
    from mcp.server.mcpserver import MCPServer

    from server.tools import register_tools

    @contextlib.asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[Services]:
        if services is not None:
            yield services
            return
        async with open_services(settings, backend=backend, model=model) as opened:
            yield opened

    server = MCPServer(
        "managed-agents",
        version=_version(),
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
    )
    register_tools(server)
    return server


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("managed-agents-mcp")
    except PackageNotFoundError:
        return "0.0.0"
