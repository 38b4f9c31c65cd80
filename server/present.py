"""Presenting sessions to people and models: compact summaries, clipping, transcripts, progress.

MCP clients cut tool results at about 25,000 tokens, so everything here is bounded; what is left
out is said, never silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

Json = dict[str, Any]

RESULT_CHARS = 40_000
"""Budget for one tool result (JSON), under Claude Code's 50,000-character spill threshold."""
OUTPUT_CLIP = 2_000
MESSAGE_CLIP = 8_000
INPUT_CLIP = 1_000


def clip(text: str, limit: int) -> str:
    """`text` within `limit` characters: head and tail with a marker saying what was cut."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    cut = len(text) - head - tail
    return f"{text[:head]}\n[... {cut} characters clipped ...]\n{text[-tail:]}"


def clip_values(value: Any, limit: int) -> Any:
    """Clip every long string inside a JSON value."""
    if isinstance(value, str):
        return clip(value, limit)
    if isinstance(value, list):
        return [clip_values(v, limit) for v in value]
    if isinstance(value, dict):
        return {k: clip_values(v, limit) for k, v in value.items()}
    return value


def content_text(content: Iterable[Json] | None) -> str:
    """The text of content blocks; images and documents become placeholders."""
    parts = []
    for block in content or []:
        kind = block.get("type")
        if kind == "text":
            parts.append(str(block.get("text", "")))
        elif kind in ("image", "document"):
            parts.append(f"[{kind}]")
    return "\n".join(parts)


def summarize(event: Json) -> Json | None:
    """A compact form of one event for a model reading along, or None for bookkeeping events."""
    kind = event["type"]
    base: Json = {"type": kind, "id": event["id"]}
    if kind in ("agent.message", "user.message", "system.message"):
        return {**base, "text": clip(content_text(event.get("content")), MESSAGE_CLIP)}
    if kind in ("agent.tool_use", "agent.custom_tool_use"):
        item = {
            **base,
            "name": event.get("name"),
            "input": clip_values(event.get("input"), INPUT_CLIP),
        }
        if event.get("evaluated_permission") and event["evaluated_permission"] != "allow":
            item["evaluated_permission"] = event["evaluated_permission"]
        return item
    if kind == "agent.tool_result":
        return {
            **base,
            "tool_use_id": event.get("tool_use_id"),
            "is_error": bool(event.get("is_error")),
            "output": clip(content_text(event.get("content")), OUTPUT_CLIP),
        }
    if kind == "user.custom_tool_result":
        return {
            **base,
            "custom_tool_use_id": event.get("custom_tool_use_id"),
            "output": clip(content_text(event.get("content")), OUTPUT_CLIP),
        }
    if kind == "session.error":
        return {**base, "error": event.get("error")}
    if kind == "session.status_idle":
        return {**base, "stop_reason": event.get("stop_reason")}
    if kind in ("session.status_terminated", "user.interrupt", "user.tool_confirmation"):
        return {k: v for k, v in event.items() if k != "processed_at"}
    return None


def fit_events(
    events: Sequence[Json], *, full: bool, budget: int = RESULT_CHARS
) -> tuple[list[Json], str | None, bool]:
    """Events (summarised unless `full`) that fit in `budget` characters.

    Returns (items, id of the last event consumed, whether events were left out). At least one
    event is always consumed, so a caller paging with the returned id always moves forward.
    """
    items: list[Json] = []
    used = 0
    last: str | None = None
    for event in events:
        item = event if full else summarize(event)
        size = len(json.dumps(item)) + 2 if item is not None else 0
        if items and used + size > budget:
            return items, last, True
        if item is not None:
            if size > budget:
                item = clip_values(item, budget // 8)
                size = len(json.dumps(item))
            items.append(item)
            used += size
        last = event["id"]
    return items, last, False


def progress_message(events: Sequence[Json], *, requests: int) -> str:
    """One line for a progress notification: what the sub-agent is doing now."""
    for event in reversed(events):
        kind = event["type"]
        if kind == "agent.tool_use":
            detail = event.get("input") or {}
            what = detail.get("command") or detail.get("file_path") or detail.get("pattern") or ""
            return clip(f"running {event.get('name')}: {what}".strip(), 160)
        if kind == "agent.message":
            return clip("said: " + content_text(event.get("content")).replace("\n", " "), 160)
        if kind == "span.model_request_start":
            return f"thinking (model request {requests})"
        if kind == "session.status_idle":
            return "idle"
        if kind == "session.status_rescheduled":
            return "retrying the model request"
    return "waiting"


def final_answer(events: Sequence[Json]) -> str | None:
    """The text of the agent's messages in the last turn."""
    texts: list[str] = []
    for event in reversed(events):
        if event["type"] == "session.status_running":
            break
        if event["type"] == "agent.message":
            texts.append(content_text(event.get("content")))
    return "\n\n".join(reversed(texts)) or None


def transcript_markdown(session: Json, events: Sequence[Json]) -> str:
    """The session as a readable Markdown transcript (tool output clipped)."""
    title = session.get("title") or session["id"]
    agent = session.get("agent") or {}
    lines = [
        f"# {title}",
        "",
        f"- session `{session['id']}`, status **{session['status']}**",
        f"- agent `{agent.get('id')}` v{agent.get('version')} ({agent.get('name')}), "
        f"model `{(agent.get('model') or {}).get('id')}`",
        f"- created {session.get('created_at')}",
        "",
    ]
    for event in events:
        kind = event["type"]
        if kind == "user.message":
            lines += ["## User", "", content_text(event.get("content")), ""]
        elif kind == "system.message":
            lines += ["## System", "", content_text(event.get("content")), ""]
        elif kind == "agent.message":
            lines += ["## Agent", "", content_text(event.get("content")), ""]
        elif kind in ("agent.tool_use", "agent.custom_tool_use"):
            body = json.dumps(event.get("input"), indent=2, ensure_ascii=False)
            lines += [
                f"**{event.get('name')}** `{event['id']}`",
                "",
                "```json",
                clip(body, 4000),
                "```",
                "",
            ]
        elif kind == "agent.tool_result":
            label = "error" if event.get("is_error") else "output"
            lines += [
                f"_{label}_:",
                "",
                "```",
                clip(content_text(event.get("content")), 4000),
                "```",
                "",
            ]
        elif kind == "session.error":
            error = event.get("error") or {}
            lines += [f"> **error** {error.get('type')}: {error.get('message')}", ""]
        elif kind == "session.status_idle":
            reason = (event.get("stop_reason") or {}).get("type")
            lines += [f"_— idle ({reason})_", ""]
    return "\n".join(lines)
