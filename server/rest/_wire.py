"""Wire plumbing shared by the REST routes: error envelopes, bodies, query parameters."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC
from typing import Any, NoReturn

from pydantic import ValidationError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandbox.errors import SandboxError, SandboxUnavailable
from server.core.clock import format_time, parse_time
from server.core.errors import InvalidRequestError, ManagedAgentsError, RequestTooLargeError
from server.core.ids import new_id
from server.core.store import Json, Order, TimeFilter
from server.tools._common import describe_validation

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]

MAX_JSON_BODY = 32 << 20
"""Largest JSON body accepted (the Messages API's request limit; images ride in events)."""
IMPLEMENTED = "agents, environments, sessions (with events and resources) and files"


def request_id(request: Request) -> str:
    """The id of this request (also sent as the `request-id` header)."""
    return str(request.scope.get("managed_agents.request_id") or new_id("req"))


def error_response(
    request_id: str,
    status: int,
    error_type: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The API's error envelope."""
    body = {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": request_id,
    }
    response = JSONResponse(body, status_code=status, headers=headers)
    # The SDK retries 409 and 5xx unless told otherwise; only an unavailable backend (503)
    # is worth retrying here: conflicts and bugs answer the same way the next time.
    if status != 503:
        response.headers["x-should-retry"] = "false"
    return response


def invalid(message: str) -> NoReturn:
    raise InvalidRequestError(message)


def api_endpoint(handler: Handler) -> Handler:
    """Run `handler`, turning domain, validation and sandbox errors into error envelopes."""

    async def endpoint(request: Request) -> Response:
        rid = request_id(request)
        try:
            return await handler(request)
        except ManagedAgentsError as exc:
            return error_response(rid, exc.status, exc.code, str(exc))
        except ValidationError as exc:
            return error_response(rid, 400, "invalid_request_error", _describe(exc))
        except SandboxError as exc:
            logger.warning("sandbox error on %s %s: %s", request.method, request.url.path, exc)
            status = 503 if isinstance(exc, SandboxUnavailable) or exc.retryable else 500
            return error_response(rid, status, "api_error", f"sandbox error: {exc}")
        except Exception:
            logger.exception("unexpected error on %s %s", request.method, request.url.path)
            return error_response(
                rid,
                500,
                "api_error",
                f"internal server error (request {rid}); the server log has the details",
            )

    return endpoint


def _describe(exc: ValidationError) -> str:
    # Fields of the hosted API this server lacks (budget, vault_ids, …) land here too.
    return describe_validation(exc).replace(
        "Extra inputs are not permitted", "unknown field, or not supported by this server"
    )


def route(path: str, **handlers: Handler) -> Route:
    """One path with a handler per HTTP method (`GET=…, POST=…`), so a wrong method is a 405
    that names every allowed method."""
    wrapped = {method: api_endpoint(handler) for method, handler in handlers.items()}

    async def dispatch(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await wrapped[method](request)

    return Route(path, dispatch, methods=list(handlers))


class RestApp:
    """The `/v1` ASGI app: request ids, and envelopes for unknown paths and wrong methods."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        rid = new_id("req")
        scope = {**scope, "managed_agents.request_id": rid}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("request-id", rid)
            await send(message)

        try:
            await self._app(scope, receive, send_with_id)
        except HTTPException as exc:
            # Raised by the router before any response started: no route, or wrong method.
            method, path = scope["method"], Request(scope).url.path
            if exc.status_code == 404:
                response = error_response(
                    rid,
                    404,
                    "not_found_error",
                    f"no such endpoint: {method} {path}. This server implements {IMPLEMENTED} "
                    "of the Managed Agents API, under /v1",
                )
            elif exc.status_code == 405:
                allowed = (exc.headers or {}).get("Allow", "")
                response = error_response(
                    rid,
                    405,
                    "invalid_request_error",
                    f"method {method} is not allowed on {path}; use {allowed}",
                    headers={"Allow": allowed},
                )
            else:
                response = error_response(
                    rid, exc.status_code, "invalid_request_error", str(exc.detail)
                )
            await response(scope, receive, send_with_id)


# ---------------------------------------------------------------------------------- bodies


async def json_body(request: Request, *, required: bool = True) -> Json:
    """The request's JSON object (`{}` for an empty body unless `required`).

    Raises:
        InvalidRequestError: the body is not a JSON object.
        RequestTooLargeError: it is larger than MAX_JSON_BODY.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_JSON_BODY:
        msg = f"the request body is {declared} bytes; the limit is {MAX_JSON_BODY} bytes"
        raise RequestTooLargeError(msg)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_JSON_BODY:
            msg = f"the request body is over the {MAX_JSON_BODY}-byte limit"
            raise RequestTooLargeError(msg)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        if required:
            invalid("the request needs a JSON object body (content-type: application/json)")
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        invalid(f"the request body is not valid JSON ({exc}); send a JSON object")
    if not isinstance(body, dict):
        invalid(f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def idempotency_key(request: Request) -> str | None:
    """The `Idempotency-Key` header of a create, if any (see server/core/idempotency.py)."""
    return request.headers.get("idempotency-key")


def json_response(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)


# ----------------------------------------------------------------------------- query strings


class Query:
    """Typed access to query parameters, with the API's conventions: arrays as `key[]=…`
    (the SDK's form), `key=…` or comma-separated; time bounds as `created_at[gte]=…`."""

    def __init__(self, request: Request) -> None:
        self._params = request.query_params

    def text(self, name: str) -> str | None:
        value = self._params.get(name)
        return value if value else None

    def integer(self, name: str, *, default: int | None, low: int, high: int) -> int | None:
        raw = self._params.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            invalid(f"{name} must be an integer from {low} to {high}, got {raw[:40]!r}")
        if not low <= value <= high:
            invalid(f"{name} must be from {low} to {high}, got {value}")
        return value

    def limit(self, *, default: int, high: int) -> int:
        value = self.integer("limit", default=default, low=1, high=high)
        return default if value is None else value

    def flag(self, name: str) -> bool:
        raw = self._params.get(name)
        if raw is None or raw == "":
            return False
        lowered = raw.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        invalid(f"{name} must be true or false, got {raw[:40]!r}")

    def order(self, default: Order) -> Order:
        raw = self._params.get("order") or default
        if raw == "asc":
            return "asc"
        if raw == "desc":
            return "desc"
        invalid(f"order must be asc or desc, got {raw[:40]!r}")

    def values(self, name: str, *, allowed: Iterable[str] | None = None) -> list[str]:
        """Every value of an array parameter, in order, without duplicates."""
        found: list[str] = []
        for key in (f"{name}[]", name):
            for raw in self._params.getlist(key):
                for value in raw.split(","):
                    value = value.strip()
                    if value and value not in found:
                        found.append(value)
        if allowed is not None:
            choices = list(allowed)
            unknown = [v for v in found if v not in choices]
            if unknown:
                invalid(f"{name} has unknown value(s) {unknown}; allowed: {', '.join(choices)}")
        return found

    def created_at(self) -> TimeFilter | None:
        """`created_at[gt|gte|lt|lte]` bounds (also accepted as `created_at_gte` …)."""
        bounds: dict[str, str] = {}
        for op in ("gt", "gte", "lt", "lte"):
            raw = self._params.get(f"created_at[{op}]") or self._params.get(f"created_at_{op}")
            if raw:
                bounds[op] = _timestamp(f"created_at[{op}]", raw)
        return TimeFilter(**bounds) if bounds else None


def _timestamp(name: str, raw: str) -> str:
    try:
        moment = parse_time(raw.replace(" ", "+"))
    except ValueError:
        invalid(f"{name} must be an RFC 3339 timestamp such as 2026-04-01T12:00:00Z, got {raw!r}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return format_time(moment)
