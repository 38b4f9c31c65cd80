"""`/v1/sessions/{id}/events`: list, send, and the live SSE stream (also at `/stream`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.core.models import UserEvent

from ._wire import Query, json_body, json_response, route
from .stream import DELTA_TYPES, EventStream, StreamOptions, streams_closing

if TYPE_CHECKING:
    from server.app import Services

MAX_PAGE = 1000


class SendEvents(BaseModel):
    """The body of `POST /v1/sessions/{id}/events`."""

    model_config = ConfigDict(extra="forbid")

    events: Annotated[list[UserEvent], Field(min_length=1)]


def routes(services: Services, options: StreamOptions) -> list[Route]:
    sessions = services.sessions

    async def list_events(request: Request) -> Response:
        query = Query(request)
        page = await sessions.list_events(
            request.path_params["session_id"],
            limit=query.limit(default=MAX_PAGE, high=MAX_PAGE),
            page=query.text("page"),
            order=query.order("asc"),
            types=query.values("types") or None,
            created_at=query.created_at(),
        )
        return json_response(page.to_json())

    async def send(request: Request) -> Response:
        body = SendEvents.model_validate(await json_body(request))
        stored = await sessions.send_events(request.path_params["session_id"], body.events)
        return json_response({"data": stored})

    async def stream(request: Request) -> Response:
        deltas = Query(request).values("event_deltas", allowed=DELTA_TYPES)
        return await EventStream.open(
            services,
            request.path_params["session_id"],
            deltas=frozenset(deltas),
            options=options,
            closing=streams_closing(request.app),
        )

    return [
        route("/sessions/{session_id}/events", GET=list_events, POST=send),
        route("/sessions/{session_id}/events/stream", GET=stream),
        # The path of the April 2026 guides; same stream.
        route("/sessions/{session_id}/stream", GET=stream),
    ]
