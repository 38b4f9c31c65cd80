"""The MCP tools: thin argument parsing over one service call each."""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer

from . import agents, environments, files, resources, sessions, tasks


def register_tools(mcp: MCPServer) -> None:
    """Register every tool on `mcp`."""
    for module in (tasks, sessions, agents, environments, files, resources):
        module.register(mcp)
