"""Wiring: builds the services over one database and the MCP server on top of them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.core.agents import AgentService
from server.core.changes import ChangeBus
from server.core.environments import EnvironmentService
from server.core.files import BlobStore, FileService
from server.core.idempotency import IdempotencyKeys
from server.core.instances import InstanceRegistry
from server.core.resources import ResourceService
from server.core.session_store import SessionStore
from server.core.sessions import SessionService
from server.core.store import Database
from server.core.tasks import TaskService
from server.settings import Settings

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

    from sandbox.base import SandboxBackend
    from server.runner.model import ModelClient
    from server.runner.supervisor import Supervisor

logger = logging.getLogger(__name__)

INSTRUCTIONS = """\
This server runs sub-agents in isolated sandboxes (like Claude Managed Agents): each has its own
Linux container with bash and file tools, and works in the background between your calls.
Quickest: run_task(prompt). It answers if the work finishes within wait_s (<= 45 s); otherwise
it returns a session_id: call wait_for_session(session_id, after=next_after) until done is true.
Follow up on the same session with send_message, then wait_for_session.
Full control: create_agent and create_environment once, start_session, send_event,
wait_for_session, then read_file, or list_files(scope_id=session_id) + download_file for the
files it put in /mnt/session/outputs/. interrupt_session stops a session.
Sub-agents cannot see this conversation: give them everything they need in the prompt or as
files. No call blocks for more than 45 s."""


@dataclass(frozen=True, slots=True)
class Services:
    """Everything a tool or route needs; one instance per server process."""

    settings: Settings
    db: Database
    agents: AgentService
    environments: EnvironmentService
    sessions: SessionService
    tasks: TaskService
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
        keys = IdempotencyKeys(db, instances)
        agents = AgentService(db, keys)
        files = FileService(
            db,
            BlobStore(settings.home / "blobs"),
            max_upload_bytes=settings.max_upload_bytes,
            keys=keys,
        )
        supervisor = Supervisor(store, instances, backend, model, settings, files)
        environments = EnvironmentService(db, on_change=supervisor.prepare_environment, keys=keys)
        resources = ResourceService(store, files, supervisor)
        sessions = SessionService(
            store, agents, environments, instances, supervisor, resources, keys
        )
        tasks = TaskService(
            agents, environments, sessions, files, default_model=settings.default_model, keys=keys
        )
        async with supervisor:
            yield Services(
                settings,
                db,
                agents,
                environments,
                sessions,
                tasks,
                resources,
                files,
                store,
                supervisor,
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
    from server.tools import register_tools

    ManagedAgentsServer = _server_class()

    @contextlib.asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[Services]:
        if services is not None:
            yield services
            return
        async with open_services(settings, backend=backend, model=model) as opened:
            yield opened

    server = ManagedAgentsServer(
        "managed-agents",
        version=_version(),
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
    )
    register_tools(server)
    return server


def _server_class() -> type[MCPServer]:
    from mcp.server.mcpserver import MCPServer
    from mcp_types import ListResourcesResult, PaginatedRequestParams, Resource

    class _ManagedAgentsServer(MCPServer):
        """MCPServer whose resource list also names the transcripts of recent sessions, and
        whose argument errors read like the tools' own (no input echoes, no URLs)."""

        async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
            from mcp.server.mcpserver.exceptions import ToolError
            from pydantic import ValidationError

            from server.tools._common import describe_validation

            try:
                return await super().call_tool(name, arguments, context)
            except ToolError as exc:
                if not isinstance(exc.__cause__, ValidationError):
                    raise
                problems = describe_validation(exc.__cause__)
                raise ToolError(
                    f"Error executing tool {name}: invalid_request_error: {problems}. "
                    "Check the tool's input schema and call it again."
                ) from exc.__cause__

        # MCPServer wires this (private) handler at construction; the list must come from the
        # store, which only the request's lifespan context reaches.
        async def _handle_list_resources(  # type: ignore[override]
            self, ctx: Any, params: PaginatedRequestParams | None
        ) -> ListResourcesResult:
            from server.tools.resources import LISTED_SESSIONS, transcript_uri

            static = await self.list_resources()
            services: Services = ctx.lifespan_context
            page = await services.sessions.list(limit=LISTED_SESSIONS)
            sessions = [
                Resource(
                    uri=transcript_uri(s["id"]),
                    name=f"transcript-{s['id']}",
                    title=f"Transcript: {s.get('title') or s['id']} ({s['status']})",
                    mime_type="text/markdown",
                )
                for s in page.data
            ]
            return ListResourcesResult(resources=[*static, *sessions])

    return _ManagedAgentsServer


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("managed-agents-mcp")
    except PackageNotFoundError:
        return "0.0.0"
