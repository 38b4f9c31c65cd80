"""The HTTP transport: one app serving `/mcp` (streamable HTTP), `/v1/…` (REST) and `/healthz`.

Every route but `/healthz` needs the server token, as `Authorization: Bearer <token>` or
`x-api-key: <token>` (what the anthropic SDK sends). Host and Origin are checked on every
request against DNS rebinding: by default only loopback names, and absent Origins, pass.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import os
import secrets
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from server.core.ids import new_id

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
TOKEN_FILE = "token"
PUBLIC_PATHS = frozenset({"/healthz"})


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_token(home: Path, configured: str | None) -> str:
    """`configured` (MANAGED_AGENTS_TOKEN), else `<home>/token`, created 0600 on first use."""
    if configured:
        return configured
    path = home / TOKEN_FILE
    with contextlib.suppress(FileNotFoundError):
        token = path.read_text().strip()
        if token:
            return token
    home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race: use its token
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def _error(status: int, error_type: str, message: str) -> JSONResponse:
    """The API's error envelope (as the REST routes answer)."""
    body = {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": new_id("req"),
    }
    return JSONResponse(body, status_code=status)


class SecurityMiddleware:
    """Host/Origin checks for every request, and the token for every non-public path."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        allowed_hosts: Iterable[str],
        allowed_origins: Iterable[str],
    ) -> None:
        self._app = app
        self._token = token.encode() if token else None
        self._hosts = {h.lower() for h in allowed_hosts}
        self._origins = {o.lower().rstrip("/") for o in allowed_origins}

    def _host_ok(self, host: str) -> bool:
        host = host.lower()
        return host in self._hosts or _hostname(host) in self._hosts

    def _origin_ok(self, origin: str) -> bool:
        """Configured origins, and any loopback origin (as the MCP SDK allows by default)."""
        origin = origin.lower().rstrip("/")
        if origin in self._origins:
            return True
        scheme, sep, rest = origin.partition("://")
        return bool(sep) and scheme in ("http", "https") and is_loopback(_hostname(rest))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not self._host_ok(headers.get("host", "")):
            await _error(421, "invalid_request_error", "Invalid Host header")(scope, receive, send)
            return
        origin = headers.get("origin")
        if origin is not None and not self._origin_ok(origin):
            response = _error(403, "permission_error", "Invalid Origin header")
            await response(scope, receive, send)
            return
        if self._token is not None and scope["path"] not in PUBLIC_PATHS:
            presented = headers.get("x-api-key", "")
            authorization = headers.get("authorization", "")
            if authorization.lower().startswith("bearer "):
                presented = authorization[7:].strip()
            if not hmac.compare_digest(presented.encode(), self._token):
                response = _error(
                    401,
                    "authentication_error",
                    "missing or invalid token: send `Authorization: Bearer <token>` or "
                    "`x-api-key: <token>` (see `managed-agents-mcp token`)",
                )
                response.headers["WWW-Authenticate"] = 'Bearer realm="managed-agents-mcp"'
                await response(scope, receive, send)
                return
        await self._app(scope, receive, send)


def _hostname(authority: str) -> str:
    """`host` of `host[:port]` (IPv6 literals keep their brackets)."""
    if authority.endswith("]") or authority.count(":") == 0:
        return authority
    return authority.rsplit(":", 1)[0]


async def healthz(_: Request) -> Response:
    return JSONResponse({"status": "ok"})


def build_http_app(
    mcp: MCPServer,
    *,
    token: str | None,
    allowed_hosts: Sequence[str] = (),
    allowed_origins: Sequence[str] = (),
    routes: Sequence[Route | Mount] = (),
) -> Starlette:
    """The ASGI app; its lifespan runs the MCP session manager."""
    from mcp.server.transport_security import TransportSecuritySettings

    mcp_app = mcp.streamable_http_app(
        streamable_http_path="/mcp",
        # Host/Origin are checked for every route by SecurityMiddleware instead.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with mcp.session_manager.run():
            yield

    app = Starlette(
        routes=[Route("/healthz", healthz), *routes, Mount("/", app=mcp_app)],
        lifespan=lifespan,
    )
    app.add_middleware(
        SecurityMiddleware,  # type: ignore[arg-type]
        token=token,
        allowed_hosts=[*LOOPBACK_HOSTS, *allowed_hosts],
        allowed_origins=allowed_origins,
    )
    return app
