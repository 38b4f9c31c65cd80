"""MCP tools for environments: create, get, list."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

from server.core.models import CloudConfig, EnvironmentCreateParams

from ._common import CREATES, READ_ONLY, Json, services, tool_errors

EnvironmentId = Annotated[str, Field(description="The environment's id (`env_…`).")]


def register(mcp: MCPServer) -> None:
    @mcp.tool(title="Create environment", annotations=CREATES)
    async def create_environment(
        ctx: Context,
        name: Annotated[str, Field(description="Unique name, 1-256 characters.")],
        description: str | None = None,
        config: Annotated[
            CloudConfig | None,
            Field(
                description="Packages and networking; default `{type: cloud, networking: "
                "{type: unrestricted}}`. `{type: limited, allowed_hosts: []}` means no network."
            ),
        ] = None,
        metadata: dict[str, str] | None = None,
    ) -> Json:
        """Create an environment: the recipe for the sandbox container of every session using it.

        Create one once and reuse it. Names are unique; an existing name is refused.
        """
        with tool_errors():
            params = EnvironmentCreateParams(
                name=name,
                description=description,
                config=config or CloudConfig(),
                metadata=metadata or {},
            )
            return await services(ctx).environments.create(params)

    @mcp.tool(title="Get environment", annotations=READ_ONLY)
    async def get_environment(ctx: Context, environment_id: EnvironmentId) -> Json:
        """Get an environment."""
        with tool_errors():
            return await services(ctx).environments.retrieve(environment_id)

    @mcp.tool(title="List environments", annotations=READ_ONLY)
    async def list_environments(
        ctx: Context,
        limit: Annotated[int, Field(ge=1, le=100)] = 20,
        page: Annotated[str | None, Field(description="`next_page` of the previous call.")] = None,
        include_archived: bool = False,
    ) -> Json:
        """List environments, newest first. Returns `{data, next_page}`."""
        with tool_errors():
            result = await services(ctx).environments.list(
                limit=limit, page=page, include_archived=include_archived
            )
            return result.to_json()
