"""Rebuilding the Messages API conversation from the event log."""

from __future__ import annotations

from typing import Any

from server.runner.history import MISSING_RESULT, build_messages


def ev(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "processed_at": "2026-01-01T00:00:00.000Z", **fields}


def test_a_tool_round_trip_becomes_alternating_turns() -> None:
    events = [
        ev("user.message", content=[{"type": "text", "text": "hi"}]),
        ev("session.status_running"),
        ev("span.model_request_start"),
        ev("agent.message", content=[{"type": "text", "text": "let me look"}]),
        ev("span.model_request_end"),
        ev("agent.tool_use", id="sevt_1", name="bash", input={"command": "ls"}),
        ev("agent.tool_result", tool_use_id="sevt_1", content=[{"type": "text", "text": "a"}]),
        ev("agent.message", content=[{"type": "text", "text": "done"}]),
    ]
    assert build_messages(events) == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "let me look"},
                {"type": "tool_use", "id": "sevt_1", "name": "bash", "input": {"command": "ls"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "sevt_1",
                    "content": [{"type": "text", "text": "a"}],
                }
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "done"}]},
    ]


def test_queued_messages_are_left_out_until_processed() -> None:
    events = [
        ev("user.message", content=[{"type": "text", "text": "one"}]),
        {"type": "user.message", "processed_at": None, "content": [{"type": "text", "text": "2"}]},
    ]
    assert build_messages(events) == [
        {"role": "user", "content": [{"type": "text", "text": "one"}]}
    ]


def test_a_tool_use_without_result_gets_an_error_result_before_the_next_message() -> None:
    events = [
        ev("user.message", content=[{"type": "text", "text": "go"}]),
        ev("agent.tool_use", id="sevt_9", name="bash", input={}),
        ev("user.message", content=[{"type": "text", "text": "next"}]),
    ]
    messages = build_messages(events)
    assert messages[2]["role"] == "user"
    result, text = messages[2]["content"]
    assert result["tool_use_id"] == "sevt_9"
    assert result["is_error"] is True
    assert result["content"][0]["text"] == MISSING_RESULT
    assert text == {"type": "text", "text": "next"}


def test_steering_text_joins_the_tool_results_after_them() -> None:
    events = [
        ev("user.message", content=[{"type": "text", "text": "go"}]),
        ev("agent.tool_use", id="sevt_1", name="bash", input={}),
        ev("agent.tool_use", id="sevt_2", name="bash", input={}),
        ev("agent.tool_result", tool_use_id="sevt_1", content=[{"type": "text", "text": ""}]),
        ev("system.message", content=[{"type": "text", "text": "tz is UTC"}]),
    ]
    last = build_messages(events)[-1]
    assert [b["type"] for b in last["content"]] == ["tool_result", "tool_result", "text"]
    assert last["content"][0]["content"] == [{"type": "text", "text": "(no output)"}]
    assert last["content"][1]["tool_use_id"] == "sevt_2"
    assert "tz is UTC" in last["content"][2]["text"]
