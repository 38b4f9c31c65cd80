"""Shared pieces of the MCP tools: the services lookup, and where errors become tool errors."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import ValidationError

from sandbox.errors import SandboxError
from server.core.errors import ManagedAgentsError

if TYPE_CHECKING:
    from server.app import Services

logger = logging.getLogger(__name__)

Json = dict[str, Any]

READ_ONLY = ToolAnnotations(
    read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)
CREATES = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False
)
UPDATES = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)
DESTROYS = ToolAnnotations(
    read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
)
RUNS_AGENT = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=True
)


def services(ctx: Context) -> Services:
    """The process's services, opened by the server lifespan."""
    return ctx.request_context.lifespan_context  # type: ignore[no-any-return]


def describe_validation(exc: ValidationError) -> str:
    """A pydantic error as one readable line per problem, without input echoes or URLs."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in error["loc"]) or "input"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


@contextlib.contextmanager
def tool_errors() -> Iterator[None]:
    """Turn domain, validation and sandbox errors into tool errors a model can act on."""
    try:
        yield
    except ManagedAgentsError as exc:
        raise ToolError(f"{exc.code}: {exc}") from exc
    except ValidationError as exc:
        raise ToolError(f"invalid_request_error: {describe_validation(exc)}") from exc
    except SandboxError as exc:
        logger.warning("sandbox error: %s", exc)
        raise ToolError(f"api_error: {exc}") from exc
