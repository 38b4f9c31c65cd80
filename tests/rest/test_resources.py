"""The rest of the surface through the SDK: lists, filters, pagination, updates, resources."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from server.settings import Settings
from tests.fakes.messages_api import FakeMessagesAPI, text
from tests.rest.helpers import NO_NETWORK, async_client, file_resource, read_turn, user_message
from tests.server.http_server import http_server

pytestmark = [pytest.mark.asyncio, pytest.mark.docker]


async def test_agents_environments_and_sessions_list_filter_and_update(
    settings: Settings, fake_api: FakeMessagesAPI
) -> None:
    fake_api.add(text("Hi."))
    async with http_server(settings, fake_api) as server, async_client(server) as client:
        before = datetime.now(UTC) - timedelta(seconds=1)
        first = await client.beta.agents.create(
            name="first", model={"id": "claude-sonnet-4-6", "speed": "fast"}, metadata={"a": "1"}
        )
        second = await client.beta.agents.create(name="second", model="claude-sonnet-4-6")
        updated = await client.beta.agents.update(
            first.id, version=1, description="two", metadata={"a": None, "b": "2"}
        )
        assert (updated.version, updated.description, updated.metadata) == (2, "two", {"b": "2"})
        assert updated.model.id == "claude-sonnet-4-6"
        assert (await client.beta.agents.retrieve(first.id, version=1)).metadata == {"a": "1"}

        # Newest first, one per page, followed through `next_page` by the SDK.
        names = [a.name async for a in client.beta.agents.list(limit=1)]
        assert names == ["second", "first"]
        later = datetime.now(UTC) + timedelta(seconds=1)
        assert len((await client.beta.agents.list(created_at_gte=before)).data) == 2
        assert (await client.beta.agents.list(created_at_gte=later)).data == []
        await client.beta.agents.archive(second.id)
        assert [a.id for a in (await client.beta.agents.list()).data] == [first.id]

        environment = await client.beta.environments.create(
            name="lists", config=NO_NETWORK, metadata={"team": "x"}
        )
        changed = await client.beta.environments.update(
            environment.id, description="for lists", config=None
        )
        assert changed.description == "for lists"
        assert changed.config == environment.config
        assert (await client.beta.environments.retrieve(environment.id)).name == "lists"

        session = await client.beta.sessions.create(
            agent={"type": "agent", "id": first.id, "version": 1},
            environment_id=environment.id,
            title="one",
        )
        assert session.agent.version == 1
        assert session.status == "idle"
        renamed = await client.beta.sessions.update(
            session.id, title="renamed", metadata={"k": "v"}
        )
        assert (renamed.title, renamed.metadata) == ("renamed", {"k": "v"})

        async with await client.beta.sessions.events.stream(session.id) as stream:
            await client.beta.sessions.events.send(session.id, events=[user_message("Hello.")])
            turn = await read_turn(stream)
        last = turn[-1].processed_at

        listed = await client.beta.sessions.list(agent_id=first.id, statuses=["idle"])
        assert [s.id for s in listed.data] == [session.id]
        assert listed.prev_page is None
        assert (await client.beta.sessions.list(statuses=["running"])).data == []
        assert (await client.beta.sessions.list(created_at_gt=session.created_at)).data == []
        since = await client.beta.sessions.list(created_at_gte=session.created_at)
        assert [s.id for s in since.data] == [session.id]
        assert (await client.beta.sessions.list(agent_id=first.id, agent_version=2)).data == []

        messages = await client.beta.sessions.events.list(
            session.id, types=["agent.message", "user.message"], order="desc"
        )
        assert [e.type for e in messages.data] == ["agent.message", "user.message"]
        # Event times are their processed_at.
        assert last is not None
        assert (await client.beta.sessions.events.list(session.id, created_at_gt=last)).data == []
        upto = await client.beta.sessions.events.list(session.id, created_at_lte=last)
        assert upto.data[-1].type == "session.status_idle"
        everything = [e.type async for e in client.beta.sessions.events.list(session.id, limit=2)]
        assert everything[:2] == ["session.updated", "user.message"]
        assert everything[-1] == "session.status_idle"

        await client.beta.sessions.archive(session.id)
        assert (await client.beta.sessions.list()).data == []
        archived = await client.beta.sessions.list(include_archived=True)
        assert [(s.id, s.status) for s in archived.data] == [(session.id, "terminated")]
        deleted = await client.beta.sessions.delete(session.id)
        assert (deleted.id, deleted.type) == (session.id, "session_deleted")
        await client.beta.environments.archive(environment.id)
        assert (await client.beta.environments.list()).data == []
        gone = await client.beta.environments.delete(environment.id)
        assert (gone.id, gone.type) == (environment.id, "environment_deleted")


async def test_files_and_session_resources(settings: Settings, fake_api: FakeMessagesAPI) -> None:
    async with http_server(settings, fake_api) as server, async_client(server) as client:
        agent = await client.beta.agents.create(name="files", model="claude-sonnet-4-6")
        environment = await client.beta.environments.create(name="files", config=NO_NETWORK)
        notes = await client.beta.files.upload(file=("notes.md", b"# Notes\n", "text/markdown"))
        data = await client.beta.files.upload(file=("dir/data.bin", bytes(range(256))))
        assert (notes.filename, notes.mime_type, notes.size_bytes) == (
            "notes.md",
            "text/markdown",
            8,
        )
        assert data.filename == "data.bin"
        assert data.mime_type == "application/octet-stream"
        meta = await client.beta.files.retrieve_metadata(data.id)
        assert (meta.id, meta.size_bytes, meta.scope) == (data.id, 256, None)
        content = await client.beta.files.download(data.id)
        assert await content.read() == bytes(range(256))
        assert [f.id for f in (await client.beta.files.list(ids=[notes.id])).data] == [notes.id]
        assert [f.id async for f in client.beta.files.list(limit=1)] == [data.id, notes.id]

        session = await client.beta.sessions.create(agent=agent.id, environment_id=environment.id)
        first = await client.beta.sessions.resources.add(
            session.id, type="file", file_id=notes.id, mount_path="/docs/notes.md"
        )
        second = await client.beta.sessions.resources.add(session.id, type="file", file_id=data.id)
        assert first.mount_path == "/mnt/session/uploads/docs/notes.md"
        assert second.mount_path == f"/mnt/session/uploads/{data.id}"
        assert first.file_id != notes.id  # a session-scoped copy
        listed = [
            file_resource(r).id
            async for r in client.beta.sessions.resources.list(session.id, limit=1)
        ]
        assert listed == [first.id, second.id]
        page = await client.beta.sessions.resources.list(session.id)
        assert page.next_page is None
        assert len(page.data) == 2
        fetched = file_resource(
            await client.beta.sessions.resources.retrieve(first.id, session_id=session.id)
        )
        assert fetched.mount_path == first.mount_path
        scoped = [f.id async for f in client.beta.files.list(scope_id=session.id)]
        assert sorted(scoped) == sorted([first.file_id, second.file_id])

        removed = await client.beta.sessions.resources.delete(first.id, session_id=session.id)
        assert (removed.id, removed.type) == (first.id, "session_resource_deleted")
        remaining = (await client.beta.sessions.resources.list(session.id)).data
        assert [file_resource(r).id for r in remaining] == [second.id]
        await client.beta.sessions.delete(session.id)
        deleted = await client.beta.files.delete(notes.id)
        assert (deleted.id, deleted.type) == (notes.id, "file_deleted")
        assert [f.id for f in (await client.beta.files.list()).data] == [data.id]
