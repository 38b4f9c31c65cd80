"""kill -9 the server at random points, over and over: nothing acknowledged is lost.

Each cycle starts a stdio server on the same data dir, checks what the previous one left,
sends work (a tool call that appends its id to a log in the workspace, behind a model reply
that streams for a random time), and kills the server at a random moment. The checks: every
acknowledged event is stored, in the order it was acknowledged; no session is left running;
every tool call has exactly one result and none ran twice; no container is left that belongs
to no session.

`MANAGED_AGENTS_CRASH_CYCLES` sets the number of cycles (default 12; the full run is 100).
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from tests.conftest import ToolCaller
from tests.fakes.messages_api import FakeMessagesAPI, Hold, Reply, text, tool_use
from tests.server.helpers import poll_until
from tests.server.test_pool_and_recovery import container_names, server_pids
from tests.server.test_stdio import server_params

pytestmark = [pytest.mark.asyncio, pytest.mark.docker, pytest.mark.slow]
CYCLES = int(os.environ.get("MANAGED_AGENTS_CRASH_CYCLES", "12"))
SESSIONS = 3


class SlowModel:
    """Asks for one bash call per user message, then answers; each reply streams for a while."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._timers: list[threading.Timer] = []

    def __call__(self, body: dict[str, Any]) -> Hold:
        last = body["messages"][-1]
        blocks = last["content"] if isinstance(last["content"], list) else []
        answered_tool = any(b.get("type") == "tool_result" for b in blocks)
        if answered_tool:
            reply: Reply = text("Logged.")
        else:
            nap = self._rng.choice(["0", "0.2", "0.5"])
            command = f'echo "$MA_TOOL_ID" >> /workspace/log; sleep {nap}'
            reply = tool_use("bash", {"command": command})
            tool_id = reply.content[-1]["id"]
            reply.content[-1]["input"]["command"] = command.replace("$MA_TOOL_ID", tool_id)
        hold = Hold(text_before="streaming...", then=reply)
        timer = threading.Timer(self._rng.uniform(0, 0.4), hold.release.set)
        timer.daemon = True
        timer.start()
        self._timers.append(timer)
        return hold

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()


async def _all_events(mcp: ToolCaller, session_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    page: str | None = None
    while True:
        args: dict[str, Any] = {"session_id": session_id, "limit": 1000}
        if page:
            args["page"] = page
        listed = await mcp("list_events", args)
        events += listed["data"]
        page = listed.get("next_page")
        if not page:
            return events


async def _check(
    mcp: ToolCaller, home: Path, sessions: list[str], acknowledged: dict[str, list[str]]
) -> None:
    """What a restarted server must show, whatever moment the last one died at."""

    async def settled() -> bool:
        listed = await mcp("list_sessions", {"limit": 100})
        return all(s["status"] == "idle" for s in listed["data"])

    with anyio.fail_after(60):
        while not await settled():  # noqa: ASYNC110 - recovery and queued turns end on their own
            await anyio.sleep(0.1)

    for session_id in sessions:
        events = await _all_events(mcp, session_id)
        ids = [e["id"] for e in events]
        assert ids == sorted(ids), "events out of order"
        assert len(ids) == len(set(ids)), "an event stored twice"
        stored = [e["id"] for e in events if e["type"] == "user.message"]
        assert stored == acknowledged[session_id], "an acknowledged message was lost or moved"
        uses = [e["id"] for e in events if e["type"] == "agent.tool_use"]
        results = Counter(e["tool_use_id"] for e in events if e["type"] == "agent.tool_result")
        assert all(results[u] == 1 for u in uses), "a tool call without exactly one result"

    await poll_until(lambda: container_names(home) <= {f"ma-{s}" for s in sessions}, limit=30)


async def test_kill_9_at_random_points_loses_nothing_and_never_reruns_a_tool(
    home: Path, fake_api: FakeMessagesAPI
) -> None:
    rng = random.Random(int(os.environ.get("MANAGED_AGENTS_CRASH_SEED", "7")))
    model = SlowModel(rng)
    fake_api.set_default(model)
    params = server_params(home, fake_api)
    params.env = {**(params.env or {}), "MANAGED_AGENTS_WARM_POOL": "0"}
    sessions: list[str] = []
    acknowledged: dict[str, list[str]] = {}
    kills_mid_turn = 0
    try:
        for cycle in range(CYCLES):
            try:
                async with Client(params) as client:
                    mcp = ToolCaller(client)
                    await _check(mcp, home, sessions, acknowledged)
                    if len(sessions) < SESSIONS:
                        sessions.append(await _new_session(mcp, cycle))
                        acknowledged[sessions[-1]] = []
                    for session_id in rng.sample(sessions, rng.randint(1, len(sessions))):
                        event = {"type": "user.message", "content": f"cycle {cycle}"}
                        sent = await mcp("send_event", {"session_id": session_id, "event": event})
                        acknowledged[session_id].append(sent["data"][0]["id"])
                    await anyio.sleep(rng.uniform(0, 1.2))  # the random kill point
                    listed = await mcp("list_sessions", {"limit": 100})
                    kills_mid_turn += any(s["status"] == "running" for s in listed["data"])
                    (pid,) = server_pids(home)
                    os.kill(pid, signal.SIGKILL)
            except* (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # the client notices its server died

        async with Client(params) as client:
            mcp = ToolCaller(client)
            await _check(mcp, home, sessions, acknowledged)
            for session_id in sessions:
                events = await _all_events(mcp, session_id)
                ran = [
                    e for e in events if e["type"] == "agent.tool_result" and not e.get("is_error")
                ]
                read = await client.call_tool(
                    "read_file", {"session_id": session_id, "path": "log"}
                )
                if read.is_error:
                    # Every turn of this session died before a command wrote the log.
                    assert not ran, f"{len(ran)} tool calls succeeded but wrote no log"
                    continue
                log = read.structured_content or {}
                lines = [line for line in log["content"].splitlines() if line]
                assert len(lines) >= len(ran), "a tool call that succeeded is missing from the log"
                repeated = [t for t, n in Counter(lines).items() if n > 1]
                assert not repeated, f"tool calls ran twice: {repeated}"
    finally:
        model.stop()
    assert kills_mid_turn > 0, "no kill landed during a turn: the test proved nothing"


async def _new_session(mcp: ToolCaller, cycle: int) -> str:
    agent = await mcp(
        "create_agent",
        {
            "name": f"crash-{cycle}",
            "model": "claude-sonnet-4-6",
            "tools": [{"type": "agent_toolset_20260401"}],
        },
    )
    no_network = {"networking": {"type": "limited", "allowed_hosts": []}}
    env = await mcp("create_environment", {"name": f"crash-{cycle}", "config": no_network})
    session = await mcp("start_session", {"agent": agent["id"], "environment_id": env["id"]})
    return str(session["id"])
