"""The real `managed-agents-mcp serve` over stdio: a whole delegated conversation."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters

from tests.conftest import IMAGE, ToolCaller
from tests.fakes.messages_api import FakeMessagesAPI, text, tool_use
from tests.server.helpers import of_type, say, setup_session, wait_for_event, wait_idle

pytestmark = [pytest.mark.asyncio, pytest.mark.docker]


def server_params(home: Path, fake: FakeMessagesAPI) -> StdioServerParameters:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", str(home)),
        "MANAGED_AGENTS_HOME": str(home),
        "MANAGED_AGENTS_IMAGE": IMAGE,
        "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": fake.url,
        "MANAGED_AGENTS_RETRY_DELAY": "0.01",
    }
    if os.environ.get("DOCKER_HOST"):
        env["DOCKER_HOST"] = os.environ["DOCKER_HOST"]
    return StdioServerParameters(
        command=sys.executable, args=["-m", "server", "serve"], env=env, cwd=os.getcwd()
    )


async def test_delegated_conversation_over_stdio(home: Path, fake_api: FakeMessagesAPI) -> None:
    """bash → output → answer; the file is readable; turn two sees it; an interrupt of
    `sleep 120` brings the session back to idle within seconds."""
    fake_api.add(
        tool_use("bash", {"command": "echo 42 > /workspace/answer.txt && cat answer.txt"}),
        text("The answer is in answer.txt."),
        tool_use("bash", {"command": "cat /workspace/answer.txt"}),
        text("It still says 42."),
        tool_use("bash", {"command": "sleep 120"}),
    )
    agent_args: dict[str, Any] = {
        "name": "stdio-worker",
        "model": "claude-sonnet-4-6",
        "tools": [{"type": "agent_toolset_20260401"}],
    }
    async with Client(server_params(home, fake_api)) as client:
        mcp = ToolCaller(client)
        tools = {t.name for t in (await client.list_tools()).tools}
        assert {"start_session", "send_event", "wait_for_session", "read_file"} <= tools

        session = await setup_session(mcp, agent_args)
        await say(mcp, session["id"], "Compute the answer.")
        first, events = await wait_idle(mcp, session["id"])
        assert of_type(events, "agent.tool_result")[0]["content"][0]["text"] == "42\n"
        assert of_type(events, "agent.message")[-1]["content"][0]["text"].startswith("The answer")
        file = await mcp("read_file", {"session_id": session["id"], "path": "answer.txt"})
        assert file["content"] == "42\n"

        await say(mcp, session["id"], "Is it still there?")
        second, events = await wait_idle(mcp, session["id"], after=first["next_after"])
        assert of_type(events, "agent.tool_result")[0]["content"][0]["text"] == "42\n"

        await say(mcp, session["id"], "Now wait a long time.")
        await wait_for_event(mcp, session["id"], "agent.tool_use")
        with anyio.fail_after(20):
            await mcp(
                "send_event", {"session_id": session["id"], "event": {"type": "user.interrupt"}}
            )
            answer, _ = await wait_idle(mcp, session["id"], after=second["next_after"])
        assert answer["status"] == "idle"
    fake_api.assert_complete()
