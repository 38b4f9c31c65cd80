"""Helpers for driving sessions through the MCP tools in tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio

from tests.conftest import ToolCaller


async def setup_session(
    mcp: ToolCaller, agent_args: dict[str, Any], *, networking: str = "limited"
) -> dict[str, Any]:
    """Create an agent, an environment (no network by default) and a session."""
    agent = await mcp("create_agent", agent_args)
    config: dict[str, Any] = {"networking": {"type": networking}}
    if networking == "limited":
        config["networking"]["allowed_hosts"] = []
    env = await mcp("create_environment", {"name": f"env-{agent['id'][-6:]}", "config": config})
    return await mcp("start_session", {"agent": agent["id"], "environment_id": env["id"]})


async def say(mcp: ToolCaller, session_id: str, text: str) -> dict[str, Any]:
    result = await mcp(
        "send_event",
        {"session_id": session_id, "event": {"type": "user.message", "content": text}},
    )
    return result["data"][0]


async def wait_idle(
    mcp: ToolCaller, session_id: str, *, after: str | None = None, limit: float = 60
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Call wait_for_session until it reports done; return the last answer and all events."""
    events: list[dict[str, Any]] = []
    with anyio.fail_after(limit):
        while True:
            args: dict[str, Any] = {"session_id": session_id, "timeout_s": 10, "detail": "full"}
            if after:
                args["after"] = after
            answer = await mcp("wait_for_session", args)
            events.extend(answer["events"])
            after = answer["next_after"]
            if answer["done"]:
                return answer, events


async def wait_for_event(
    mcp: ToolCaller, session_id: str, kind: str, *, limit: float = 30
) -> dict[str, Any]:
    """Follow the session until an event of `kind` appears (bounded)."""
    after: str | None = None
    with anyio.fail_after(limit):
        while True:
            args: dict[str, Any] = {"session_id": session_id, "timeout_s": 1, "detail": "full"}
            if after:
                args["after"] = after
            answer = await mcp("wait_for_session", args)
            for event in answer["events"]:
                if event["type"] == kind:
                    return event
            after = answer["next_after"]


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


async def poll_until(condition: Callable[[], bool], *, limit: float = 60) -> None:
    """Poll state that offers nothing to wait on (e.g. Docker's container list), bounded."""
    with anyio.fail_after(limit):
        while not condition():  # noqa: ASYNC110 - Docker's state has no event to await
            await anyio.sleep(0.1)
