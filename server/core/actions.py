"""Tool calls waiting on the client: `always_ask` tool uses and custom tool uses without results."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Json = dict[str, Any]

ANSWERS = ("user.tool_confirmation", "user.custom_tool_result")
ACTION_EVENTS = ("agent.tool_use", "agent.custom_tool_use", "agent.tool_result", *ANSWERS)
"""The only event types `outstanding_actions` looks at: reading just these keeps a long log
from being decoded whole."""


def outstanding_actions(events: Iterable[Json], *, count_queued: bool = True) -> list[Json]:
    """The `agent.tool_use` (permission `ask`) and `agent.custom_tool_use` events still open.

    A tool use is settled by its `agent.tool_result`, a custom tool use by its
    `user.custom_tool_result`. With `count_queued`, a confirmation or result the client sent
    but the loop has not processed yet also settles it (what send-time validation needs);
    without, only processed answers do (what the loop needs).
    """
    waiting: dict[str, Json] = {}
    for event in events:
        kind = event["type"]
        queued = event.get("processed_at") is None
        answered = count_queued or not queued
        asks = kind == "agent.tool_use" and event.get("evaluated_permission") == "ask"
        if asks or kind == "agent.custom_tool_use":
            waiting[event["id"]] = event
        elif kind == "agent.tool_result" or (kind == "user.tool_confirmation" and answered):
            waiting.pop(event.get("tool_use_id", ""), None)
        elif kind == "user.custom_tool_result" and answered:
            waiting.pop(event.get("custom_tool_use_id", ""), None)
    return list(waiting.values())
