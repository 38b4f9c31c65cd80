"""The Managed Agents REST API (`/v1/…`), served beside `/mcp` by the HTTP transport."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import Mount, Route

if TYPE_CHECKING:
    from server.app import Services


def routes(services: Services) -> list[Route | Mount]:
    """The REST routes over `services` (one store, one agent loop with the MCP tools)."""
    del services
    return []
