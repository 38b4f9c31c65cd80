"""The commands for the person watching: sessions, tail, files, shell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import OpenMCP
from tests.fakes.messages_api import FakeMessagesAPI, text, tool_use
from tests.server.helpers import say, setup_session, wait_idle

AgentArgs = Callable[..., dict[str, Any]]


def cli(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={
            "PATH": os.environ.get("PATH", ""),
            "MANAGED_AGENTS_HOME": str(home),
            "COLUMNS": "200",
        },
        check=False,
    )


@pytest.mark.asyncio
@pytest.mark.docker
async def test_sessions_tail_and_files_show_a_finished_session(
    open_mcp: OpenMCP,
    fake_api: FakeMessagesAPI,
    new_agent: AgentArgs,
    home: Path,
    tmp_path: Path,
) -> None:
    fake_api.add(
        tool_use("bash", {"command": "echo report > /mnt/session/outputs/report.txt"}),
        text("Report ready."),
    )
    async with open_mcp() as mcp:
        session = await setup_session(mcp, new_agent())
        await say(mcp, session["id"], "Write the report.")
        await wait_idle(mcp, session["id"])

    # The commands are separate processes reading the same data dir.
    await anyio.to_thread.run_sync(check_commands, home, session["id"], tmp_path)


def check_commands(home: Path, session_id: str, tmp_path: Path) -> None:
    listed = cli(home, "sessions", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["id"] == session_id
    assert row["status"] == "idle"
    assert row["last_message"] == "agent: Report ready."
    table = cli(home, "sessions")
    assert session_id in table.stdout
    assert "Report ready." in table.stdout

    downloads = tmp_path / "out"
    saved = cli(home, "files", session_id, "--download", str(downloads))
    assert saved.returncode == 0, saved.stderr
    assert (downloads / "report.txt").read_text() == "report\n"
    shown = cli(home, "files", session_id)
    assert "report.txt" in shown.stdout

    follower = subprocess.Popen(
        [sys.executable, "-m", "server", "tail", session_id, "--json", "--history"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={"PATH": os.environ.get("PATH", ""), "MANAGED_AGENTS_HOME": str(home)},
    )
    assert follower.stdout is not None
    try:
        kinds = []
        for line in follower.stdout:
            kinds.append(json.loads(line)["type"])
            if kinds[-1] == "session.status_idle":
                break
    finally:
        follower.terminate()
        follower.wait(timeout=10)
        follower.stdout.close()
    assert kinds[0] == "user.message"
    assert "agent.tool_use" in kinds


def test_unknown_sessions_and_missing_data_are_one_line_errors(tmp_path: Path) -> None:
    empty = cli(tmp_path / "nothing", "sessions")
    assert empty.returncode == 1
    assert "no data in" in empty.stderr
    assert "Traceback" not in empty.stderr
    (tmp_path / "home").mkdir()
    cli(tmp_path / "home", "token")
    for command in ("tail", "files", "shell"):
        result = cli(tmp_path / "home", command, "sesn_nope")
        assert result.returncode == 1, command
        assert "Traceback" not in result.stderr
        assert "not found" in result.stderr or "no data in" in result.stderr
