"""`/v1/environments`: create, list, retrieve, update, archive, delete."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.core.models import EnvironmentCreateParams, EnvironmentUpdateParams
from server.core.store import Json

from ._wire import Query, idempotency_key, invalid, json_body, json_response, route

if TYPE_CHECKING:
    from server.app import Services

MAX_PAGE = 1000
SCOPE = "account"
"""The only visibility this single-user server has (what environments report as `scope`)."""


def _wire_fields(body: Json) -> Json:
    """The body without the hosted API's fields that mean nothing here (or a clear refusal)."""
    body = dict(body)
    scope = body.pop("scope", None)
    if scope not in (None, SCOPE):
        invalid(
            f"scope {scope!r} is not supported: this server has one account, so environments "
            f"are {SCOPE!r}-scoped; omit scope"
        )
    if "config" in body and body["config"] is None:
        del body["config"]  # null means "the default" on create and "unchanged" on update
    return body


def routes(services: Services) -> list[Route]:
    environments = services.environments

    async def create(request: Request) -> Response:
        body = _wire_fields(await json_body(request))
        params = EnvironmentCreateParams.model_validate(body)
        key = idempotency_key(request)
        return json_response(await environments.create(params, idempotency_key=key))

    async def list_environments(request: Request) -> Response:
        query = Query(request)
        page = await environments.list(
            limit=query.limit(default=20, high=MAX_PAGE),
            page=query.text("page"),
            include_archived=query.flag("include_archived"),
        )
        return json_response(page.to_json())

    async def retrieve(request: Request) -> Response:
        return json_response(await environments.retrieve(request.path_params["environment_id"]))

    async def update(request: Request) -> Response:
        body = _wire_fields(await json_body(request))
        params = EnvironmentUpdateParams.model_validate(body)
        environment_id = request.path_params["environment_id"]
        return json_response(await environments.update(environment_id, params))

    async def delete(request: Request) -> Response:
        return json_response(await environments.delete(request.path_params["environment_id"]))

    async def archive(request: Request) -> Response:
        return json_response(await environments.archive(request.path_params["environment_id"]))

    return [
        route("/environments", GET=list_environments, POST=create),
        route("/environments/{environment_id}", GET=retrieve, POST=update, DELETE=delete),
        route("/environments/{environment_id}/archive", POST=archive),
    ]
