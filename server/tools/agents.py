"""MCP tools for agents: create, get, list, update."""

from __future__ import annotations

from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

from server.core.models import (
    AgentCreateParams,
    AgentUpdateParams,
    McpServerParam,
    ModelConfig,
    SkillParam,
    ToolParam,
)

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

AgentId = Annotated[str, Field(description="The agent's id (`agent_…`).")]
Model = Annotated[
    str | ModelConfig,
    Field(description="Model id, e.g. `claude-sonnet-4-6`, or `{id, speed}`."),
]
Tools = Annotated[
    list[ToolParam],
    Field(
        description='Toolsets and custom tools. `[{"type": "agent_toolset_20260401"}]` gives '
        "the built-in bash/read/write/edit/glob/grep tools, which run in the sandbox."
    ),
]
Limit = Annotated[int, Field(ge=1, le=100, description="Page size (1-100).")]
Page = Annotated[str | None, Field(description="`next_page` from the previous call.")]


def register(mcp: MCPServer) -> None:
    @mcp.tool(title="Create agent", annotations=CREATES)
    async def create_agent(
        ctx: Context,
        name: Annotated[str, Field(description="Name, 1-256 characters.")],
        model: Model,
        system: Annotated[str | None, Field(description="System prompt.")] = None,
        description: Annotated[str | None, Field(description="What the agent is for.")] = None,
        tools: Tools | None = None,
        mcp_servers: list[McpServerParam] | None = None,
        skills: list[SkillParam] | None = None,
        metadata: Annotated[
            dict[str, str] | None, Field(description="Up to 16 string key/value pairs.")
        ] = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        """Create an agent: a reusable, versioned configuration (model, system prompt, tools).

        Create one once and reuse it for many sessions. Include
        `{"type": "agent_toolset_20260401"}` in `tools` so the sub-agent can run commands and
        edit files in its sandbox. Returns the agent object (version 1); next call
        `start_session` with its id.
        """
        with tool_errors():
            params = AgentCreateParams(
                name=name,
                model=model,
                system=system,
                description=description,
                tools=tools or [],
                mcp_servers=mcp_servers or [],
                skills=skills or [],
                metadata=metadata or {},
            )
            return await services(ctx).agents.create(params, idempotency_key=idempotency_key)

    @mcp.tool(title="Get agent", annotations=READ_ONLY)
    async def get_agent(
        ctx: Context,
        agent_id: AgentId,
        version: Annotated[
            int | None, Field(ge=1, description="A specific version; latest when omitted.")
        ] = None,
    ) -> Json:
        """Get an agent's configuration (latest version, or the given one)."""
        with tool_errors():
            return await services(ctx).agents.retrieve(agent_id, version)

    @mcp.tool(title="List agents", annotations=READ_ONLY)
    async def list_agents(
        ctx: Context,
        limit: Limit = 20,
        page: Page = None,
        include_archived: bool = False,
    ) -> Json:
        """List agents, newest first. Returns `{data, next_page}`; pass `next_page` as `page`."""
        with tool_errors():
            result = await services(ctx).agents.list(
                limit=limit, page=page, include_archived=include_archived
            )
            return result.to_json()

    @mcp.tool(title="Update agent", annotations=UPDATES)
    async def update_agent(
        ctx: Context,
        agent_id: AgentId,
        version: Annotated[
            int | None,
            Field(description="The version you read; if the agent moved on, this is refused."),
        ] = None,
        name: str | None = None,
        model: Model | None = None,
        system: Annotated[str | None, Field(description='New system prompt; "" clears it.')] = None,
        description: Annotated[str | None, Field(description='"" clears it.')] = None,
        tools: Annotated[
            list[ToolParam] | None, Field(description="Replaces the whole tools list.")
        ] = None,
        mcp_servers: list[McpServerParam] | None = None,
        skills: list[SkillParam] | None = None,
        metadata: Annotated[
            dict[str, str | None] | None,
            Field(description="Per-key patch: a string sets a key, null deletes it."),
        ] = None,
    ) -> Json:
        """Change an agent. Only the fields you pass change; a real change makes a new version.

        Sessions already started keep the version they pinned. Returns the agent (same version
        if nothing changed).
        """
        changes: dict[str, Any] = {
            key: value
            for key, value in {
                "version": version,
                "name": name,
                "model": model,
                "tools": tools,
                "mcp_servers": mcp_servers,
                "skills": skills,
                "metadata": metadata,
            }.items()
            if value is not None
        }
        if system is not None:
            changes["system"] = system or None
        if description is not None:
            changes["description"] = description or None
        with tool_errors():
            params = AgentUpdateParams(**changes)
            return await services(ctx).agents.update(agent_id, params)

    @mcp.tool(title="Archive agent", annotations=DESTROYS)
    async def archive_agent(ctx: Context, agent_id: AgentId) -> Json:
        """Archive an agent: it becomes read-only and new sessions cannot use it.

        Sessions already running keep going. This cannot be undone.
        """
        with tool_errors():
            return await services(ctx).agents.archive(agent_id)

    @mcp.tool(title="List agent versions", annotations=READ_ONLY)
    async def list_agent_versions(
        ctx: Context, agent_id: AgentId, limit: Limit = 20, page: Page = None
    ) -> Json:
        """List an agent's versions, newest first. Returns `{data, next_page}`."""
        with tool_errors():
            result = await services(ctx).agents.list_versions(agent_id, limit=limit, page=page)
            return result.to_json()
