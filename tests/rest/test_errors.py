"""Every failure answers with the API's error envelope and the documented status."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import anthropic
import httpx2
import pytest

from server.settings import Settings
from tests.fakes.messages_api import FakeMessagesAPI
from tests.rest.helpers import NO_NETWORK, async_client, file_resource
from tests.server.http_server import http_server

pytestmark = [pytest.mark.asyncio, pytest.mark.docker]


def assert_envelope(response: httpx2.Response, status: int, error_type: str, *words: str) -> str:
    """Check the envelope; return its message."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == error_type
    message = body["error"]["message"]
    assert isinstance(message, str)
    assert message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert body["request_id"].startswith("req_")
    if "request-id" in response.headers:
        assert response.headers["request-id"] == body["request_id"]
    if status != 401:
        # The SDK retries 409s and 5xx unless told not to; none of these would change.
        assert response.headers["x-should-retry"] == "false"
    return message


async def test_malformed_requests_unknown_ids_and_wrong_methods(
    settings: Settings, fake_api: FakeMessagesAPI
) -> None:
    async with (
        http_server(settings, fake_api) as server,
        httpx2.AsyncClient(base_url=server.url, headers=server.headers()) as http,
    ):
        json_headers = {"content-type": "application/json"}

        # Authentication comes first, and is enveloped too.
        refused = await http.get("/v1/agents", headers={"Authorization": "Bearer wrong"})
        assert_envelope(refused, 401, "authentication_error", "token")

        # Bodies.
        assert_envelope(
            await http.post("/v1/agents", content=b"{bad json", headers=json_headers),
            400,
            "invalid_request_error",
            "not valid JSON",
        )
        assert_envelope(
            await http.post("/v1/agents", content=b"[1, 2]", headers=json_headers),
            400,
            "invalid_request_error",
            "JSON object",
        )
        assert_envelope(
            await http.post("/v1/agents", content=b"", headers=json_headers),
            400,
            "invalid_request_error",
            "JSON object body",
        )
        missing = assert_envelope(
            await http.post("/v1/agents", json={"name": ""}),
            400,
            "invalid_request_error",
            "name",
            "model",
        )
        assert "https://" not in missing  # readable, without pydantic's URLs
        assert_envelope(
            await http.post("/v1/agents", json={"name": "a", "model": "m", "colour": "red"}),
            400,
            "invalid_request_error",
            "colour: unknown field",
        )
        assert_envelope(
            await http.post("/v1/environments", json={"name": "e", "scope": "organization"}),
            400,
            "invalid_request_error",
            "scope",
        )
        assert_envelope(
            await http.post("/v1/sessions", json={"agent": 5}),
            400,
            "invalid_request_error",
            "environment_id",
        )

        # Query parameters.
        for query, word in [
            ("limit=0", "limit"),
            ("limit=ten", "limit"),
            ("include_archived=maybe", "include_archived"),
            ("created_at[gte]=yesterday", "created_at[gte]"),
        ]:
            assert_envelope(
                await http.get(f"/v1/agents?{query}"), 400, "invalid_request_error", word
            )
        assert_envelope(
            await http.get("/v1/sessions?order=sideways"), 400, "invalid_request_error", "order"
        )
        assert_envelope(
            await http.get("/v1/sessions?statuses[]=asleep"),
            400,
            "invalid_request_error",
            "asleep",
        )
        assert_envelope(
            await http.get("/v1/agents?page=not-a-cursor"),
            400,
            "invalid_request_error",
            "cursor",
        )

        # Unknown ids.
        for path in [
            "/v1/agents/agent_missing",
            "/v1/agents/agent_missing/versions",
            "/v1/environments/env_missing",
            "/v1/sessions/sesn_missing",
            "/v1/sessions/sesn_missing/events",
            "/v1/sessions/sesn_missing/events/stream",
            "/v1/sessions/sesn_missing/stream",
            "/v1/sessions/sesn_missing/resources",
            "/v1/sessions/sesn_missing/resources/sesrsc_missing",
            "/v1/files/file_missing",
            "/v1/files/file_missing/content",
        ]:
            assert_envelope(await http.get(path), 404, "not_found_error", "missing")
        for path in [
            "/v1/agents/agent_missing/archive",
            "/v1/environments/env_missing/archive",
            "/v1/sessions/sesn_missing/archive",
        ]:
            assert_envelope(await http.post(path), 404, "not_found_error", "missing")
        for path in ["/v1/environments/env_missing", "/v1/sessions/sesn_missing"]:
            assert_envelope(await http.delete(path), 404, "not_found_error", "missing")
        assert_envelope(
            await http.post("/v1/sessions/sesn_missing/events", json={"events": [user()]}),
            404,
            "not_found_error",
            "sesn_missing",
        )

        # Unknown paths and wrong methods.
        for path in ["/v1/nothing", "/v1/vaults", "/v1/sessions/sesn_x/threads"]:
            assert_envelope(await http.get(path), 404, "not_found_error", "no such endpoint")
        wrong = await http.delete("/v1/agents")
        assert_envelope(wrong, 405, "invalid_request_error", "DELETE", "GET", "POST")
        assert set(wrong.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
        assert_envelope(await http.put("/v1/sessions/sesn_x"), 405, "invalid_request_error")
        assert_envelope(
            await http.post("/v1/files/file_x/content"), 405, "invalid_request_error", "POST"
        )

        # States and conflicts.
        agent = (await http.post("/v1/agents", json={"name": "a", "model": "m"})).json()
        await http.post(f"/v1/agents/{agent['id']}", json={"system": "v2"})
        assert_envelope(
            await http.post(f"/v1/agents/{agent['id']}", json={"version": 1, "system": "v3"}),
            409,
            "invalid_request_error",
            "version",
        )
        assert_envelope(
            await http.get(f"/v1/agents/{agent['id']}?version=9"), 404, "not_found_error", "9"
        )
        await http.post("/v1/environments", json={"name": "twice", "config": NO_NETWORK})
        assert_envelope(
            await http.post("/v1/environments", json={"name": "twice"}),
            409,
            "invalid_request_error",
            "twice",
        )

        # Files.
        assert_envelope(
            await http.post("/v1/files", json={"file": "x"}),
            400,
            "invalid_request_error",
            "multipart",
        )
        assert_envelope(
            await http.post("/v1/files", files={"other": ("a.txt", b"a")}),
            400,
            "invalid_request_error",
            "other",
        )
        assert_envelope(
            await http.post(
                "/v1/files",
                files={"file": ("a.txt", b"a")},
                data={"expires_in_seconds": "3600"},
            ),
            400,
            "invalid_request_error",
            "expires_in_seconds",
        )
        assert_envelope(
            await http.get("/v1/files?ids[]=file_a&limit=5"), 400, "invalid_request_error", "ids"
        )


async def test_the_sdk_raises_its_typed_errors_without_retrying(
    settings: Settings, fake_api: FakeMessagesAPI
) -> None:
    async with (
        http_server(settings, fake_api) as server,
        # Default retries on purpose: the server must say when a retry cannot help.
        anthropic.AsyncAnthropic(base_url=server.url, api_key=server.token, timeout=20) as client,
    ):
        with pytest.raises(anthropic.NotFoundError) as missing:
            await client.beta.agents.retrieve("agent_missing")
        assert missing.value.status_code == 404
        assert isinstance(missing.value.body, dict)
        assert missing.value.body["error"]["type"] == "not_found_error"
        assert missing.value.request_id is not None
        assert missing.value.request_id.startswith("req_")

        agent = await client.beta.agents.create(name="a", model="claude-sonnet-4-6")
        await client.beta.agents.update(agent.id, version=1, system="two")
        with pytest.raises(anthropic.ConflictError) as stale:
            await client.beta.agents.update(agent.id, version=1, system="three")
        assert "version" in stale.value.message
        versions = [v.version async for v in client.beta.agents.versions.list(agent.id)]
        assert versions == [2, 1]

        with pytest.raises(anthropic.BadRequestError):
            await client.beta.sessions.events.stream(
                "sesn_x",
                event_deltas=["agent.mesage"],  # type: ignore[list-item]
            )
        with pytest.raises(anthropic.NotFoundError):
            await client.beta.sessions.events.stream("sesn_missing")


async def test_uploads_over_the_limit_are_refused_as_too_large(
    settings: Settings, fake_api: FakeMessagesAPI
) -> None:
    async with (
        http_server(replace(settings, max_upload_bytes=1024), fake_api) as server,
        httpx2.AsyncClient(base_url=server.url, headers=server.headers()) as http,
    ):
        big = await http.post("/v1/files", files={"file": ("big.bin", b"x" * 5000)})
        assert_envelope(big, 413, "request_too_large", "1024")
        small = await http.post("/v1/files", files={"file": ("small.txt", b"ok")})
        assert small.status_code == 200
        listed = (await http.get("/v1/files")).json()
        assert [f["filename"] for f in listed["data"]] == ["small.txt"]


def user(text: str = "hi") -> dict[str, Any]:
    return {"type": "user.message", "content": [{"type": "text", "text": text}]}


async def test_a_resource_update_is_refused_clearly(
    settings: Settings, fake_api: FakeMessagesAPI
) -> None:
    async with http_server(settings, fake_api) as server, async_client(server) as client:
        agent = await client.beta.agents.create(name="r", model="claude-sonnet-4-6")
        environment = await client.beta.environments.create(name="r", config=NO_NETWORK)
        uploaded = await client.beta.files.upload(file=("notes.txt", b"hello", "text/plain"))
        session = await client.beta.sessions.create(
            agent=agent.id,
            environment_id=environment.id,
            resources=[{"type": "file", "file_id": uploaded.id}],
        )
        resource = file_resource(session.resources[0])
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.beta.sessions.resources.update(
                resource.id, session_id=session.id, authorization_token="ghp_x"
            )
        assert "github_repository" in refused.value.message
        await client.beta.sessions.archive(session.id)
        with pytest.raises(anthropic.ConflictError) as sent_to_archived:
            await client.beta.sessions.events.send(session.id, events=[user()])  # type: ignore[list-item]
        assert "archived" in sent_to_archived.value.message
        await client.beta.sessions.delete(session.id)
