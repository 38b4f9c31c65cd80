"""`Idempotency-Key` on REST creates: a retried POST returns the first object."""

from __future__ import annotations

import anthropic
import pytest

from server.settings import Settings
from tests.fakes.messages_api import FakeMessagesAPI
from tests.rest.helpers import NO_NETWORK, async_client
from tests.server.http_server import http_server

pytestmark = [pytest.mark.asyncio, pytest.mark.docker]


async def test_a_retried_post_with_the_same_key_returns_the_first_object(
    settings: Settings, fake_api: FakeMessagesAPI
) -> None:
    async with http_server(settings, fake_api) as server:
        client = async_client(server)
        key = {"Idempotency-Key": "create-agent-1"}
        agent = await client.beta.agents.create(name="a", model="m", extra_headers=key)
        again = await client.beta.agents.create(name="a", model="m", extra_headers=key)
        assert again.id == agent.id
        assert len((await client.beta.agents.list()).data) == 1

        env_key = {"Idempotency-Key": "env-1"}
        env = await client.beta.environments.create(
            name="e", config=NO_NETWORK, extra_headers=env_key
        )
        env_again = await client.beta.environments.create(
            name="e", config=NO_NETWORK, extra_headers=env_key
        )
        assert env_again.id == env.id

        session_key = {"Idempotency-Key": "session-1"}
        session = await client.beta.sessions.create(
            agent=agent.id, environment_id=env.id, extra_headers=session_key
        )
        session_again = await client.beta.sessions.create(
            agent=agent.id, environment_id=env.id, extra_headers=session_key
        )
        assert session_again.id == session.id

        file_key = {"Idempotency-Key": "file-1"}
        upload = ("notes.txt", b"hello\n", "text/plain")
        file = await client.beta.files.upload(file=upload, extra_headers=file_key)
        file_again = await client.beta.files.upload(file=upload, extra_headers=file_key)
        assert file_again.id == file.id

        with pytest.raises(anthropic.BadRequestError, match="different parameters"):
            await client.beta.agents.create(name="b", model="m", extra_headers=key)
        await client.close()
