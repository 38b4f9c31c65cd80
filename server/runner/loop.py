"""The agent loop: one turn = model request → tool calls in the sandbox → … → idle.

Every state change is an appended event, written before the next side effect, so the log alone
rebuilds the conversation (see `history.build_messages`) and a crashed turn can be told apart
from a finished one. A tool call is marked as started (its `agent.tool_use`, and for confirmed
calls the processed `user.tool_confirmation`) before it runs, so recovery never runs it twice.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import anyio

from sandbox.errors import SandboxNotFound
from server.core.actions import ACTION_EVENTS, outstanding_actions
from server.core.changes import ChangeBus
from server.core.files import FileService
from server.core.ids import new_id
from server.core.session_store import SessionStore
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
MAX_OUTPUT_FILE = 100 << 20

Route = tuple[Literal["builtin", "custom"], str | None]
"""How a tool name is served: a built-in with its permission policy, or a custom tool."""


class SandboxAccess(Protocol):
    """What the loop needs from the supervisor."""

    async def toolset_for(self, session_id: str) -> Toolset: ...

    async def collect_outputs(self, session_id: str) -> list[tuple[str, bytes]]:
        """Make new or changed files under /mnt/session/outputs/ the session's output files.

        An implementation may store them itself, streamed into the file store (as
        `SandboxManager` does, so that no output is ever held whole in memory), and return
        nothing; or return them as (relative path, bytes) for the loop to store.
        """
        ...

    async def turn_timeout(self, session_id: str) -> float | None:
        """The environment's wall-clock limit for one turn, if any."""
        ...

    async def forget(self, session_id: str) -> None:
        """Drop a sandbox handle that stopped working; the next use re-attaches."""
        ...


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


def tool_routes(agent: Json) -> dict[str, Route]:
    """Every tool the model may call, by name."""
    routes: dict[str, Route] = {}
    for tool in agent.get("tools") or []:
        if tool.get("type") == "agent_toolset_20260401":
            for config in tool.get("configs") or []:
                if config.get("enabled", True) and config["name"] in SANDBOX_TOOLS:
                    policy = (config.get("permission_policy") or {}).get("type", "always_allow")
                    routes[config["name"]] = ("builtin", policy)
        elif tool.get("type") == "custom":
            routes[tool["name"]] = ("custom", None)
    return routes


def tool_definitions(agent: Json) -> list[Json]:
    definitions: list[Json] = []
    customs = {t["name"]: t for t in agent.get("tools") or [] if t.get("type") == "custom"}
    for name, (kind, _) in tool_routes(agent).items():
        if kind == "builtin":
            definitions.append(TOOL_DEFINITIONS[name])
        else:
            tool = customs[name]
            definitions.append(
                {
                    "name": name,
                    "description": tool.get("description") or name,
                    "input_schema": tool.get("input_schema") or {"type": "object"},
                }
            )
    return definitions


def build_request(agent: Json, events: list[Json], settings: Settings) -> Json:
    """The Messages API request for the next model call of a turn (file sources unresolved)."""
    request: Json = {
        "model": agent["model"]["id"],
        "max_tokens": settings.max_tokens,
        "system": (agent.get("system") or "You are a helpful agent.") + SANDBOX_NOTE,
        "messages": build_messages(events),
    }
    tools = tool_definitions(agent)
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


def _error_result(tool_use_id: str, text: str) -> Json:
    return {
        "type": "agent.tool_result",
        "tool_use_id": tool_use_id,
        "content": [{"type": "text", "text": text}],
        "is_error": True,
    }


class _Previews:
    """Live `event_start` / `event_delta` previews of the `agent.message` being streamed.

    They go to stream followers only; the stored `agent.message` (same id) comes after.
    """

    def __init__(self, bus: ChangeBus, session_id: str, message_id: str) -> None:
        self._bus = bus
        self._session_id = session_id
        self._message_id = message_id
        self._started = False

    async def text(self, index: int, text: str) -> None:
        if not self._started:
            self._started = True
            start = {"type": "agent.message", "id": self._message_id}
            self._bus.publish_preview(self._session_id, {"type": "event_start", "event": start})
        delta = {"type": "content_delta", "index": index, "content": {"type": "text", "text": text}}
        self._bus.publish_preview(
            self._session_id,
            {"type": "event_delta", "event_id": self._message_id, "delta": delta},
        )


class TurnRunner:
    """Runs the queued work of one session until it needs input again."""

    def __init__(
        self,
        store: SessionStore,
        model: ModelClient,
        settings: Settings,
        sandboxes: SandboxAccess,
        files: FileService,
    ) -> None:
        self._store = store
        self._model = model
        self._settings = settings
        self._sandboxes = sandboxes
        self._files = files

    async def process(self, session_id: str) -> None:
        """Handle the session's queued client events."""
        pending = await self._store.pending(session_id)
        interrupts = [e["id"] for e in pending if e["type"] == "user.interrupt"]
        waiting = outstanding_actions(
            await self._store.events(session_id, types=ACTION_EVENTS), count_queued=False
        )
        if interrupts:
            if waiting:
                # An interrupt while tool calls wait for the client abandons them.
                record = await self._store.require(session_id)
                closing = [_error_result(a["id"], "Interrupted by the user.") for a in waiting]
                await self._store.append(
                    session_id,
                    [
                        *closing,
                        {"type": "session.usage", "usage": record.session["usage"], "budget": None},
                        {
                            "type": "session.status_idle",
                            "stop_reason": {"type": "end_turn"},
                            "stop_details": None,
                        },
                    ],
                    processed=interrupts,
                    status="idle",
                )
                waiting = []
            else:
                await self._store.mark_processed(session_id, interrupts)
        answers = [
            e for e in pending if e["type"] in ("user.tool_confirmation", "user.custom_tool_result")
        ]
        if any(e["type"] in INPUT_EVENTS for e in pending) or (waiting and answers):
            await self.run_turn(session_id)
            return
        leftovers = [e["id"] for e in pending if e["type"] not in INPUT_EVENTS]
        await self._store.mark_processed(session_id, leftovers)

    async def run_turn(self, session_id: str) -> None:
        """One turn, from `session.status_running` to `session.status_idle`."""
        started = time.monotonic()
        await self._store.append(session_id, [{"type": "session.status_running"}], status="running")
        end = TurnEnd({"type": "end_turn"})
        outcome = "finished"
        limit = await self._sandboxes.turn_timeout(session_id)
        turn_scope = anyio.CancelScope()
        try:
            with anyio.move_on_after(limit if limit else float("inf")) as deadline:
                with turn_scope:
                    async with anyio.create_task_group() as watchers:
                        watchers.start_soon(self._watch_for_interrupt, session_id, turn_scope)
                        try:
                            end = await self._loop(session_id)
                        except TurnFailed as failed:
                            end = failed.end
                        watchers.cancel_scope.cancel()
            if turn_scope.cancelled_caught:
                outcome = "interrupted"
            elif deadline.cancelled_caught:
                outcome = "timed_out"
        except anyio.get_cancelled_exc_class():
            outcome = "shutdown"
            raise
        except Exception:
            outcome = "crashed"
            logger.exception("turn of session %s failed", session_id)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(60):
                await self._finish(session_id, end, outcome, time.monotonic() - started)

    async def _finish(self, session_id: str, end: TurnEnd, outcome: str, elapsed: float) -> None:
        extra: list[Json] = []
        processed: list[str] = []
        if outcome != "finished":
            reason = {
                "interrupted": "Interrupted by the user.",
                "shutdown": "The server shut down before this tool call finished.",
                "crashed": "The tool call was abandoned because the turn failed.",
                "timed_out": "Stopped: the turn reached its time limit.",
            }[outcome]
            events = await self._store.events(session_id, types=ACTION_EVENTS)
            answered = {e.get("tool_use_id") for e in events if e["type"] == "agent.tool_result"}
            answered |= {
                e.get("custom_tool_use_id")
                for e in events
                if e["type"] == "user.custom_tool_result"
            }
            extra.extend(
                _error_result(e["id"], reason)
                for e in events
                if e["type"] in ("agent.tool_use", "agent.custom_tool_use")
                and e["id"] not in answered
            )
        if outcome == "interrupted":
            pending = await self._store.pending(session_id)
            processed = [e["id"] for e in pending if e["type"] == "user.interrupt"]
            end = TurnEnd({"type": "end_turn"})
        elif outcome in ("shutdown", "crashed", "timed_out"):
            message = {
                "shutdown": "the server shut down during this turn; send a message to continue",
                "crashed": "the turn failed unexpectedly; send a message to try again",
                "timed_out": "the turn reached its wall-clock limit (the environment's "
                "config.limits.turn_timeout_s) and was stopped; send a message to continue",
            }[outcome]
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
        if outcome != "shutdown":
            await self._collect_outputs(session_id)
        record = await self._store.require(session_id)
        usage = dict(record.session["usage"])
        usage["active_seconds"] = round((usage.get("active_seconds") or 0.0) + elapsed, 3)
        idle: Json = {"type": "session.status_idle", "stop_reason": end.stop_reason}
        idle["stop_details"] = end.stop_details
        await self._store.append(
            session_id,
            [*extra, {"type": "session.usage", "usage": usage, "budget": None}, idle],
            status="idle",
            active_seconds=elapsed,
            processed=processed,
        )

    async def _collect_outputs(self, session_id: str) -> None:
        """Turn files under /mnt/session/outputs/ into session-scoped files (best effort)."""
        try:
            outputs = await self._sandboxes.collect_outputs(session_id)
            for relative_path, data in outputs:
                await self._files.record_output(session_id, relative_path, data)
        except Exception as exc:  # an ExceptionGroup from the streaming task group included
            logger.warning("could not collect the outputs of %s: %s", session_id, exc)

    async def _watch_for_interrupt(self, session_id: str, scope: anyio.CancelScope) -> None:
        while True:
            token = self._store.bus.token(session_id)
            pending = await self._store.pending(session_id)
            if any(e["type"] == "user.interrupt" for e in pending):
                scope.cancel()
                return
            await token.wait()

    async def _loop(self, session_id: str) -> TurnEnd:
        # Budgets count per user message: a message sent mid-turn starts them again.
        requests = tool_calls = 0
        while True:
            still_waiting = await self._settle_actions(session_id)
            if still_waiting:
                ids = [a["id"] for a in still_waiting]
                return TurnEnd({"type": "requires_action", "event_ids": ids})
            pending = await self._store.pending(session_id)
            inputs = [e["id"] for e in pending if e["type"] in INPUT_EVENTS]
            if inputs:
                await self._store.mark_processed(session_id, inputs)
                requests = tool_calls = 0
            if requests >= self._settings.max_model_requests:
                return await self._over_limit(
                    session_id,
                    f"{self._settings.max_model_requests} model requests",
                    "MANAGED_AGENTS_MAX_MODEL_REQUESTS",
                )
            record = await self._store.require(session_id)
            agent = record.session["agent"]
            events = await self._store.events(session_id)
            request = await self._resolve_files(build_request(agent, events, self._settings))
            response, start_id, message_id = await self._call_model(session_id, request)
            requests += 1
            runnable, waiting = await self._record_response(
                session_id, agent, response, start_id, message_id
            )
            if response.stop_reason == "refusal":
                return TurnEnd({"type": "refusal"}, response.stop_details)
            # Calls waiting on the client are not counted: each needs a human answer anyway.
            if runnable and tool_calls + len(runnable) > self._settings.max_tool_calls:
                note = "Not run: this turn reached its limit of tool calls."
                await self._store.append(
                    session_id, [_error_result(t["id"], note) for t in runnable]
                )
                return await self._over_limit(
                    session_id,
                    f"{self._settings.max_tool_calls} tool calls",
                    "MANAGED_AGENTS_MAX_TOOL_CALLS",
                )
            tool_calls += len(runnable)
            for tool_use in runnable:
                await self._run_tool(session_id, tool_use)
            if waiting:
                continue  # settle (nothing answered yet) and idle with requires_action
            if runnable:
                continue
            if any(e["type"] in INPUT_EVENTS for e in await self._store.pending(session_id)):
                continue  # messages sent during the turn: answer them before going idle
            return TurnEnd({"type": "end_turn"})

    async def _settle_actions(self, session_id: str) -> list[Json]:
        """Apply the client's answers to waiting tool calls; return those still waiting.

        A user message sent instead of an answer abandons the calls it leaves open.
        """
        waiting = outstanding_actions(
            await self._store.events(session_id, types=ACTION_EVENTS), count_queued=False
        )
        if not waiting:
            return []
        pending = await self._store.pending(session_id)
        decisions = {e["tool_use_id"]: e for e in pending if e["type"] == "user.tool_confirmation"}
        results = {
            e["custom_tool_use_id"]: e for e in pending if e["type"] == "user.custom_tool_result"
        }
        moved_on = any(e["type"] in INPUT_EVENTS for e in pending)
        still: list[Json] = []
        for action in waiting:
            decision = decisions.get(action["id"])
            if action["type"] == "agent.tool_use" and decision is not None:
                if decision["result"] == "allow":
                    # Marked processed first: if the server dies mid-call, it is not re-run.
                    await self._store.mark_processed(session_id, [decision["id"]])
                    await self._run_tool(session_id, action)
                else:
                    note = decision.get("deny_message")
                    text = "The user denied this tool call." + (f" {note}" if note else "")
                    await self._store.append(
                        session_id, [_error_result(action["id"], text)], processed=[decision["id"]]
                    )
            elif action["type"] == "agent.custom_tool_use" and action["id"] in results:
                await self._store.mark_processed(session_id, [results[action["id"]]["id"]])
            elif moved_on:
                await self._store.append(
                    session_id,
                    [
                        _error_result(
                            action["id"],
                            "Not run: the user sent a new message instead of answering.",
                        )
                    ],
                )
            else:
                still.append(action)
        return still

    async def _resolve_files(self, request: Json) -> Json:
        """Replace `{"source": {"type": "file", ...}}` blocks with inline data from the store."""
        for message in request["messages"]:
            for index, block in enumerate(message["content"]):
                source = block.get("source") if isinstance(block, dict) else None
                if not source or source.get("type") != "file":
                    continue
                meta, data = await self._files.content(source["file_id"])
                mime = meta["mime_type"]
                resolved = dict(block)
                if block["type"] == "document" and mime.startswith("text/"):
                    resolved["source"] = {
                        "type": "text",
                        "media_type": "text/plain",
                        "data": data.decode("utf-8", errors="replace"),
                    }
                else:
                    resolved["source"] = {
                        "type": "base64",
                        "media_type": mime,
                        "data": base64.b64encode(data).decode(),
                    }
                message["content"][index] = resolved
        return request

    async def _over_limit(self, session_id: str, limit: str, setting: str) -> TurnEnd:
        """End a runaway turn: a `session.error` saying which budget, then idle."""
        await self._store.append(
            session_id,
            [
                {
                    "type": "session.error",
                    "error": {
                        "type": "tool_use_limit_reached_error",
                        "message": (
                            f"the turn reached its limit of {limit} per user message "
                            f"({setting}); send a message to let the agent continue"
                        ),
                        "retry_status": {"type": "exhausted"},
                    },
                }
            ],
        )
        return TurnEnd({"type": "budget_reached"})

    async def _call_model(self, session_id: str, request: Json) -> tuple[ModelResponse, str, str]:
        """The reply, its span start id, and the id its `agent.message` will have."""
        attempt = 0
        while True:
            (start,) = await self._store.append(session_id, [{"type": "span.model_request_start"}])
            message_id = new_id("sevt")
            preview = _Previews(self._store.bus, session_id, message_id)
            try:
                response = await self._model.create_message(request, on_text=preview.text)
                return response, start["id"], message_id
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
        self, session_id: str, agent: Json, response: ModelResponse, start_id: str, message_id: str
    ) -> tuple[list[Json], list[Json]]:
        """Append the reply as events; return (tool uses to run now, calls left to the client)."""
        routes = tool_routes(agent)
        text = [b for b in response.content if b.get("type") == "text" and b.get("text")]
        events: list[Json] = []
        if any(b.get("type") in ("thinking", "redacted_thinking") for b in response.content):
            events.append({"type": "agent.thinking"})
        if text:
            events.append(
                {
                    "id": message_id,
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
        for block in response.content:
            if block.get("type") != "tool_use":
                continue
            name, tool_input = block.get("name"), block.get("input") or {}
            kind, policy = routes.get(str(name), (None, None))
            if kind == "custom":
                events.append({"type": "agent.custom_tool_use", "name": name, "input": tool_input})
                continue
            event: Json = {"type": "agent.tool_use", "name": name, "input": tool_input}
            if kind == "builtin":
                ask = policy == "always_ask"
                event["evaluated_permission"] = "ask" if ask else "allow"
                event["evaluation"] = {"type": policy}
            else:
                event["evaluated_permission"] = "deny"
            events.append(event)
        stored = await self._store.append(session_id, events, usage=usage_delta(response.usage))
        runnable: list[Json] = []
        waiting: list[Json] = []
        denied: list[Json] = []
        for event in stored:
            if event["type"] == "agent.custom_tool_use":
                waiting.append(event)
            elif event["type"] == "agent.tool_use":
                permission = event["evaluated_permission"]
                if permission == "allow":
                    runnable.append(event)
                elif permission == "ask":
                    waiting.append(event)
                else:
                    denied.append(
                        _error_result(event["id"], f"tool {event['name']!r} is not enabled")
                    )
        if denied:
            await self._store.append(session_id, denied)
        return runnable, waiting

    async def _run_tool(self, session_id: str, tool_use: Json) -> None:
        content: Sequence[Json] = []
        is_error = True
        for attempt in (1, 2):
            try:
                toolset = await self._sandboxes.toolset_for(session_id)
                outcome = await toolset.run(tool_use["name"], tool_use.get("input") or {})
            except SandboxNotFound as exc:
                # The sandbox vanished under us (removed, or its init died): nothing ran.
                await self._sandboxes.forget(session_id)
                if attempt == 1:
                    continue
                content = [{"type": "text", "text": f"the sandbox is not available: {exc}"}]
            except Exception as exc:  # the backend is down: the model should hear why
                logger.warning("no sandbox for session %s: %s", session_id, exc)
                content = [{"type": "text", "text": f"the sandbox is not available: {exc}"}]
            else:
                content, is_error = outcome.content, outcome.is_error
            break
        await self._store.append(
            session_id,
            [
                {
                    "type": "agent.tool_result",
                    "tool_use_id": tool_use["id"],
                    "content": list(content),
                    "is_error": is_error,
                }
            ],
        )
