"""The Managed Agents REST API (`/v1/…`), served beside `/mcp` by the HTTP transport.

A thin face over the same services as the MCP tools: paths, verbs, query parameters, bodies,
responses and error envelopes are the hosted API's, so the official `anthropic` SDK
(`client.beta.agents`, `.environments`, `.sessions`, `.sessions.events`,
`.sessions.resources`, `client.beta.files`) works against this server unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import Mount, Route, Router

from . import agents, environments, events, files, sessions
from ._wire import RestApp
from .stream import HEARTBEAT_INTERVAL, StreamOptions, end_streams

if TYPE_CHECKING:
    from server.app import Services

__all__ = ["end_streams", "routes"]


def routes(
    services: Services, *, heartbeat_interval: float = HEARTBEAT_INTERVAL
) -> list[Route | Mount]:
    """The REST routes over `services` (one store, one agent loop with the MCP tools).

    `heartbeat_interval` is how long an event stream may stay silent before a `: ping`.
    When the server starts shutting down, call `end_streams(app)`.
    """
    options = StreamOptions(heartbeat_interval=heartbeat_interval)
    api = Router(
        routes=[
            *agents.routes(services),
            *environments.routes(services),
            *sessions.routes(services),
            *events.routes(services, options),
            *files.routes(services),
        ]
    )
    return [Mount("/v1", app=RestApp(api))]
