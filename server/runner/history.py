"""Rebuild the Messages API conversation from a session's event log (the log is the only state)."""

from __future__ import annotations

from typing import Any

Json = dict[str, Any]

ASSISTANT_EVENTS = frozenset({"agent.message", "agent.tool_use", "agent.custom_tool_use"})
RESULT_EVENTS = frozenset({"agent.tool_result", "user.custom_tool_result"})
MISSING_RESULT = "No result was recorded for this tool call (it was interrupted)."


def _tool_use_block(event: Json) -> Json:
    # The event id doubles as the tool_use id: it is unique and matches ^[A-Za-z0-9_-]+$.
    return {
        "type": "tool_use",
        "id": event["id"],
        "name": event["name"],
        "input": event.get("input") or {},
    }


def _result_block(tool_use_id: str, content: Any, is_error: bool) -> Json:
    blocks = content if isinstance(content, list) else [{"type": "text", "text": str(content)}]
    blocks = [b for b in blocks if not (b.get("type") == "text" and not b.get("text"))]
    if not blocks:
        blocks = [{"type": "text", "text": "(no output)"}]
    block: Json = {"type": "tool_result", "tool_use_id": tool_use_id, "content": blocks}
    if is_error:
        block["is_error"] = True
    return block


def _user_content(event: Json) -> list[Json]:
    if event["type"] == "system.message":
        text = "\n".join(b.get("text", "") for b in event.get("content") or [])
        return [{"type": "text", "text": f"<system-message>\n{text}\n</system-message>"}]
    return [dict(b) for b in event.get("content") or []]


def build_messages(events: list[Json], *, include_pending: bool = False) -> list[Json]:
    """The `messages` array for the next model request.

    Agent events become assistant turns; tool results, user and system messages become user
    turns (tool results first, as the API requires). Client events still queued
    (`processed_at` null) are left out unless `include_pending`. A tool use whose result is
    missing gets an error result, so the conversation is always valid.
    """
    messages: list[Json] = []
    open_tool_uses: list[str] = []

    def close_open_tool_uses() -> None:
        if open_tool_uses:
            blocks = [_result_block(t, MISSING_RESULT, True) for t in open_tool_uses]
            _append_user(messages, blocks)
            open_tool_uses.clear()

    for event in events:
        kind = event["type"]
        queued = event.get("processed_at") is None and kind.startswith(("user.", "system."))
        if queued and not include_pending:
            continue
        if kind in ASSISTANT_EVENTS:
            if not messages or messages[-1]["role"] != "assistant":
                close_open_tool_uses()
                messages.append({"role": "assistant", "content": []})
            if kind == "agent.message":
                messages[-1]["content"].extend(
                    b
                    for b in event.get("content") or []
                    if b.get("type") != "text" or b.get("text")
                )
            else:
                messages[-1]["content"].append(_tool_use_block(event))
                open_tool_uses.append(event["id"])
        elif kind in RESULT_EVENTS:
            tool_use_id = event.get("tool_use_id") or event.get("custom_tool_use_id") or ""
            if tool_use_id in open_tool_uses:
                open_tool_uses.remove(tool_use_id)
                _append_user(
                    messages,
                    [_result_block(tool_use_id, event.get("content"), bool(event.get("is_error")))],
                )
        elif kind in ("user.message", "system.message"):
            close_open_tool_uses()
            _append_user(messages, _user_content(event))
    close_open_tool_uses()
    return [m for m in messages if m["content"]]


def _append_user(messages: list[Json], blocks: list[Json]) -> None:
    if not messages or messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": []})
    content = messages[-1]["content"]
    results = [b for b in content if b.get("type") == "tool_result"]
    others = [b for b in content if b.get("type") != "tool_result"]
    for block in blocks:
        (results if block.get("type") == "tool_result" else others).append(block)
    messages[-1]["content"] = results + others
