"""The HTTP transport: token auth, DNS-rebinding checks, health, and MCP over `/mcp`."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from server.http import load_token
from server.settings import Settings
from tests.conftest import ToolCaller
from tests.fakes.messages_api import FakeMessagesAPI, text, tool_use
from tests.server.helpers import of_type, say, setup_session, wait_idle
from tests.server.http_server import http_server

AgentArgs = Callable[..., dict[str, Any]]
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "0"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}


@pytest.mark.asyncio
@pytest.mark.docker
async def test_health_needs_no_token_and_reveals_nothing(
    settings: Settings, fake_api: FakeMessagesAPI
) -> None:
    async with http_server(settings, fake_api) as server, httpx2.AsyncClient() as http:
        response = await http.get(f"{server.url}/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.asyncio
@pytest.mark.docker
async def test_requests_without_the_right_token_are_refused(
    settings: Settings, fake_api: FakeMessagesAPI
) -> None:
    async with http_server(settings, fake_api) as server, httpx2.AsyncClient() as http:
        url = f"{server.url}/mcp"
        missing = await http.post(url, json=INIT, headers=MCP_HEADERS)
        wrong = await http.post(
            url, json=INIT, headers={**MCP_HEADERS, "Authorization": "Bearer nope"}
        )
        by_header = await http.post(
            url, json=INIT, headers={**MCP_HEADERS, "Authorization": "Bearer test-token"}
        )
        by_key = await http.post(url, json=INIT, headers={**MCP_HEADERS, "x-api-key": "test-token"})
    for refused in (missing, wrong):
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert refused.json()["error"]["type"] == "authentication_error"
        assert "test-token" not in refused.text
    assert by_header.status_code == 200
    assert by_key.status_code == 200


@pytest.mark.asyncio
@pytest.mark.docker
async def test_foreign_origins_and_hosts_are_refused(
    settings: Settings, fake_api: FakeMessagesAPI
) -> None:
    headers = {**MCP_HEADERS, "Authorization": "Bearer test-token"}
    async with http_server(settings, fake_api) as server, httpx2.AsyncClient() as http:
        url = f"{server.url}/mcp"
        evil_origin = await http.post(
            url, json=INIT, headers={**headers, "Origin": "http://evil.example"}
        )
        local_origin = await http.post(
            url, json=INIT, headers={**headers, "Origin": "http://localhost:3000"}
        )
        rebound = await http.post(url, json=INIT, headers={**headers, "Host": "evil.example:80"})
    assert evil_origin.status_code == 403
    assert local_origin.status_code == 200
    assert rebound.status_code == 421


@pytest.mark.asyncio
@pytest.mark.docker
async def test_a_session_runs_over_streamable_http(
    settings: Settings, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    fake_api.add(tool_use("bash", {"command": "echo over-http"}), text("Done."))
    async with (
        http_server(settings, fake_api) as server,
        httpx2.AsyncClient(headers=server.headers()) as http,
        Client(streamable_http_client(f"{server.url}/mcp", http_client=http)) as client,
    ):
        mcp = ToolCaller(client)
        session = await setup_session(mcp, new_agent())
        await say(mcp, session["id"], "Say it.")
        _, events = await wait_idle(mcp, session["id"])
    assert of_type(events, "agent.tool_result")[0]["content"][0]["text"] == "over-http\n"


def test_the_generated_token_is_private_and_stable(tmp_path: Path) -> None:
    first = load_token(tmp_path, None)
    assert len(first) >= 40
    assert stat.S_IMODE((tmp_path / "token").stat().st_mode) == 0o600
    assert load_token(tmp_path, None) == first
    assert load_token(tmp_path, "configured") == "configured"


def test_serving_without_a_token_off_loopback_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--transport",
            "http",
            "--host",
            "0.0.0.0",
            "--no-auth",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", ""), "MANAGED_AGENTS_HOME": str(tmp_path)},
        check=False,
    )
    assert result.returncode == 2
    assert "refusing to serve on 0.0.0.0 without a token" in result.stderr
    assert result.stdout == ""
