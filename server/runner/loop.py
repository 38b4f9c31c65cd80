"""The agent loop: one turn = model request → tool calls in the sandbox → … → idle.

Every state change is an appended event, written before the next side effect, so the log alone
rebuilds the conversation (see `history.build_messages`) and a crashed turn can be told apart
from a finished one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio

from server.core.sessions import SessionStore
from server.settings import Settings

from .history import build_messages
from .model import ModelClient, ModelError, ModelResponse
from .toolset import SANDBOX_TOOLS, TOOL_DEFINITIONS, Toolset

logger = logging.getLogger(__name__)

Json = dict[str, Any]
INPUT_EVENTS = ("user.message", "system.message")
SANDBOX_NOTE = (
    "\n\nYou are working in a sandboxed Linux container. Your working directory is /workspace. "
    "Files the user uploaded are under /mnt/session/uploads/ (read-only). Save deliverables the "
    "user should receive under /mnt/session/outputs/."
)


@dataclass(frozen=True, slots=True)
class TurnEnd:
    """How a turn ended: the `stop_reason` of its `session.status_idle`."""

    stop_reason: Json
    stop_details: Json | None = None


class TurnFailed(Exception):
    """The turn cannot go on (model errors exhausted); carries the stop reason."""

    def __init__(self, end: TurnEnd) -> None:
        super().__init__(end.stop_reason["type"])
        self.end = end


def enabled_builtin_tools(agent: Json) -> list[str]:
    """Names of the built-in sandbox tools the agent may use without asking."""
    names: list[str] = []
    for tool in agent.get("tools") or []:
        if tool.get("type") != "agent_toolset_20260401":
            continue
        for config in tool.get("configs") or []:
            policy = (config.get("permission_policy") or {}).get("type", "always_allow")
            enabled = config.get("enabled", True) and config["name"] in SANDBOX_TOOLS
            if enabled and policy == "always_allow":
                names.append(config["name"])
    return names


def build_request(agent: Json, events: list[Json], settings: Settings) -> Json:
    """The Messages API request for the next model call of a turn."""
    request: Json = {
        "model": agent["model"]["id"],
        "max_tokens": settings.max_tokens,
        "system": (agent.get("system") or "You are a helpful agent.") + SANDBOX_NOTE,
        "messages": build_messages(events),
    }
    tools = [TOOL_DEFINITIONS[name] for name in enabled_builtin_tools(agent)]
    if tools:
        request["tools"] = tools
    return request


def usage_delta(usage: Json) -> Json:
    """Session usage increment from one model response's `usage`."""
    return {
        "input_tokens": int(usage.get("input_tokens") or 0),
        "output_tokens": int(usage.get("output_tokens") or 0),
        "cache_read_input_tokens": int(usage.get("cache_read_input_tokens") or 0),
        "cache_creation": {
            "ephemeral_5m_input_tokens": int(usage.get("cache_creation_input_tokens") or 0),
            "ephemeral_1h_input_tokens": 0,
        },
    }


def model_usage(usage: Json, speed: str) -> Json:
    return {
        "input_tokens": int(usage.get("input_tokens") or 0),
        "output_tokens": int(usage.get("output_tokens") or 0),
        "cache_read_input_tokens": int(usage.get("cache_read_input_tokens") or 0),
        "cache_creation_input_tokens": int(usage.get("cache_creation_input_tokens") or 0),
        "speed": speed,
    }


SandboxGetter = Callable[[str], Awaitable[Toolset]]


class TurnRunner:
    """Runs the queued work of one session until it needs input again."""

    def __init__(
        self,
        store: SessionStore,
        model: ModelClient,
        settings: Settings,
        toolset_for: SandboxGetter,
    ) -> None:
        self._store = store
        self._model = model
        self._settings = settings
        self._toolset_for = toolset_for

    async def process(self, session_id: str) -> None:
        """Handle the session's queued client events: interrupts while idle, then a turn."""
        pending = await self._store.pending(session_id)
        interrupts = [e["id"] for e in pending if e["type"] == "user.interrupt"]
        if interrupts:
            # Nothing is running, so an interrupt has nothing to stop.
            await self._store.mark_processed(session_id, interrupts)
        if any(e["type"] in INPUT_EVENTS for e in pending):
            await self.run_turn(session_id)
            return
        leftovers = [e["id"] for e in pending if e["type"] not in INPUT_EVENTS]
        await self._store.mark_processed(session_id, leftovers)

    async def run_turn(self, session_id: str) -> None:
        """One turn, from `session.status_running` to `session.status_idle`."""
        await self._store.append(session_id, [{"type": "session.status_running"}], status="running")
        end = TurnEnd({"type": "end_turn"})
        outcome = "finished"
        try:
            with anyio.CancelScope() as turn_scope:
                async with anyio.create_task_group() as watchers:
                    watchers.start_soon(self._watch_for_interrupt, session_id, turn_scope)
                    try:
                        end = await self._loop(session_id)
                    except TurnFailed as failed:
                        end = failed.end
                    watchers.cancel_scope.cancel()
            if turn_scope.cancelled_caught:
                outcome = "interrupted"
        except anyio.get_cancelled_exc_class():
            outcome = "shutdown"
            raise
        except Exception:
            outcome = "crashed"
            logger.exception("turn of session %s failed", session_id)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                await self._finish(session_id, end, outcome)

    async def _finish(self, session_id: str, end: TurnEnd, outcome: str) -> None:
        extra: list[Json] = []
        if outcome != "finished":
            reason = {
                "interrupted": "Interrupted by the user.",
                "shutdown": "The server shut down before this tool call finished.",
                "crashed": "The tool call was abandoned because the turn failed.",
            }[outcome]
            extra.extend(await self._close_open_tool_uses(session_id, reason))
        if outcome == "interrupted":
            pending = await self._store.pending(session_id)
            interrupts = [e["id"] for e in pending if e["type"] == "user.interrupt"]
            await self._store.mark_processed(session_id, interrupts)
        elif outcome in ("shutdown", "crashed"):
            message = (
                "the server shut down during this turn; send a message to continue"
                if outcome == "shutdown"
                else "the turn failed unexpectedly; send a message to try again"
            )
            extra.append(
                {
                    "type": "session.error",
                    "error": {
                        "type": "unknown_error",
                        "message": message,
                        "retry_status": {"type": "exhausted"},
                    },
                }
            )
            end = TurnEnd({"type": "retries_exhausted"})
        record = await self._store.require(session_id)
        idle: Json = {"type": "session.status_idle", "stop_reason": end.stop_reason}
        idle["stop_details"] = end.stop_details
        await self._store.append(
            session_id,
            [
                *extra,
                {"type": "session.usage", "usage": record.session["usage"], "budget": None},
                idle,
            ],
            status="idle",
        )

    async def _close_open_tool_uses(self, session_id: str, reason: str) -> list[Json]:
        events = await self._store.events(session_id)
        answered = {e.get("tool_use_id") for e in events if e["type"] == "agent.tool_result"}
        return [
            {
                "type": "agent.tool_result",
                "tool_use_id": e["id"],
                "content": [{"type": "text", "text": reason}],
                "is_error": True,
            }
            for e in events
            if e["type"] == "agent.tool_use" and e["id"] not in answered
        ]

    async def _watch_for_interrupt(self, session_id: str, scope: anyio.CancelScope) -> None:
        while True:
            token = self._store.bus.token(session_id)
            pending = await self._store.pending(session_id)
            if any(e["type"] == "user.interrupt" for e in pending):
                scope.cancel()
                return
            await token.wait()

    async def _loop(self, session_id: str) -> TurnEnd:
        requests = 0
        while True:
            pending = await self._store.pending(session_id)
            inputs = [e["id"] for e in pending if e["type"] in INPUT_EVENTS]
            if inputs:
                await self._store.mark_processed(session_id, inputs)
            if requests >= self._settings.max_model_requests:
                return await self._over_limit(session_id)
            record = await self._store.require(session_id)
            agent = record.session["agent"]
            events = await self._store.events(session_id)
            request = build_request(agent, events, self._settings)
            response, start_id = await self._call_model(session_id, request)
            requests += 1
            tool_uses = await self._record_response(session_id, agent, response, start_id)
            if response.stop_reason == "refusal":
                return TurnEnd({"type": "refusal"}, response.stop_details)
            if tool_uses:
                for tool_use in tool_uses:
                    await self._run_tool(session_id, tool_use)
                continue
            if any(e["type"] in INPUT_EVENTS for e in await self._store.pending(session_id)):
                continue  # messages sent during the turn: answer them before going idle
            return TurnEnd({"type": "end_turn"})

    async def _over_limit(self, session_id: str) -> TurnEnd:
        limit = self._settings.max_model_requests
        await self._store.append(
            session_id,
            [
                {
                    "type": "session.error",
                    "error": {
                        "type": "tool_use_limit_reached_error",
                        "message": (
                            f"the turn reached the limit of {limit} model requests "
                            "(MANAGED_AGENTS_MAX_MODEL_REQUESTS); send a message to continue"
                        ),
                        "retry_status": {"type": "exhausted"},
                    },
                }
            ],
        )
        return TurnEnd({"type": "retries_exhausted"})

    async def _call_model(self, session_id: str, request: Json) -> tuple[ModelResponse, str]:
        attempt = 0
        while True:
            (start,) = await self._store.append(session_id, [{"type": "span.model_request_start"}])
            try:
                return await self._model.create_message(request), start["id"]
            except ModelError as error:
                attempt += 1
                retry = error.retryable and attempt <= self._settings.model_retries
                await self._store.append(
                    session_id,
                    [
                        {
                            "type": "span.model_request_end",
                            "model_request_start_id": start["id"],
                            "is_error": True,
                            "model_usage": model_usage({}, "standard"),
                        },
                        {
                            "type": "session.error",
                            "error": {
                                "type": error.kind,
                                "message": error.message,
                                "retry_status": {"type": "retrying" if retry else "exhausted"},
                            },
                        },
                    ],
                )
                if not retry:
                    raise TurnFailed(TurnEnd({"type": "retries_exhausted"})) from error
                delay = self._settings.retry_delay * 2 ** (attempt - 1)
                if error.retry_after is not None:
                    delay = max(delay, min(error.retry_after, 60.0))
                await self._store.append(
                    session_id, [{"type": "session.status_rescheduled"}], status="rescheduling"
                )
                await anyio.sleep(min(delay, 60.0))
                await self._store.append(
                    session_id, [{"type": "session.status_running"}], status="running"
                )

    async def _record_response(
        self, session_id: str, agent: Json, response: ModelResponse, start_id: str
    ) -> list[Json]:
        """Append the reply as events; return the tool uses that should run now."""
        allowed = set(enabled_builtin_tools(agent))
        text = [b for b in response.content if b.get("type") == "text" and b.get("text")]
        events: list[Json] = []
        if any(b.get("type") in ("thinking", "redacted_thinking") for b in response.content):
            events.append({"type": "agent.thinking"})
        if text:
            events.append(
                {
                    "type": "agent.message",
                    "content": [{"type": "text", "text": b["text"]} for b in text],
                }
            )
        speed = str((agent.get("model") or {}).get("speed") or "standard")
        events.append(
            {
                "type": "span.model_request_end",
                "model_request_start_id": start_id,
                "is_error": False,
                "model_usage": model_usage(response.usage, speed),
            }
        )
        denied: list[Json] = []
        for block in response.content:
            if block.get("type") != "tool_use":
                continue
            event: Json = {
                "type": "agent.tool_use",
                "name": block.get("name"),
                "input": block.get("input") or {},
            }
            if block.get("name") in allowed:
                event["evaluated_permission"] = "allow"
                event["evaluation"] = {"type": "always_allow"}
            else:
                event["evaluated_permission"] = "deny"
            events.append(event)
        stored = await self._store.append(session_id, events, usage=usage_delta(response.usage))
        runnable = []
        for event in stored:
            if event["type"] != "agent.tool_use":
                continue
            if event["evaluated_permission"] == "allow":
                runnable.append(event)
            else:
                denied.append(
                    {
                        "type": "agent.tool_result",
                        "tool_use_id": event["id"],
                        "content": [
                            {"type": "text", "text": f"tool {event['name']!r} is not enabled"}
                        ],
                        "is_error": True,
                    }
                )
        if denied:
            await self._store.append(session_id, denied)
        return runnable

    async def _run_tool(self, session_id: str, tool_use: Json) -> None:
        try:
            toolset = await self._toolset_for(session_id)
        except Exception as exc:  # the sandbox backend is down: the model should hear why
            logger.warning("no sandbox for session %s: %s", session_id, exc)
            content = [{"type": "text", "text": f"the sandbox is not available: {exc}"}]
            is_error = True
        else:
            outcome = await toolset.run(tool_use["name"], tool_use.get("input") or {})
            content, is_error = outcome.content, outcome.is_error
        await self._store.append(
            session_id,
            [
                {
                    "type": "agent.tool_result",
                    "tool_use_id": tool_use["id"],
                    "content": content,
                    "is_error": is_error,
                }
            ],
        )
