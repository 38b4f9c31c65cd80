"""`/v1/agents`: create, list, retrieve (a version), update, archive, list versions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.core.models import AgentCreateParams, AgentUpdateParams

from ._wire import Query, idempotency_key, json_body, json_response, route

if TYPE_CHECKING:
    from server.app import Services

MAX_PAGE = 100
"""The documented maximum page of `GET /v1/agents`."""
MAX_VERSIONS_PAGE = 1000


def routes(services: Services) -> list[Route]:
    agents = services.agents

    async def create(request: Request) -> Response:
        params = AgentCreateParams.model_validate(await json_body(request))
        key = idempotency_key(request)
        return json_response(await agents.create(params, idempotency_key=key))

    async def list_agents(request: Request) -> Response:
        query = Query(request)
        page = await agents.list(
            limit=query.limit(default=20, high=MAX_PAGE),
            page=query.text("page"),
            include_archived=query.flag("include_archived"),
            created_at=query.created_at(),
        )
        return json_response(page.to_json())

    async def retrieve(request: Request) -> Response:
        version = Query(request).integer("version", default=None, low=1, high=2**62)
        return json_response(await agents.retrieve(request.path_params["agent_id"], version))

    async def update(request: Request) -> Response:
        params = AgentUpdateParams.model_validate(await json_body(request))
        return json_response(await agents.update(request.path_params["agent_id"], params))

    async def archive(request: Request) -> Response:
        return json_response(await agents.archive(request.path_params["agent_id"]))

    async def versions(request: Request) -> Response:
        query = Query(request)
        page = await agents.list_versions(
            request.path_params["agent_id"],
            limit=query.limit(default=20, high=MAX_VERSIONS_PAGE),
            page=query.text("page"),
        )
        return json_response(page.to_json())

    return [
        route("/agents", GET=list_agents, POST=create),
        route("/agents/{agent_id}", GET=retrieve, POST=update),
        route("/agents/{agent_id}/archive", POST=archive),
        route("/agents/{agent_id}/versions", GET=versions),
    ]
