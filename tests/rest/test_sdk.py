"""Code written for the hosted API runs unchanged through the official SDK against this server."""

from __future__ import annotations

import os
import sys
from typing import Any

import anthropic
import anyio
import pytest

from server.settings import Settings
from tests.fakes.messages_api import FakeMessagesAPI, text, tool_use
from tests.rest.helpers import EXAMPLE, ROOT, async_client, load_example, sync_client
from tests.server.http_server import http_server

pytestmark = [pytest.mark.asyncio, pytest.mark.docker]

COUNT_ROWS = (
    "n=$(($(wc -l < /mnt/session/uploads/data/input.csv) - 1)); "
    'echo "rows: $n" > /mnt/session/outputs/summary.txt; cat /mnt/session/outputs/summary.txt'
)


def script_the_model(fake_api: FakeMessagesAPI) -> None:
    """What a model would do with the example's task."""
    fake_api.add(
        tool_use("bash", {"command": COUNT_ROWS}, text="Counting."),
        text("There are 3 data rows; the count is in summary.txt."),
    )


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


async def test_the_hosted_quickstart_flow_runs_through_the_sdk(
    settings: Settings, fake_api: FakeMessagesAPI
) -> None:
    script_the_model(fake_api)
    example = load_example()
    async with http_server(settings, fake_api) as server:
        # The SDK's sync client, as the example uses it, in a worker thread: this event loop
        # serves the requests.
        with sync_client(server) as client:
            outcome = await anyio.to_thread.run_sync(example.run, client)

        # The agent was updated once: two versions, newest first.
        assert outcome.agent_versions == [2, 1]

        # The stream: the message echoed when queued, then again once processed; the
        # turn in order; nothing from before the stream opened.
        streamed = outcome.streamed
        kinds = [e["type"] for e in streamed]
        assert kinds[0] == "user.message"
        assert streamed[0]["processed_at"] is None
        echoes = of_type(streamed, "user.message")
        assert len(echoes) == 2
        assert echoes[0]["id"] == echoes[1]["id"]
        assert echoes[1]["processed_at"] is not None
        assert kinds[-2:] == ["session.usage", "session.status_idle"]
        assert streamed[-1]["stop_reason"] == {"type": "end_turn"}
        order = [
            "session.status_running",
            "span.model_request_start",
            "agent.message",
            "agent.tool_use",
            "agent.tool_result",
        ]
        positions = [kinds.index(kind) for kind in order]
        assert positions == sorted(positions), kinds
        assert kinds.index("agent.tool_result") < len(kinds) - 1 - kinds[::-1].index(
            "agent.message"
        )
        result = of_type(streamed, "agent.tool_result")[0]
        assert result["content"][0]["text"] == "rows: 3\n"
        assert outcome.reply == "There are 3 data rows; the count is in summary.txt."

        # The history holds what was streamed (once each), in the same order.
        history_ids = [e["id"] for e in outcome.history]
        assert len(history_ids) == len(set(history_ids))
        streamed_ids = list(dict.fromkeys(e["id"] for e in streamed))
        assert [i for i in history_ids if i in streamed_ids] == streamed_ids
        assert all(e["processed_at"] is not None for e in outcome.history)

        # The output file came back through the Files API.
        assert outcome.outputs == {"summary.txt": b"rows: 3\n"}

        # Archived and deleted: the session is gone, the agent read-only.
        async with async_client(server) as check:
            sessions = await check.beta.sessions.list(include_archived=True)
            assert sessions.data == []
            assert sessions.prev_page is None
            agents = (await check.beta.agents.list(include_archived=True)).data
            assert [a.name for a in agents] == ["migration-example"]
            assert agents[0].archived_at is not None
            assert (await check.beta.agents.list()).data == []
            with pytest.raises(anthropic.ConflictError):
                await check.beta.agents.update(agents[0].id, system="nope")
            assert (await check.beta.environments.list(include_archived=True)).data == []
            assert (await check.beta.files.list()).data == []
    fake_api.assert_complete()


async def test_the_migration_example_runs_as_a_script(
    settings: Settings, fake_api: FakeMessagesAPI
) -> None:
    script_the_model(fake_api)
    async with http_server(settings, fake_api) as server:
        assert server.token is not None
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", ""),
            "MANAGED_AGENTS_URL": server.url,
            "MANAGED_AGENTS_TOKEN": server.token,
        }
        with anyio.fail_after(120):
            result = await anyio.run_process(
                [sys.executable, str(EXAMPLE)], env=env, cwd=ROOT, check=False
            )
    output = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert "agent versions: [2, 1]" in output
    assert "reply: There are 3 data rows" in output
    assert "output summary.txt: rows: 3" in output
    fake_api.assert_complete()
