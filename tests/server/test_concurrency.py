"""Several clients sending to one session at once: every event stored once, in one order."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from server.settings import Settings
from tests.conftest import OpenMCP, ToolCaller
from tests.fakes.messages_api import FakeMessagesAPI, text
from tests.server.helpers import of_type, setup_session, wait_idle
from tests.server.http_server import http_server
from tests.server.test_pool_and_recovery import container_names

pytestmark = [pytest.mark.asyncio, pytest.mark.docker]
AgentArgs = Callable[..., dict[str, Any]]
CLIENTS = 5
SENDS_PER_CLIENT = 10


def _user_texts(request: dict[str, Any]) -> list[str]:
    """The user-message texts of a Messages API request, in the order the model reads them."""
    texts: list[str] = []
    for message in request["messages"]:
        if message["role"] != "user" or isinstance(message["content"], str):
            continue
        texts += [b["text"] for b in message["content"] if b.get("type") == "text"]
    return texts


async def test_concurrent_sends_from_several_clients_are_serialised_without_loss(
    settings: Settings, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    fake_api.set_default(text("Noted."))
    sent = [f"message {c}-{n}" for c in range(CLIENTS) for n in range(SENDS_PER_CLIENT)]
    acknowledged: list[str] = []
    async with http_server(settings, fake_api) as server:

        async def client(number: int, session_id: str) -> None:
            async with (
                httpx2.AsyncClient(headers=server.headers(), timeout=60) as http,
                Client(streamable_http_client(f"{server.url}/mcp", http_client=http)) as session,
            ):
                mcp = ToolCaller(session)
                async with anyio.create_task_group() as sends:
                    for n in range(SENDS_PER_CLIENT):
                        sends.start_soon(send, mcp, session_id, f"message {number}-{n}")

        async def send(mcp: ToolCaller, session_id: str, content: str) -> None:
            event = {"type": "user.message", "content": content}
            result = await mcp("send_event", {"session_id": session_id, "event": event})
            acknowledged.append(result["data"][0]["id"])

        async with (
            httpx2.AsyncClient(headers=server.headers()) as http,
            Client(streamable_http_client(f"{server.url}/mcp", http_client=http)) as first,
        ):
            mcp = ToolCaller(first)
            session = await setup_session(mcp, new_agent())
            with anyio.fail_after(120):
                async with anyio.create_task_group() as clients:
                    for number in range(CLIENTS):
                        clients.start_soon(client, number, session["id"])
            # the turn that answers the last message may still be running: wait it out
            with anyio.fail_after(60):
                while True:
                    _, events = await wait_idle(mcp, session["id"])
                    messages = of_type(events, "user.message")
                    if all(m.get("processed_at") for m in messages):
                        break

    # every acknowledged event is stored exactly once
    assert len(acknowledged) == len(set(acknowledged)) == len(sent)
    stored = [m["content"][0]["text"] for m in messages]
    assert sorted(stored) == sorted(sent)
    assert sorted(m["id"] for m in messages) == sorted(acknowledged)
    # ...in one total order, which is the order of their ids
    ids = [e["id"] for e in events]
    assert ids == sorted(ids)
    # at most one turn at a time: running and idle strictly alternate
    statuses = [e["type"] for e in events if e["type"].startswith("session.status_")]
    assert statuses
    for before, after in zip(statuses, statuses[1:], strict=False):
        assert before != after, f"two {before} in a row: {statuses}"
    # the model read the messages in that same order
    assert _user_texts(fake_api.requests[-1]) == stored


async def test_repeated_start_session_with_one_key_makes_one_session_and_container(
    open_mcp: OpenMCP, new_agent: AgentArgs, home: Path
) -> None:
    async with open_mcp() as mcp:
        agent = await mcp("create_agent", new_agent(idempotency_key="agent-1"))
        again = await mcp("create_agent", new_agent(idempotency_key="agent-1"))
        assert again["id"] == agent["id"]
        no_network = {"networking": {"type": "limited", "allowed_hosts": []}}
        env = await mcp("create_environment", {"name": "keyed", "config": no_network})
        args = {"agent": agent["id"], "environment_id": env["id"], "idempotency_key": "run-7"}
        ids: list[str] = []

        async def start() -> None:
            ids.append((await mcp("start_session", args))["id"])

        with anyio.fail_after(120):
            async with anyio.create_task_group() as group:
                for _ in range(20):
                    group.start_soon(start)
        assert len(set(ids)) == 1
        listed = await mcp("list_sessions", {})
        assert [s["id"] for s in listed["data"]] == [ids[0]]
        assert container_names(home) == {f"ma-{ids[0]}"}

        error = await mcp.error("start_session", {**args, "title": "something else"})
        assert "different parameters" in error
        assert len((await mcp("list_sessions", {}))["data"]) == 1


async def test_a_retried_run_task_waits_on_the_first_task_instead_of_starting_another(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI
) -> None:
    fake_api.add(text("First and only answer."))
    args = {"prompt": "Say hi.", "wait_s": 30, "idempotency_key": "task-1"}
    async with open_mcp() as mcp:
        first = await mcp("run_task", args)
        retried = await mcp("run_task", args)
    assert retried["session_id"] == first["session_id"]
    assert retried["answer"] == first["answer"] == "First and only answer."
    assert len(fake_api.requests) == 1
