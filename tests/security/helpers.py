"""Plumbing for the security tests: a routing fake model, sessions driven by scripted bash calls,
the real HTTP transport over any sandbox backend, loopback canaries and process measurements."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import shutil
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from mcp import Client

from sandbox.base import SandboxBackend
from server.app import Services, build_server, open_services
from server.http import build_http_app, load_token
from server.rest import end_streams, routes
from server.runner.model import ModelClient
from server.settings import Settings
from tests.conftest import ToolCaller
from tests.fakes.messages_api import FakeMessagesAPI, Reply, text, tool_use
from tests.server.helpers import of_type, say, wait_idle

# ---------------------------------------------------------------------------- the fake model


def route_request(request: dict[str, Any]) -> Reply:
    """The model's answer, read off the conversation: a user message holding
    `{"bash": {...}}` gets exactly that bash call; a tool result ends the turn.

    Being a pure function of the request, it serves any number of concurrent sessions."""
    messages = request.get("messages") or []
    content = messages[-1].get("content") if messages else None
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
    if any(b.get("type") == "tool_result" for b in blocks):
        return text("done")
    for block in reversed(blocks):
        if block.get("type") != "text":
            continue
        try:
            order = json.loads(block.get("text") or "")
        except ValueError:
            continue
        if isinstance(order, dict) and isinstance(order.get("bash"), dict):
            return tool_use("bash", order["bash"])
    return text("nothing to do")


def routing_fake(fake: FakeMessagesAPI) -> FakeMessagesAPI:
    fake.set_default(route_request)
    return fake


# ---------------------------------------------------------------------------- sessions


@dataclass
class ToolRun:
    """One scripted bash call: the tool result as stored (`text`, unclipped) and the events the
    MCP client saw (where oversized strings are clipped to fit one tool result)."""

    text: str
    is_error: bool
    events: list[dict[str, Any]]
    stored_bytes: int
    """Size of the stored tool_result event (JSON)."""
    mcp_event_chars: int
    """Size of the same event as wait_for_session returned it (JSON)."""


@dataclass
class Session:
    """A session driven one bash call per user message."""

    mcp: ToolCaller
    services: Services
    id: str
    cursor: str | None = None

    async def bash(
        self, command: str, *, timeout_ms: int | None = None, limit: float = 120
    ) -> ToolRun:
        order: dict[str, Any] = {"command": command}
        if timeout_ms is not None:
            order["timeout_ms"] = timeout_ms
        await say(self.mcp, self.id, json.dumps({"bash": order}))
        answer, events = await wait_idle(self.mcp, self.id, after=self.cursor, limit=limit)
        self.cursor = answer["next_after"]
        seen = of_type(events, "agent.tool_result")
        assert len(seen) == 1, f"expected one tool result, got {events}"
        page = await self.services.sessions.list_events(
            self.id, limit=1, order="desc", types=["agent.tool_result"]
        )
        stored = page.data[0]
        assert stored["id"] == seen[0]["id"]
        texts = [c.get("text", "") for c in stored.get("content") or [] if c.get("type") == "text"]
        return ToolRun(
            "\n".join(texts),
            bool(stored.get("is_error")),
            events,
            len(json.dumps(stored)),
            len(json.dumps(seen[0])),
        )


async def new_environment(
    mcp: ToolCaller, name: str, networking: dict[str, Any], limits: dict[str, Any] | None = None
) -> str:
    config: dict[str, Any] = {"networking": networking}
    if limits:
        config["limits"] = limits
    env = await mcp("create_environment", {"name": name, "config": config})
    return str(env["id"])


async def new_session(
    mcp: ToolCaller, services: Services, agent_id: str, environment_id: str
) -> Session:
    session = await mcp("start_session", {"agent": agent_id, "environment_id": environment_id})
    return Session(mcp, services, str(session["id"]))


async def new_agent(mcp: ToolCaller) -> str:
    agent = await mcp(
        "create_agent",
        {
            "name": "prober",
            "model": "claude-sonnet-4-6",
            "tools": [{"type": "agent_toolset_20260401"}],
        },
    )
    return str(agent["id"])


# ---------------------------------------------------------------------------- the server


@dataclass(frozen=True, slots=True)
class RunningServer:
    services: Services
    port: int
    token: str
    mcp: ToolCaller


class _Uvicorn(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test process owns signals
        return

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def shutdown(self, sockets: Any = None) -> None:
        end_streams(self.config.app)  # type: ignore[arg-type]
        await super().shutdown(sockets)


@contextlib.asynccontextmanager
async def serve(
    settings: Settings, backend: SandboxBackend, model: ModelClient | None
) -> AsyncIterator[RunningServer]:
    """The server as `serve --transport http` runs it (token in `<home>/token`, loopback port),
    over `backend`, plus an in-process MCP client on the same services to drive it."""
    token = load_token(settings.home, settings.token)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    try:
        async with open_services(settings, backend=backend, model=model) as services:
            mcp_server = build_server(settings, services=services)
            app = build_http_app(
                build_server(settings, services=services), token=token, routes=routes(services)
            )
            server = _Uvicorn(uvicorn.Config(app, log_config=None, lifespan="on"))
            async with anyio.create_task_group() as group:
                group.start_soon(server.serve, [sock])
                with anyio.fail_after(20):
                    while not server.started:  # noqa: ASYNC110 - uvicorn exposes only a flag
                        await anyio.sleep(0.01)
                try:
                    async with Client(mcp_server) as client:
                        yield RunningServer(services, port, token, ToolCaller(client))
                finally:
                    server.should_exit = True
    finally:
        sock.close()


# ---------------------------------------------------------------------------- the host


def host_addresses() -> list[str]:
    """This host's own unicast addresses (IPv4 from fib_trie, global IPv6 from if_inet6)."""
    found: set[str] = set()
    with contextlib.suppress(OSError):
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
        for before, line in zip(lines, lines[1:], strict=False):
            if "/32 host LOCAL" in line:
                address = before.strip().split()[-1]
                if not address.startswith("127."):
                    found.add(address)
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            raw = line.split()[0]
            ip = ipaddress.IPv6Address(int(raw, 16))
            if not (ip.is_loopback or ip.is_link_local):
                found.add(str(ip))
    return sorted(found)


def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class Canary:
    """TCP listeners on 0.0.0.0 and [::] (one port) that count every connection they get.

    A host service bound to all interfaces is the case Docker's own networks do not protect."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        v4.bind(("0.0.0.0", 0))
        self.port = v4.getsockname()[1]
        self._socks.append(v4)
        with contextlib.suppress(OSError):
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                v6.bind(("::", self.port))
            except OSError:
                v6.close()
                raise
            self._socks.append(v6)

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, peer = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.hits.append(str(peer))
            conn.close()

    def __enter__(self) -> Canary:
        for sock in self._socks:
            sock.listen(16)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        for sock in self._socks:
            sock.close()


def rss_kib() -> int:
    """This process's resident set size (the in-process server's), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> None:
    """Start a new VmHWM (peak RSS) measurement for this process (the in-process server)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_kib() -> int:
    """Peak resident set size since `reset_peak_rss()`, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/self/status")


@contextlib.contextmanager
def bwrap_state_root() -> Iterator[Path]:
    """A scratch state root the sandbox uid can traverse (removed afterwards)."""
    parent = Path(tempfile.mkdtemp(prefix="ma-bwrap-security-"))
    parent.chmod(0o711)
    try:
        yield parent / "state"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def traversable_home() -> Path:
    """A data dir under a 0711 parent: the bubblewrap sandbox user must reach the egress socket
    directory inside it (the data dir itself stays 0700 and is never mounted)."""
    parent = Path(tempfile.mkdtemp(prefix="ma-security-home-"))
    parent.chmod(0o711)
    home = parent / "home"
    home.mkdir()
    return home


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
