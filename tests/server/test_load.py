"""Load: 50 concurrent sessions of 20 scripted tool calls each against one stdio server.

All sessions must complete with every event stored once and in order. The figures (tool-call
turnaround p50/p99, the server's peak memory, wall time) are written to the JSON file named by
`MANAGED_AGENTS_LOAD_REPORT` when it is set; they are measurements, not assertions.

`MANAGED_AGENTS_LOAD_SESSIONS` and `MANAGED_AGENTS_LOAD_CALLS` change the shape (50 and 20).
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from tests.conftest import ToolCaller
from tests.fakes.messages_api import FakeMessagesAPI, Reply, text, tool_use
from tests.server.helpers import of_type, wait_idle
from tests.server.test_pool_and_recovery import server_pids
from tests.server.test_stdio import server_params

pytestmark = [pytest.mark.asyncio, pytest.mark.docker, pytest.mark.slow]
SESSIONS = int(os.environ.get("MANAGED_AGENTS_LOAD_SESSIONS", "50"))
CALLS = int(os.environ.get("MANAGED_AGENTS_LOAD_CALLS", "20"))


class ScriptedModel:
    """`CALLS` bash calls per conversation, then an answer; times the server's turnarounds.

    A turnaround is the time from the model answering with a tool call to the next request of
    that conversation: storing the events, running `true` in the sandbox, storing the result
    and building the next request.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answered: dict[str, float] = {}
        self.turnarounds: list[float] = []

    def __call__(self, body: dict[str, Any]) -> Reply:
        arrived = time.perf_counter()
        conversation = json.dumps(body["messages"][0]["content"])  # "session N" is unique
        done = sum(
            1
            for m in body["messages"]
            if isinstance(m["content"], list)
            for b in m["content"]
            if b.get("type") == "tool_result"
        )
        with self._lock:
            if conversation in self._answered:
                self.turnarounds.append(arrived - self._answered.pop(conversation))
            if done >= CALLS:
                return text("All done.")
            self._answered[conversation] = time.perf_counter()
        return tool_use("bash", {"command": "true"})


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def test_fifty_concurrent_sessions_of_twenty_tool_calls_all_complete_in_order(
    home: Path, fake_api: FakeMessagesAPI
) -> None:
    model = ScriptedModel()
    fake_api.set_default(model)
    params = server_params(home, fake_api)
    params.env = {**(params.env or {}), "MANAGED_AGENTS_WARM_POOL": "0"}
    no_network = {"networking": {"type": "limited", "allowed_hosts": []}}
    finished: dict[str, list[dict[str, Any]]] = {}
    started = time.perf_counter()
    async with Client(params) as client:
        mcp = ToolCaller(client)
        (pid,) = server_pids(home)
        agent = await mcp(
            "create_agent",
            {"name": "load", "model": "m", "tools": [{"type": "agent_toolset_20260401"}]},
        )
        env = await mcp("create_environment", {"name": "load", "config": no_network})

        async def one(number: int) -> None:
            session = await mcp(
                "start_session",
                {
                    "agent": agent["id"],
                    "environment_id": env["id"],
                    "initial_events": [{"type": "user.message", "content": f"session {number}"}],
                },
            )
            _, events = await wait_idle(mcp, session["id"], limit=600)
            finished[session["id"]] = events

        with anyio.fail_after(900):
            async with anyio.create_task_group() as group:
                for number in range(SESSIONS):
                    group.start_soon(one, number)
        wall = time.perf_counter() - started
        peak = _peak_rss_mib(pid)

    assert len(finished) == SESSIONS
    for session_id, events in finished.items():
        ids = [e["id"] for e in events]
        assert ids == sorted(ids), f"{session_id}: events out of order"
        assert len(ids) == len(set(ids)), f"{session_id}: an event twice"
        results = of_type(events, "agent.tool_result")
        assert len(results) == CALLS, f"{session_id}: {len(results)} tool results"
        assert not any(r["is_error"] for r in results)
        assert [m["content"][0]["text"] for m in of_type(events, "agent.message")] == ["All done."]

    turnarounds = sorted(model.turnarounds)
    figures = {
        "sessions": SESSIONS,
        "tool_calls_per_session": CALLS,
        "tool_calls": len(turnarounds),
        "turnaround_p50_ms": round(statistics.median(turnarounds) * 1000, 1),
        "turnaround_p99_ms": round(turnarounds[int(len(turnarounds) * 0.99) - 1] * 1000, 1),
        "server_peak_rss_mib": round(peak, 1),
        "wall_s": round(wall, 1),
    }
    report = os.environ.get("MANAGED_AGENTS_LOAD_REPORT")
    if report:
        await anyio.Path(report).write_text(json.dumps(figures, indent=2) + "\n")
