"""The SSE event stream: hosted framing, previews, no replay, and how it ends."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import anyio
import httpx2
import pytest

from server.settings import Settings
from tests.fakes.messages_api import FakeMessagesAPI, text
from tests.rest.helpers import async_client, new_session, read_turn, user_message
from tests.server.http_server import http_server

pytestmark = [pytest.mark.asyncio, pytest.mark.docker]


async def test_event_deltas_preview_the_agent_message_before_it_arrives(
    settings: Settings, fake_api: FakeMessagesAPI
) -> None:
    answer = "A fairly long answer, streamed in several pieces."
    fake_api.add(text(answer))
    async with http_server(settings, fake_api) as server, async_client(server) as client:
        session = await new_session(client, "previews")
        async with await client.beta.sessions.events.stream(
            session.id, event_deltas=["agent.message"]
        ) as stream:
            await client.beta.sessions.events.send(session.id, events=[user_message("Go.")])
            events = await read_turn(stream)
        history = [e.type async for e in client.beta.sessions.events.list(session.id)]
    kinds = [e.type for e in events]
    message = next(e for e in events if e.type == "agent.message")
    starts = [e for e in events if e.type == "event_start"]
    deltas = [e for e in events if e.type == "event_delta"]
    assert [s.event.id for s in starts] == [message.id]
    assert starts[0].event.type == "agent.message"
    assert len(deltas) >= 2, kinds
    assert {d.event_id for d in deltas} == {message.id}
    assert kinds.index("event_start") < kinds.index("event_delta")
    assert max(i for i, k in enumerate(kinds) if k == "event_delta") < kinds.index("agent.message")
    assert "".join(d.delta.content.text for d in deltas) == answer
    assert message.content[0].text == answer
    # Previews are not events: no id, no processed_at, never in the history.
    raw_start = starts[0].to_dict()
    assert "id" not in raw_start
    assert "processed_at" not in raw_start
    assert "event_start" not in history
    assert "event_delta" not in history


async def test_streams_do_not_replay_and_end_when_the_session_is_deleted(
    settings: Settings, fake_api: FakeMessagesAPI
) -> None:
    fake_api.add(text("First."), text("Second."))
    async with http_server(settings, fake_api) as server, async_client(server) as client:
        session = await new_session(client, "replay")
        async with await client.beta.sessions.events.stream(session.id) as stream:
            await client.beta.sessions.events.send(session.id, events=[user_message("One.")])
            first = await read_turn(stream)
        async with await client.beta.sessions.events.stream(session.id) as stream:
            sent = await client.beta.sessions.events.send(session.id, events=[user_message("Two.")])
            second = await read_turn(stream)
        # The second stream starts at the second message: nothing of the first turn again.
        assert not {e.id for e in first} & {e.id for e in second}
        assert second[0].type == "user.message"
        assert sent.data
        assert second[0].id == sent.data[0].id
        assert second[0].processed_at is None
        assert [e.content[0].text for e in second if e.type == "agent.message"] == ["Second."]

        # Deleting the session ends every stream following it, after `session.deleted`.
        async with await client.beta.sessions.events.stream(session.id) as stream:
            await client.beta.sessions.delete(session.id)
            with anyio.fail_after(20):
                after_delete = [e async for e in stream]
        assert [e.type for e in after_delete] == ["session.deleted"]


async def test_frames_name_their_event_and_idle_streams_get_heartbeats(
    settings: Settings, fake_api: FakeMessagesAPI
) -> None:
    fake_api.add(text("Hello."))
    async with (
        http_server(settings, fake_api, rest={"heartbeat_interval": 0.2}) as server,
        async_client(server) as client,
        httpx2.AsyncClient(base_url=server.url, headers=server.headers(), timeout=30) as http,
    ):
        session = await new_session(client, "frames")
        # The April guides' path is an alias of /events/stream.
        async with http.stream("GET", f"/v1/sessions/{session.id}/stream") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.aiter_lines()
            with anyio.fail_after(10):
                assert await anext(lines) == ": ping"
            await client.beta.sessions.events.send(session.id, events=[user_message("Hi.")])
            frames = await read_frames(lines, until="session.status_idle")
    for fields in frames:
        assert set(fields) == {"event", "data"}, fields
        assert json.loads(fields["data"])["type"] == fields["event"]


async def test_a_stream_ends_cleanly_when_the_server_shuts_down(
    settings: Settings, fake_api: FakeMessagesAPI
) -> None:
    received: list[Any] = []
    # The client outlives the server, so that only the server can end the stream.
    with anyio.fail_after(30):
        async with (
            contextlib.AsyncExitStack() as stack,
            anyio.create_task_group() as group,
            http_server(settings, fake_api) as server,
        ):
            client = await stack.enter_async_context(async_client(server))
            session = await new_session(client, "shutdown")
            stream = await client.beta.sessions.events.stream(session.id)

            async def read_to_the_end() -> None:
                async with stream:
                    received.extend([e async for e in stream])

            group.start_soon(read_to_the_end)
        # Leaving the block shut the server down first (the reader was still reading).
    # The iteration finished without an error, and there was nothing to send.
    assert received == []


async def read_frames(lines: Any, *, until: str, limit: float = 60) -> list[dict[str, str]]:
    """SSE frames (their fields) from a line iterator, up to the first of type `until`."""
    frames: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    with anyio.fail_after(limit):
        async for line in lines:
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if fields:
                frames.append(fields)
                if fields.get("event") == until:
                    return frames
                fields = {}
    raise AssertionError(f"the stream ended before {until}: {frames}")
