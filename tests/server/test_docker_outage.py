"""The Docker daemon going away while sessions are open: clear errors, no hang, recovery."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from sandbox.docker import DockerBackend
from server.app import build_server, open_services
from server.settings import Settings
from tests.conftest import ToolCaller, model_for
from tests.fakes.messages_api import FakeMessagesAPI, text, tool_use
from tests.fakes.socket_relay import SocketRelay, daemon_socket
from tests.server.helpers import of_type, say, setup_session, wait_idle

pytestmark = [pytest.mark.asyncio, pytest.mark.docker]
AgentArgs = Callable[..., dict[str, Any]]


@contextlib.asynccontextmanager
async def server_behind(
    relay: SocketRelay, settings: Settings, fake_api: FakeMessagesAPI
) -> AsyncIterator[ToolCaller]:
    backend = DockerBackend(base_url=relay.url)
    async with (
        open_services(settings, backend=backend, model=model_for(fake_api)) as services,
        Client(build_server(settings, services=services)) as client,
    ):
        yield ToolCaller(client)


async def test_a_daemon_outage_mid_session_errors_clearly_and_the_session_recovers(
    settings: Settings, fake_api: FakeMessagesAPI, new_agent: AgentArgs, tmp_path: Path
) -> None:
    relay = SocketRelay(tmp_path / "docker.sock", daemon_socket())
    async with relay.running(), server_behind(relay, settings, fake_api) as mcp:
        session = await setup_session(mcp, new_agent())
        fake_api.add(tool_use("bash", {"command": "echo before > /workspace/kept"}), text("ok"))
        await say(mcp, session["id"], "Write a file.")
        answer, _ = await wait_idle(mcp, session["id"])

        # the daemon goes away: a tool call fails with a clear error, the turn still ends
        await relay.stop()
        fake_api.add(tool_use("bash", {"command": "echo during"}), text("It failed."))
        await say(mcp, session["id"], "Try again.")
        answer, events = await wait_idle(mcp, session["id"], after=answer["next_after"])
        assert answer["status"] == "idle"
        [result] = of_type(events, "agent.tool_result")
        assert result["is_error"]
        assert "lost the connection to the sandbox" in result["content"][0]["text"]
        # new sessions are refused with a reason, and nothing is left half-made
        error = await mcp.error(
            "start_session",
            {"agent": session["agent"]["id"], "environment_id": session["environment_id"]},
        )
        assert "docker" in error.lower()
        listed = await mcp("list_sessions", {})
        assert [s["id"] for s in listed["data"]] == [session["id"]]

        # the daemon is back: the same session works again, with its workspace
        await relay.start()
        fake_api.add(tool_use("bash", {"command": "cat /workspace/kept"}), text("Back."))
        await say(mcp, session["id"], "And now?")
        answer, events = await wait_idle(mcp, session["id"], after=answer["next_after"])
        [result] = of_type(events, "agent.tool_result")
        assert not result["is_error"], result
        output = result["content"][0]["text"]
        assert output.startswith("before\n")
        assert "this ran in a new shell" in output  # the agent is told its shell state was lost
