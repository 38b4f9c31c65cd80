"""The examples ship working: each client config starts the server; delegate.py runs a task."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters

from tests.conftest import IMAGE
from tests.fakes.messages_api import FakeMessagesAPI, text, tool_use

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PLACEHOLDER = "/path/to/managed-agents-mcp"
CONFIGS = {
    "claude-code": ("claude-code/.mcp.json", "mcpServers"),
    "claude-desktop": ("claude_desktop_config.json", "mcpServers"),
    "vscode": ("vscode/.vscode/mcp.json", "servers"),
    "cursor": ("cursor/.cursor/mcp.json", "mcpServers"),
}


def server_entry(name: str) -> dict[str, Any]:
    path, key = CONFIGS[name]
    config = json.loads((EXAMPLES / path).read_text())
    return config[key]["managed-agents"]


@pytest.mark.asyncio
@pytest.mark.parametrize("client", sorted(CONFIGS))
async def test_each_client_config_starts_the_server(client: str, tmp_path: Path) -> None:
    entry = server_entry(client)
    command = entry["command"]
    if command.endswith("/uv"):  # the Desktop example names uv by absolute path
        command = shutil.which("uv") or command
    args = [a.replace(PLACEHOLDER, str(ROOT)) for a in entry["args"]]
    assert set(entry["env"]) >= {"ANTHROPIC_API_KEY"}
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "ANTHROPIC_API_KEY": "test-key",
        "MANAGED_AGENTS_HOME": str(tmp_path / "home"),
    }
    params = StdioServerParameters(command=command, args=args, env=env)
    async with Client(params) as session:
        names = {t.name for t in (await session.list_tools()).tools}
    assert {"run_task", "wait_for_session", "start_session"} <= names


@pytest.mark.docker
def test_delegate_example_runs_a_task(
    fake_api: FakeMessagesAPI, home: Path, tmp_path: Path
) -> None:
    fake_api.add(tool_use("bash", {"command": "echo 6*7 | bc || echo 42"}), text("It is 42."))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": fake_api.url,
        "MANAGED_AGENTS_HOME": str(home),
        "MANAGED_AGENTS_IMAGE": IMAGE,
        "MANAGED_AGENTS_WARM_POOL": "0",
    }
    if os.environ.get("DOCKER_HOST"):
        env["DOCKER_HOST"] = os.environ["DOCKER_HOST"]
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "delegate.py"), "What is 6 times 7?"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("It is 42.")
