"""The official MCP Inspector CLI drives the server over stdio and over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from server.settings import Settings
from tests.conftest import IMAGE
from tests.fakes.messages_api import FakeMessagesAPI, Hold, text, tool_use
from tests.server.http_server import http_server

pytestmark = [pytest.mark.asyncio, pytest.mark.docker]
INSPECTOR = ["npx", "-y", "@modelcontextprotocol/inspector@2.12.0", "--cli"]


@pytest.fixture(autouse=True)
def _needs_npx() -> None:
    if shutil.which("npx") is None:
        pytest.fail("npx (Node.js) is needed for the MCP Inspector CLI; install nodejs and npm")


async def inspect(*args: str, timeout: float = 120) -> tuple[int, Any, str]:
    """Run the Inspector CLI; return (exit code, parsed JSON output or None, stderr)."""
    with anyio.fail_after(timeout):
        result = await anyio.run_process([*INSPECTOR, *args], check=False)
    output = result.stdout.decode()
    try:
        parsed = json.loads(output) if output.strip() else None
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and "result" in parsed:
        parsed = parsed["result"]  # --format json wraps the MCP result
    return result.returncode, parsed, result.stderr.decode()


def stdio_args(home: Path, fake: FakeMessagesAPI) -> list[str]:
    env = {
        "MANAGED_AGENTS_HOME": str(home),
        "MANAGED_AGENTS_IMAGE": IMAGE,
        "MANAGED_AGENTS_WARM_POOL": "0",
        "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": fake.url,
    }
    if os.environ.get("DOCKER_HOST"):
        env["DOCKER_HOST"] = os.environ["DOCKER_HOST"]
    flags = [item for key, value in env.items() for item in ("-e", f"{key}={value}")]
    return [*flags, "--cwd", os.getcwd()]


def call(tool: str, arguments: dict[str, Any]) -> list[str]:
    return [
        "--method",
        "tools/call",
        "--tool-name",
        tool,
        "--tool-args-json",
        json.dumps(arguments),
        "--format",
        "json",
    ]


async def test_over_stdio_tools_list_run_task_and_wait(
    home: Path, fake_api: FakeMessagesAPI
) -> None:
    fake_api.add(tool_use("bash", {"command": "echo from-inspector"}), text("Inspected."))
    server = ["--", sys.executable, "-m", "server", "serve"]
    base = stdio_args(home, fake_api)

    code, listed, stderr = await inspect(
        *base, "--method", "tools/list", "--format", "json", *server
    )
    assert code == 0, stderr
    assert "run_task" in {t["name"] for t in listed["tools"]}

    code, ran, stderr = await inspect(
        *base, *call("run_task", {"prompt": "Go.", "wait_s": 40}), *server
    )
    assert code == 0, stderr
    result = ran["structuredContent"]
    assert result["done"] is True
    assert result["answer"] == "Inspected."

    # A new server process (the Inspector starts one per call) follows the same session.
    code, waited, stderr = await inspect(
        *base,
        *call("wait_for_session", {"session_id": result["session_id"], "timeout_s": 5}),
        *server,
    )
    assert code == 0, stderr
    summary = waited["structuredContent"]
    assert summary["done"] is True
    assert any(e.get("output") == "from-inspector\n" for e in summary["events"])


async def test_over_http_with_the_token(settings: Settings, fake_api: FakeMessagesAPI) -> None:
    hold = Hold(then=text("Finished over HTTP."))
    fake_api.add(hold)
    async with http_server(settings, fake_api) as server:
        url = ["--server-url", f"{server.url}/mcp", "--transport", "http"]
        auth = ["--header", "Authorization: Bearer test-token"]

        code, listed, stderr = await inspect(
            *url, *auth, "--method", "tools/list", "--format", "json"
        )
        assert code == 0, stderr
        assert "wait_for_session" in {t["name"] for t in listed["tools"]}

        with anyio.fail_after(60):
            code, ran, stderr = await inspect(
                *url, *auth, *call("run_task", {"prompt": "Slow work.", "wait_s": 2})
            )
        assert code == 0, stderr
        first = ran["structuredContent"]
        assert first["done"] is False
        hold.release.set()
        code, waited, stderr = await inspect(
            *url,
            *auth,
            *call(
                "wait_for_session",
                {"session_id": first["session_id"], "after": first["next_after"], "timeout_s": 30},
            ),
        )
        assert code == 0, stderr
        assert waited["structuredContent"]["done"] is True
        said = [e for e in waited["structuredContent"]["events"] if e["type"] == "agent.message"]
        assert said[-1]["text"] == "Finished over HTTP."

        no_token, _, stderr_401 = await inspect(*url, "--method", "tools/list")
        assert no_token != 0
        assert "401" in stderr_401 or "auth" in stderr_401.lower()
        foreign, _, stderr_403 = await inspect(
            *url, *auth, "--header", "Origin: http://evil.example", "--method", "tools/list"
        )
        assert foreign != 0
        assert "403" in stderr_403 or "Origin" in stderr_403
