"""`/v1/sessions` and their resources: create, list, retrieve, update, archive, delete."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.core.models import FileResourceParam, SessionCreateParams, SessionUpdateParams
from server.core.store import decode_cursor, encode_cursor

from ._wire import Query, idempotency_key, invalid, json_body, json_response, route

if TYPE_CHECKING:
    from server.app import Services

MAX_PAGE = 1000
MAX_RESOURCES_PAGE = 1000
STATUSES = ("idle", "running", "rescheduling", "terminated")


def routes(services: Services) -> list[Route]:
    sessions = services.sessions
    resources = services.resources

    async def create(request: Request) -> Response:
        params = SessionCreateParams.model_validate(await json_body(request))
        key = idempotency_key(request)
        return json_response(await sessions.create(params, idempotency_key=key))

    async def list_sessions(request: Request) -> Response:
        query = Query(request)
        agent_id = query.text("agent_id")
        # No session here comes from a deployment or mounts a memory store (neither exists on
        # this server), so those filters match nothing.
        if query.text("deployment_id") or query.text("memory_store_id"):
            return json_response({"data": [], "next_page": None, "prev_page": None})
        page = await sessions.list(
            limit=query.limit(default=20, high=MAX_PAGE),
            page=query.text("page"),
            order=query.order("desc"),
            agent_id=agent_id,
            # The API applies agent_version only together with agent_id.
            agent_version=(
                query.integer("agent_version", default=None, low=1, high=2**62)
                if agent_id
                else None
            ),
            statuses=query.values("statuses", allowed=STATUSES) or None,
            include_archived=query.flag("include_archived"),
            created_at=query.created_at(),
        )
        # Cursors here only go forward, so there is never a previous-page cursor to give.
        return json_response({**page.to_json(), "prev_page": None})

    async def retrieve(request: Request) -> Response:
        return json_response(await sessions.retrieve(request.path_params["session_id"]))

    async def update(request: Request) -> Response:
        params = SessionUpdateParams.model_validate(await json_body(request))
        return json_response(await sessions.update(request.path_params["session_id"], params))

    async def delete(request: Request) -> Response:
        return json_response(await sessions.delete(request.path_params["session_id"]))

    async def archive(request: Request) -> Response:
        return json_response(await sessions.archive(request.path_params["session_id"]))

    async def add_resource(request: Request) -> Response:
        param = FileResourceParam.model_validate(await json_body(request))
        return json_response(await resources.add(request.path_params["session_id"], param))

    async def list_resources(request: Request) -> Response:
        query = Query(request)
        limit = query.integer("limit", default=None, low=1, high=MAX_RESOURCES_PAGE)
        page = query.text("page")
        items = await resources.list(request.path_params["session_id"])
        if page:
            after = decode_cursor(page, "asc")
            if not isinstance(after, str):
                invalid("page is not a cursor of this list; pass the next_page value it gave")
            items = [r for r in items if r["id"] > after]
        next_page = None
        if limit is not None and len(items) > limit:
            items = items[:limit]
            next_page = encode_cursor("asc", items[-1]["id"])
        return json_response({"data": items, "next_page": next_page})

    async def retrieve_resource(request: Request) -> Response:
        session_id, resource_id = request.path_params["session_id"], request.path_params["id"]
        return json_response(await resources.retrieve(session_id, resource_id))

    async def update_resource(request: Request) -> Response:
        session_id, resource_id = request.path_params["session_id"], request.path_params["id"]
        body = await json_body(request, required=False)
        resource = await resources.retrieve(session_id, resource_id)
        invalid(
            f"session resource {resource_id} is a {resource['type']} resource and cannot be "
            f"updated (fields sent: {sorted(body) or 'none'}). Only github_repository "
            "resources take updates (authorization_token rotation), and this server mounts "
            "only files: delete the resource and add a new one instead"
        )

    async def delete_resource(request: Request) -> Response:
        session_id, resource_id = request.path_params["session_id"], request.path_params["id"]
        return json_response(await resources.delete(session_id, resource_id))

    return [
        route("/sessions", GET=list_sessions, POST=create),
        route("/sessions/{session_id}", GET=retrieve, POST=update, DELETE=delete),
        route("/sessions/{session_id}/archive", POST=archive),
        route("/sessions/{session_id}/resources", GET=list_resources, POST=add_resource),
        route(
            "/sessions/{session_id}/resources/{id}",
            GET=retrieve_resource,
            POST=update_resource,
            DELETE=delete_resource,
        ),
    ]
