"""MCP tools for environments: create, get, list."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

from server.core.models import CloudConfig, EnvironmentCreateParams, EnvironmentUpdateParams

from ._common import (
    CREATES,
    DESTROYS,
    READ_ONLY,
    UPDATES,
    IdempotencyKey,
    Json,
    services,
    tool_errors,
)

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
        idempotency_key: IdempotencyKey = None,
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
            return await services(ctx).environments.create(params, idempotency_key=idempotency_key)

    @mcp.tool(title="Get environment", annotations=READ_ONLY)
    async def get_environment(ctx: Context, environment_id: EnvironmentId) -> Json:
        """Get an environment: its config (packages, networking, limits) and whether it is
        archived."""
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

    @mcp.tool(title="Update environment", annotations=UPDATES)
    async def update_environment(
        ctx: Context,
        environment_id: EnvironmentId,
        name: str | None = None,
        description: Annotated[str | None, Field(description='"" clears it.')] = None,
        config: Annotated[
            CloudConfig | None, Field(description="Replaces the whole config.")
        ] = None,
        metadata: Annotated[
            dict[str, str | None] | None,
            Field(description="Per-key patch: a string sets a key, null deletes it."),
        ] = None,
    ) -> Json:
        """Change an environment. Containers created from now on use the new recipe; running
        sessions keep theirs."""
        changes: dict[str, object] = {}
        if name is not None:
            changes["name"] = name
        if description is not None:
            changes["description"] = description or None
        if config is not None:
            changes["config"] = config
        if metadata is not None:
            changes["metadata"] = metadata
        with tool_errors():
            params = EnvironmentUpdateParams.model_validate(changes)
            return await services(ctx).environments.update(environment_id, params)

    @mcp.tool(title="Archive environment", annotations=DESTROYS)
    async def archive_environment(ctx: Context, environment_id: EnvironmentId) -> Json:
        """Archive an environment: read-only, and new sessions cannot use it (running ones go
        on). Cannot be undone."""
        with tool_errors():
            return await services(ctx).environments.archive(environment_id)

    @mcp.tool(title="Delete environment", annotations=DESTROYS)
    async def delete_environment(ctx: Context, environment_id: EnvironmentId) -> Json:
        """Delete an environment that no session uses (delete those sessions first, or archive
        the environment instead)."""
        with tool_errors():
            return await services(ctx).environments.delete(environment_id)
