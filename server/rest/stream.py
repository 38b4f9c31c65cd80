"""A session's live events as server-sent events, following the hosted stream's contract.

- Every frame has an `event: <type>` line (the SDK drops frames without one) and one
  `data: <json>` line; `: ping` comments keep idle connections alive.
- No replay: only events appended after the stream opened are sent, in log order. Client
  events go out when appended (`processed_at: null`) and again once processed.
- With `event_deltas`, `event_start` / `event_delta` previews of `agent.message` precede the
  stored event of the same id (at most one `event_start` per id per connection; best effort).
- The stream ends after `session.deleted`, when the client goes away, and when the server
  starts shutting down (`end_streams`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from server.core.clock import now
from server.core.ids import new_id
from server.core.store import Json

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from server.app import Services

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 15.0
DELTA_TYPES = ("agent.message", "agent.thinking")
"""The `event_deltas` values the API accepts (this server previews `agent.message` only)."""
PREVIEW_QUEUE = 1024
"""Previews held for a slow client; past that, the rest of that message's preview is shed."""
PING = b": ping\n\n"
_CLOSING_KEY = "managed_agents_streams_closing"


@dataclass(frozen=True, slots=True)
class StreamOptions:
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    """Seconds of silence before a `: ping` comment."""


def streams_closing(app: Starlette) -> anyio.Event:
    """The event that ends every open stream of `app` (made on first use)."""
    event = getattr(app.state, _CLOSING_KEY, None)
    if event is None:
        event = anyio.Event()
        setattr(app.state, _CLOSING_KEY, event)
    return event


def end_streams(app: Starlette) -> None:
    """End every open event stream of `app`, now and from now on.

    Call it when the server starts shutting down: uvicorn waits for open responses to finish
    before it stops, and an event stream never finishes by itself.
    """
    streams_closing(app).set()


def frame(event: Json) -> bytes:
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


def _body(data: bytes, *, more: bool = True) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


class EventStream(Response):
    """The SSE response of `GET /v1/sessions/{id}/events/stream` for one connection."""

    def __init__(
        self,
        services: Services,
        session_id: str,
        *,
        cursor: int,
        pending: dict[str, int],
        deltas: frozenset[str],
        options: StreamOptions,
        closing: anyio.Event,
    ) -> None:
        self.status_code = 200
        self.background = None
        self._services = services
        self._bus = services.store.bus
        self._session_id = session_id
        self._cursor = cursor
        """Log position of the last event sent (or there when the stream opened)."""
        self._pending = pending
        """Client events sent with `processed_at: null`, by id, with their log positions."""
        self._deltas = deltas
        self._options = options
        self._closing = closing
        self._wake = anyio.Event()
        self._changed = True
        self._previews: deque[dict[str, object]] = deque()
        self._started: set[str] = set()
        self._finished: set[str] = set()
        self._shed: set[str] = set()

    @classmethod
    async def open(
        cls,
        services: Services,
        session_id: str,
        *,
        deltas: frozenset[str],
        options: StreamOptions,
        closing: anyio.Event,
    ) -> EventStream:
        """A stream starting after the session's current last event.

        Raises:
            NotFoundError: no such session.
        """
        sessions = services.sessions
        last = await sessions.list_events(session_id, limit=1, order="desc")
        cursor = await sessions.event_position(session_id, last.data[0]["id"]) if last.data else 0
        # Client events still queued are echoed again once processed, even those sent before
        # the stream opened: their processing happens after.
        pending: dict[str, int] = {}
        for event in await services.store.pending(session_id):
            position = await sessions.event_position(session_id, event["id"])
            if position <= cursor:
                pending[event["id"]] = position
        return cls(
            services,
            session_id,
            cursor=cursor,
            pending=pending,
            deltas=deltas,
            options=options,
            closing=closing,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        previews: contextlib.AbstractContextManager[None] = (
            self._bus.previews(self._session_id, self._queue_preview)
            if "agent.message" in self._deltas
            else contextlib.nullcontext()
        )
        with previews:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            async with anyio.create_task_group() as group:
                group.start_soon(self._end_on_disconnect, receive, group.cancel_scope)
                group.start_soon(self._end_on_close, group.cancel_scope)
                await group.start(self._relay_changes)
                try:
                    await self._follow(send)
                except Exception:
                    logger.exception("event stream of session %s failed", self._session_id)
                group.cancel_scope.cancel()
        await send(_body(b"", more=False))

    # ------------------------------------------------------------------------------ wake-ups

    async def _end_on_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async def _end_on_close(self, scope: anyio.CancelScope) -> None:
        await self._closing.wait()
        scope.cancel()

    async def _relay_changes(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Turn the session's change tokens into wake-ups of `_follow`.

        The next token is taken right when one fires (nothing can run in between), and the
        first before `_follow` first reads the store: no change goes unnoticed.
        """
        token = self._bus.token(self._session_id)
        task_status.started()
        while True:
            await token.wait()
            token = self._bus.token(self._session_id)
            self._changed = True
            self._wake.set()

    def _queue_preview(self, preview: dict[str, object]) -> None:
        """The bus's preview listener: called in the publisher's task, before the previewed
        event is stored, so `_follow` always has a message's previews before the message."""
        if len(self._previews) >= PREVIEW_QUEUE:
            # Shed the rest of this message's preview so what went out stays a prefix.
            self._shed.add(_preview_id(preview))
            return
        self._previews.append(preview)
        self._wake.set()

    # ------------------------------------------------------------------------------- sending

    async def _follow(self, send: Send) -> None:
        store = self._services.store
        while True:
            self._wake = anyio.Event()
            # Previews before stored events: a message's previews are published before the
            # append that stores it. One that still comes later is dropped (`_finished`).
            await self._send_previews(send)
            if self._changed:
                self._changed = False
                events = await store.events(self._session_id, after_position=self._cursor)
                # Previews that came while the read ran may be of a message it found: they
                # still go first.
                await self._send_previews(send)
                for event in events:
                    self._cursor += 1
                    if event["processed_at"] is None:
                        self._pending[event["id"]] = self._cursor
                    if event["type"] in self._deltas:
                        self._started.discard(event["id"])
                        self._finished.add(event["id"])
                    await send(_body(frame(event)))
                if self._pending:
                    await self._send_processed(send)
                deleted = self._bus.deleted_event(self._session_id)
                if deleted is None and not events and await store.get(self._session_id) is None:
                    # Deleted by another server process sharing the database.
                    deleted = {
                        "type": "session.deleted",
                        "id": new_id("sevt"),
                        "processed_at": now(),
                    }
                if deleted is not None:
                    await send(_body(frame(dict(deleted))))
                    return
            with anyio.move_on_after(self._options.heartbeat_interval) as timer:
                await self._wake.wait()
            if timer.cancelled_caught:
                await send(_body(PING))

    async def _send_previews(self, send: Send) -> None:
        while self._previews:
            preview = self._previews.popleft()
            event_id = _preview_id(preview)
            if event_id in self._finished or event_id in self._shed:
                continue  # the stored event went out already: a late preview would confuse
            if preview["type"] == "event_start":
                target = preview.get("event")
                kind = target.get("type") if isinstance(target, dict) else None
                if kind not in self._deltas or event_id in self._started:
                    continue
                self._started.add(event_id)
            elif event_id not in self._started:
                continue  # its event_start was missed: a delta alone cannot be placed
            await send(_body(frame(preview)))

    async def _send_processed(self, send: Send) -> None:
        """Send again the tracked client events that have been processed since."""
        store = self._services.store
        still = {e["id"] for e in await store.pending(self._session_id)}
        done = sorted((p, i) for i, p in self._pending.items() if i not in still)
        if not done:
            return
        events = await store.events(self._session_id, after_position=done[0][0] - 1)
        by_id = {e["id"]: e for e in events}
        for _, event_id in done:
            del self._pending[event_id]
            event = by_id.get(event_id)
            if event is not None and event["processed_at"] is not None:
                await send(_body(frame(event)))


def _preview_id(preview: dict[str, object]) -> str:
    if preview.get("type") == "event_start":
        target = preview.get("event")
        return str(target.get("id")) if isinstance(target, dict) else ""
    return str(preview.get("event_id"))
