"""Shared pieces of the MCP tools: the services lookup, and where errors become tool errors."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import Field, ValidationError

from sandbox.errors import SandboxError
from server.core.errors import ManagedAgentsError
from server.present import RESULT_CHARS, progress_message

if TYPE_CHECKING:
    from server.app import Services

logger = logging.getLogger(__name__)

Json = dict[str, Any]

IdempotencyKey = Annotated[
    str | None,
    Field(
        description=(
            "Optional unique string (e.g. a UUID). Calling again with the same key returns what "
            "the first call created instead of creating another: use it when retrying after a "
            "timeout. Keys last 24 hours."
        ),
        max_length=255,
    ),
]

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


class ProgressReporter:
    """Turns arriving events into MCP progress notifications (no-op without a progress token)."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    async def __call__(self, events: list[Json]) -> None:
        requests = sum(1 for e in events if e["type"] == "span.model_request_start")
        await self._ctx.report_progress(
            float(len(events)), None, progress_message(events, requests=requests)
        )


def last_stop_reason(events: list[Json]) -> Json | None:
    for event in reversed(events):
        if event["type"] == "session.status_idle":
            return event.get("stop_reason")
        if event["type"] == "session.status_running":
            return None
    return None


async def fit_page(
    data: list[Json],
    next_page: str | None,
    cursor_after: Callable[[Json], Awaitable[str]],
    *,
    budget: int = RESULT_CHARS,
) -> tuple[list[Json], str | None]:
    """A page cut short to fit in one result, with a cursor that continues after what is kept."""
    used = 0
    for index, item in enumerate(data):
        used += len(json.dumps(item)) + 2
        if used > budget and index > 0:
            return data[:index], await cursor_after(data[index - 1])
    return data, next_page
