"""Warm pool hand-out and replacement; a killed server restarts without orphans or lost work."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest
from mcp import Client

from tests.conftest import OpenMCP, ToolCaller, home_label
from tests.fakes.messages_api import FakeMessagesAPI, Hold, text, tool_use
from tests.server.helpers import of_type, poll_until, say, wait_idle
from tests.server.test_stdio import server_params

pytestmark = [pytest.mark.asyncio, pytest.mark.docker]
AgentArgs = Callable[..., dict[str, Any]]


def container_names(home: Path) -> set[str]:
    """Names of the containers the server made for this data dir (Docker's list, no inspect:
    the pool changes under our feet)."""
    client = docker.from_env()
    try:
        summaries = client.api.containers(
            all=True, filters={"label": f"managed-agents-mcp.home={home_label(home)}"}
        )
        return {s["Names"][0].lstrip("/") for s in summaries}
    finally:
        client.close()


def inspect(name: str) -> dict[str, Any]:
    client = docker.from_env()
    try:
        return client.api.inspect_container(name)
    finally:
        client.close()


def pool_names(home: Path) -> set[str]:
    return {n for n in container_names(home) if n.startswith("ma-pool-")}


async def test_the_warm_pool_hands_out_a_ready_container_and_refills(
    open_mcp: OpenMCP, new_agent: AgentArgs, home: Path
) -> None:
    async with open_mcp(warm_pool=1) as mcp:
        agent = await mcp("create_agent", new_agent())
        env = await mcp(
            "create_environment",
            {"name": "pooled", "config": {"networking": {"type": "limited", "allowed_hosts": []}}},
        )
        await poll_until(lambda: len(pool_names(home)) == 1)
        (pooled,) = pool_names(home)
        pooled_id = inspect(pooled)["Id"]

        session = await mcp("start_session", {"agent": agent["id"], "environment_id": env["id"]})
        assert inspect(f"ma-{session['id']}")["Id"] == pooled_id
        await poll_until(lambda: len(pool_names(home)) == 1 and pooled not in pool_names(home))

        # Changing the environment replaces its pool.
        (old,) = pool_names(home)
        await mcp(
            "update_environment",
            {
                "environment_id": env["id"],
                "config": {
                    "networking": {"type": "limited", "allowed_hosts": []},
                    "limits": {"pids": 99},
                },
            },
        )
        await poll_until(lambda: len(pool_names(home)) == 1 and old not in pool_names(home))
        (fresh,) = pool_names(home)
        assert inspect(fresh)["HostConfig"]["PidsLimit"] == 99
    # Clean shutdown removes the pool and stops (keeps) the session's container.
    assert container_names(home) == {f"ma-{session['id']}"}
    assert inspect(f"ma-{session['id']}")["State"]["Running"] is False


def server_pids(home: Path) -> set[int]:
    """PIDs of the servers using this data dir (each holds a lock file with its pid)."""
    return {int(p.read_text()) for p in (home / "instances").glob("*.lock") if p.read_text()}


async def test_a_killed_server_restarts_without_orphans_or_stuck_sessions(
    home: Path, fake_api: FakeMessagesAPI
) -> None:
    """kill -9 in the middle of a model stream: the next server finishes the job cleanly."""
    hold = Hold(text_before="thinking...")
    fake_api.add(
        tool_use("bash", {"command": "echo kept > /workspace/kept.txt"}),
        text("Wrote it."),
        hold,
        tool_use("bash", {"command": "cat /workspace/kept.txt"}),
        text("Still there."),
    )
    params = server_params(home, fake_api)
    params.env = {**(params.env or {}), "MANAGED_AGENTS_WARM_POOL": "1"}
    agent_args = {
        "name": "crashy",
        "model": "claude-sonnet-4-6",
        "tools": [{"type": "agent_toolset_20260401"}],
    }
    no_network = {"networking": {"type": "limited", "allowed_hosts": []}}
    session: dict[str, Any] = {}
    try:
        async with Client(params) as client:
            mcp = ToolCaller(client)
            agent = await mcp("create_agent", agent_args)
            env = await mcp("create_environment", {"name": "e", "config": no_network})
            session = await mcp(
                "start_session", {"agent": agent["id"], "environment_id": env["id"]}
            )
            await say(mcp, session["id"], "Write a file.")
            await wait_idle(mcp, session["id"])
            await say(mcp, session["id"], "Think hard.")
            with anyio.fail_after(30):
                await anyio.to_thread.run_sync(hold.started.wait)
            await poll_until(lambda: len(pool_names(home)) == 1)
            (pid,) = server_pids(home)
            os.kill(pid, signal.SIGKILL)
    except* (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass  # the client notices its server died
    finally:
        hold.release.set()

    # A new server on the same data dir: no orphan, the turn is closed, the session goes on.
    async with Client(params) as client:
        mcp = ToolCaller(client)
        await poll_until(lambda: not pool_names(home))
        assert container_names(home) == {f"ma-{session['id']}"}
        record = await mcp("get_session", {"session_id": session["id"]})
        assert record["status"] == "idle"
        listed = await mcp("list_events", {"session_id": session["id"], "limit": 1000})
        kinds = [e["type"] for e in listed["data"]]
        assert kinds[-3:] == ["session.error", "session.usage", "session.status_idle"]
        error = of_type(listed["data"], "session.error")[-1]["error"]
        assert error["retry_status"] == {"type": "exhausted"}
        await say(mcp, session["id"], "Is the file still there?")
        _, events = await wait_idle(mcp, session["id"], after=listed["data"][-1]["id"])
        assert of_type(events, "agent.tool_result")[0]["content"][0]["text"] == "kept\n"
