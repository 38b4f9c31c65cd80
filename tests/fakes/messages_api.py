"""A scripted loopback HTTP server that imitates the Anthropic Messages API for tests."""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

__all__ = [
    "DEFAULT_USAGE",
    "ErrorReply",
    "FakeMessagesAPI",
    "Hold",
    "Reply",
    "Step",
    "text",
    "tool_use",
]

DEFAULT_USAGE: dict[str, Any] = {
    "input_tokens": 10,
    "output_tokens": 5,
    "cache_read_input_tokens": 0,
    "cache_creation_input_tokens": 0,
}

_STARTUP_TIMEOUT = 10.0
_JOIN_TIMEOUT = 5.0
# How often a pending Hold looks at its release event; short enough to be invisible in tests.
_HOLD_POLL_INTERVAL = 0.01
# Deltas are split so consumers see more than one chunk per block, as with the real API.
_CHUNKS_PER_BLOCK = 3


@dataclass
class Reply:
    """One model response."""

    content: list[dict[str, Any]]
    stop_reason: str = "end_turn"
    usage: dict[str, Any] | None = None
    model: str | None = None
    stop_sequence: str | None = None


@dataclass
class ErrorReply:
    """An HTTP error response, sent before any streaming starts, as the real API does."""

    status: int
    error_type: str
    message: str = "scripted error"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Hold:
    """A response that stalls mid-stream until `release` is set or the client goes away."""

    text_before: str = ""
    release: threading.Event = field(default_factory=threading.Event)
    then: Reply | None = None
    started: threading.Event = field(default_factory=threading.Event)


Step: TypeAlias = (
    Reply | ErrorReply | Hold | Callable[[dict[str, Any]], "Reply | ErrorReply | Hold"]
)


def text(t: str, **kw: Any) -> Reply:
    """A reply made of one text block (end_turn unless `stop_reason` is given)."""
    return Reply(content=[{"type": "text", "text": t}], **kw)


def tool_use(
    name: str, input: dict[str, Any], *, id: str | None = None, text: str | None = None
) -> Reply:
    """A tool_use reply, optionally preceded by a text block."""
    content: list[dict[str, Any]] = []
    if text is not None:
        content.append({"type": "text", "text": text})
    content.append(
        {
            "type": "tool_use",
            "id": id if id is not None else "toolu_" + secrets.token_hex(12),
            "name": name,
            "input": input,
        }
    )
    return Reply(content=content, stop_reason="tool_use")


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _usage(reply: Reply) -> dict[str, Any]:
    # Merged so a test can script just the counts it cares about.
    return {**DEFAULT_USAGE, **(reply.usage or {})}


def _error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def _message(
    reply: Reply, request_body: dict[str, Any], content: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "id": _new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": reply.model or request_body.get("model") or "claude-fake",
        "content": content,
        "stop_reason": reply.stop_reason,
        "stop_sequence": reply.stop_sequence,
        "usage": _usage(reply),
    }


def _chunks(s: str) -> list[str]:
    if not s:
        return []
    size = max(1, math.ceil(len(s) / _CHUNKS_PER_BLOCK))
    return [s[i : i + size] for i in range(0, len(s), size)]


def _block_events(index: int, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The content_block_start/delta/stop events that rebuild `block` in the SDK's accumulator."""
    kind = block.get("type")
    deltas: list[dict[str, Any]]
    if kind == "text":
        start = {**block, "text": ""}
        deltas = [{"type": "text_delta", "text": c} for c in _chunks(block.get("text", ""))]
    elif kind in ("tool_use", "server_tool_use"):
        start = {**block, "input": {}}
        # The SDK re-parses the concatenated partial_json with jiter after every delta, so
        # splitting anywhere (even inside an escape) is safe; non-ASCII is sent raw like the API.
        payload = json.dumps(block.get("input", {}), ensure_ascii=False)
        # The real API opens every tool input with an empty partial_json delta.
        deltas = [{"type": "input_json_delta", "partial_json": ""}]
        deltas += [{"type": "input_json_delta", "partial_json": c} for c in _chunks(payload)]
    elif kind == "thinking":
        start = {**block, "thinking": "", "signature": ""}
        deltas = [{"type": "thinking_delta", "thinking": c} for c in _chunks(block["thinking"])]
        deltas.append({"type": "signature_delta", "signature": block.get("signature", "")})
    else:
        # Other blocks (server tool results, redacted thinking) arrive whole in the start event.
        start, deltas = block, []
    events: list[tuple[str, dict[str, Any]]] = [
        (
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": start},
        )
    ]
    events += [
        ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
        for d in deltas
    ]
    events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


def _message_start(model: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "id": _new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # The API reports a provisional output count here; message_delta carries the total.
            "usage": {**usage, "output_tokens": 1},
        },
    }


def _message_delta(reply: Reply) -> dict[str, Any]:
    return {
        "type": "message_delta",
        "delta": {"stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence},
        "usage": {"output_tokens": _usage(reply)["output_tokens"]},
    }


class _SSE:
    """Writes SSE frames straight to the ASGI `send`, so each is on the wire once awaited."""

    def __init__(self, send: Send, request_id: str) -> None:
        self._send = send
        self._request_id = request_id

    async def open(self) -> None:
        await self._send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"request-id", self._request_id.encode()),
                ],
            }
        )

    async def event(self, name: str, data: dict[str, Any]) -> None:
        frame = f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
        await self._send({"type": "http.response.body", "body": frame.encode(), "more_body": True})

    async def close(self) -> None:
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_json(
    send: Send, status: int, payload: dict[str, Any], headers: dict[str, str]
) -> None:
    body = json.dumps(payload, ensure_ascii=False).encode()
    raw_headers = [(b"content-type", b"application/json")]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw_headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _AbandonOnDisconnect(Response):
    """Runs a producer, cancelling it as soon as the client disconnects.

    Starlette's StreamingResponse only notices a disconnect on its next write under ASGI
    spec 2.4, which never comes while a Hold is waiting, so the producer would outlive its client.
    """

    def __init__(self, produce: Callable[[Send], Awaitable[None]]) -> None:
        super().__init__()
        self._produce = produce

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def watch_for_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch_for_disconnect)
            await self._produce(send)
            tg.cancel_scope.cancel()


class _ThreadedServer(uvicorn.Server):
    # Signal handlers belong to the test runner's main thread, never to a fake in a side thread.
    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:  # uvicorn >= 0.29
        yield


class FakeMessagesAPI:
    """Serves `POST /v1/messages` on loopback, answering each request with the next step."""

    def __init__(self, steps: Iterable[Step] = (), *, default: Step | None = None) -> None:
        self._steps: deque[Step] = deque(steps)
        self._default = default
        self._cond = threading.Condition()
        self.requests: list[dict[str, Any]] = []
        self.request_headers: list[dict[str, str]] = []
        # Exceptions raised by callable steps; the client only sees a 500, which code under
        # test might retry or swallow, so assert_complete reports them too.
        self.step_errors: list[BaseException] = []
        self._stopping = threading.Event()
        self._server: _ThreadedServer | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._port: int | None = None
        self._app = Starlette(routes=[Route("/v1/messages", self._handle, methods=["POST"])])

    # -- script ---------------------------------------------------------------------------

    def set_default(self, step: Step | None) -> None:
        """The answer to every request once the scripted steps run out (None: a 500)."""
        with self._cond:
            self._default = step

    def add(self, *steps: Step) -> None:
        with self._cond:
            self._steps.extend(steps)

    def remaining(self) -> int:
        with self._cond:
            return len(self._steps)

    def assert_complete(self) -> None:
        with self._cond:
            left = list(self._steps)
            errors = list(self.step_errors)
            received = len(self.requests)
        problems: list[str] = []
        if left:
            listed = "\n".join(f"  - {step!r}" for step in left)
            problems.append(
                f"{len(left)} unconsumed step(s) after {received} request(s):\n{listed}"
            )
        if errors:
            listed = "\n".join(f"  - {e!r}" for e in errors)
            problems.append(f"{len(errors)} callable step(s) raised:\n{listed}")
        if problems:
            raise AssertionError("FakeMessagesAPI: " + "\n".join(problems))

    def wait_for_requests(self, n: int, timeout: float = 10) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.requests) >= n, timeout=timeout):
                raise AssertionError(
                    f"FakeMessagesAPI: expected {n} request(s) within {timeout}s,"
                    f" got {len(self.requests)}"
                )

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("FakeMessagesAPI is not started")
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("FakeMessagesAPI is already started")
        self._stopping.clear()
        # Bound (and listening) before the server starts, so the port is ours with no race.
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
        # and without it every keep-alive reply waits ~40 ms for the client's delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            http="h11",
            ws="none",
            log_level="warning",
            access_log=False,
        )
        server = _ThreadedServer(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="FakeMessagesAPI", daemon=True
        )
        self._sock, self._server, self._thread = sock, server, thread
        self._port = sock.getsockname()[1]
        thread.start()
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("FakeMessagesAPI server did not start")
            time.sleep(0.005)

    def stop(self) -> None:
        server, thread, sock = self._server, self._thread, self._sock
        if server is None or thread is None:
            return
        # Pending Holds end their responses so uvicorn's graceful shutdown has nothing to wait on.
        self._stopping.set()
        server.should_exit = True
        thread.join(_JOIN_TIMEOUT)
        if thread.is_alive():
            server.force_exit = True
            thread.join(_JOIN_TIMEOUT)
        if sock is not None:
            sock.close()
        self._server = self._thread = self._sock = None
        if thread.is_alive():
            raise RuntimeError("FakeMessagesAPI server thread did not stop")

    def __enter__(self) -> FakeMessagesAPI:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- serving --------------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        request_id = _new_id("req_")
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return JSONResponse(
                _error_body("invalid_request_error", "FakeMessagesAPI: body is not a JSON object"),
                status_code=400,
                headers={"request-id": request_id},
            )
        with self._cond:
            self.requests.append(body)
            self.request_headers.append(dict(request.headers))
            number = len(self.requests)
            step = self._steps.popleft() if self._steps else self._default
            self._cond.notify_all()

        if step is None:
            return JSONResponse(
                _error_body("api_error", f"FakeMessagesAPI: script exhausted (request #{number})"),
                status_code=500,
                headers={"request-id": request_id},
            )
        if not isinstance(step, Reply | ErrorReply | Hold):
            try:
                step = step(body)
            except Exception as e:
                with self._cond:
                    self.step_errors.append(e)
                return JSONResponse(
                    _error_body("api_error", f"FakeMessagesAPI: step raised {e!r}"),
                    status_code=500,
                    headers={"request-id": request_id},
                )
            if not isinstance(step, Reply | ErrorReply | Hold):
                error = TypeError(f"callable step returned {step!r}")
                with self._cond:
                    self.step_errors.append(error)
                return JSONResponse(
                    _error_body("api_error", f"FakeMessagesAPI: {error}"),
                    status_code=500,
                    headers={"request-id": request_id},
                )

        streaming = body.get("stream") is True
        if isinstance(step, ErrorReply):
            return JSONResponse(
                _error_body(step.error_type, step.message),
                status_code=step.status,
                headers={"request-id": request_id, **step.headers},
            )
        if isinstance(step, Reply):
            if not streaming:
                return JSONResponse(
                    _message(step, body, step.content), headers={"request-id": request_id}
                )
            reply = step
            return _AbandonOnDisconnect(
                lambda send: self._stream_reply(_SSE(send, request_id), reply, body)
            )
        hold = step
        if streaming:
            return _AbandonOnDisconnect(
                lambda send: self._stream_hold(_SSE(send, request_id), hold, body)
            )
        return _AbandonOnDisconnect(lambda send: self._hold_json(send, request_id, hold, body))

    async def _stream_reply(self, sse: _SSE, reply: Reply, body: dict[str, Any]) -> None:
        await sse.open()
        await sse.event("message_start", _message_start(self._model(reply, body), _usage(reply)))
        await sse.event("ping", {"type": "ping"})
        for index, block in enumerate(reply.content):
            for name, data in _block_events(index, block):
                await sse.event(name, data)
        await sse.event("message_delta", _message_delta(reply))
        await sse.event("message_stop", {"type": "message_stop"})
        await sse.close()

    async def _stream_hold(self, sse: _SSE, hold: Hold, body: dict[str, Any]) -> None:
        then = hold.then or Reply(content=[])
        await sse.open()
        await sse.event("message_start", _message_start(self._model(then, body), _usage(then)))
        await sse.event("ping", {"type": "ping"})
        index = 0
        if hold.text_before:
            start = {"type": "text", "text": ""}
            await sse.event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": start},
            )
            delta = {"type": "text_delta", "text": hold.text_before}
            await sse.event(
                "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            )
            index = 1
        hold.started.set()
        if not await self._released(hold):
            # Mid-stream failures reach clients as an SSE error event, as with the real API.
            message = "FakeMessagesAPI stopped while a Hold was pending"
            await sse.event("error", _error_body("overloaded_error", message))
            await sse.close()
            return
        if hold.text_before:
            await sse.event("content_block_stop", {"type": "content_block_stop", "index": 0})
        for offset, block in enumerate(then.content):
            for name, data in _block_events(index + offset, block):
                await sse.event(name, data)
        await sse.event("message_delta", _message_delta(then))
        await sse.event("message_stop", {"type": "message_stop"})
        await sse.close()

    async def _hold_json(
        self, send: Send, request_id: str, hold: Hold, body: dict[str, Any]
    ) -> None:
        then = hold.then or Reply(content=[])
        hold.started.set()
        headers = {"request-id": request_id}
        if not await self._released(hold):
            message = "FakeMessagesAPI stopped while a Hold was pending"
            await _send_json(send, 500, _error_body("api_error", message), headers)
            return
        before = [{"type": "text", "text": hold.text_before}] if hold.text_before else []
        await _send_json(send, 200, _message(then, body, before + then.content), headers)

    async def _released(self, hold: Hold) -> bool:
        """Waits for the hold's release; False if the fake is stopping first."""
        # Polling keeps the event loop free and leaves no thread blocked on an Event that a
        # test may never set; a client disconnect cancels this sleep.
        while not hold.release.is_set():
            if self._stopping.is_set():
                return False
            await anyio.sleep(_HOLD_POLL_INTERVAL)
        return True

    @staticmethod
    def _model(reply: Reply, body: dict[str, Any]) -> str:
        return reply.model or body.get("model") or "claude-fake"
