"""Delegation as MCP clients use it: run_task, progress, bounded results, resources, stdout."""

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

from tests.conftest import IMAGE, OpenMCP
from tests.fakes.messages_api import FakeMessagesAPI, Hold, text, tool_use
from tests.server.helpers import say, setup_session, wait_idle

pytestmark = [pytest.mark.docker]
AgentArgs = Callable[..., dict[str, Any]]


@pytest.mark.asyncio
async def test_run_task_returns_the_answer_and_output_files_when_fast(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, tmp_path: Path
) -> None:
    data = tmp_path / "numbers.txt"
    data.write_text("3\n4\n")
    fake_api.add(
        tool_use(
            "bash",
            {
                "command": "paste -sd+ /mnt/session/uploads/numbers.txt | bc > "
                "/mnt/session/outputs/sum.txt 2>/dev/null || "
                "python3 -c 'print(7)' > /mnt/session/outputs/sum.txt"
            },
        ),
        text("The sum is 7; it is in sum.txt."),
    )
    async with open_mcp() as mcp:
        result = await mcp(
            "run_task", {"prompt": "Sum the numbers.", "files": [str(data)], "wait_s": 40}
        )
        assert result["done"] is True
        assert result["answer"] == "The sum is 7; it is in sum.txt."
        assert result["stop_reason"] == {"type": "end_turn"}
        assert [f["filename"] for f in result["output_files"]] == ["sum.txt"]
        assert "follow-ups" in result["next_step"]
        session = await mcp("get_session", {"session_id": result["session_id"]})
        assert session["agent"]["name"] == "managed-agents-default"
        assert session["resources"][0]["mount_path"] == "/mnt/session/uploads/numbers.txt"
        downloaded = await mcp("download_file", {"file_id": result["output_files"][0]["id"]})
        assert downloaded["content"] == "7\n"
        # The defaults are reused, not re-created.
        again = await mcp("run_task", {"prompt": "Again?", "wait_s": 0})
        agents = await mcp("list_agents", {})
        assert [a["name"] for a in agents["data"]] == ["managed-agents-default"]
        envs = await mcp("list_environments", {})
        assert [e["name"] for e in envs["data"]] == ["managed-agents-default"]
        assert again["done"] is False


@pytest.mark.asyncio
async def test_run_task_returns_within_wait_s_and_wait_for_session_finishes(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI
) -> None:
    hold = Hold(then=text("Finally done."))
    fake_api.add(hold)
    async with open_mcp() as mcp:
        with anyio.fail_after(15):
            result = await mcp("run_task", {"prompt": "Take your time.", "wait_s": 1})
        assert result["done"] is False
        assert result["answer"] is None
        assert "wait_for_session" in result["next_step"]
        hold.release.set()
        answer, events = await wait_idle(mcp, result["session_id"], after=result["next_after"])
    assert answer["done"] is True
    assert answer["stop_reason"] == {"type": "end_turn"}


@pytest.mark.asyncio
async def test_wait_for_session_sends_progress_notifications(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    fake_api.add(
        tool_use("bash", {"command": "sleep 1; echo one"}),
        tool_use("bash", {"command": "echo two"}),
        text("Both."),
    )
    notes: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        notes.append((progress, message))

    async with open_mcp() as mcp:
        session = await setup_session(mcp, new_agent())
        await say(mcp, session["id"], "Go.")
        result = await mcp.client.call_tool(
            "wait_for_session",
            {"session_id": session["id"], "timeout_s": 30},
            progress_callback=on_progress,
        )
    assert result.structured_content is not None
    assert result.structured_content["done"] is True
    assert len(notes) >= 2
    assert [p for p, _ in notes] == sorted(p for p, _ in notes)
    assert any(m and m.startswith("running bash: sleep 1") for _, m in notes)


@pytest.mark.asyncio
async def test_summaries_stay_small_and_page_without_losing_events(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    calls = [tool_use("bash", {"command": "seq 1 20000"}) for _ in range(25)]
    fake_api.add(*calls, text("Lots of output."))
    async with open_mcp() as mcp:
        session = await setup_session(mcp, new_agent())
        await say(mcp, session["id"], "Print a lot.")
        await wait_idle(mcp, session["id"])
        pages: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            args: dict[str, Any] = {"session_id": session["id"], "timeout_s": 0}
            if after:
                args["after"] = after
            page = await mcp("wait_for_session", args)
            pages.append(page)
            after = page["next_after"]
            if not page["more"]:
                break
    assert len(pages) >= 2
    assert all(len(json.dumps(p)) < 45_000 for p in pages)
    assert pages[-1]["done"] is True
    summarised = [e for p in pages for e in p["events"]]
    results = [e for e in summarised if e["type"] == "agent.tool_result"]
    assert len(results) == 25
    assert all("characters clipped" in r["output"] for r in results)
    assert {"type", "id", "tool_use_id", "is_error", "output"} == set(results[0])
    ids = [e["id"] for e in summarised]
    assert ids == sorted(ids)  # event ids are time-ordered: nothing repeated or out of order
    assert len(ids) == len(set(ids))


@pytest.mark.asyncio
async def test_read_file_comes_in_chunks_and_refuses_binary(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    fake_api.add(
        tool_use(
            "bash",
            {
                "command": "python3 -c \"open('big.txt','w').write('é' * 40000)\"; "
                "head -c 100 /dev/urandom > blob.bin"
            },
        ),
        text("Made files."),
    )
    async with open_mcp() as mcp:
        session = await setup_session(mcp, new_agent())
        await say(mcp, session["id"], "Make files.")
        await wait_idle(mcp, session["id"])
        chunks: list[str] = []
        offset: int | None = 0
        while offset is not None:
            part = await mcp(
                "read_file",
                {"session_id": session["id"], "path": "big.txt", "offset": offset, "limit": 29999},
            )
            chunks.append(part["content"])
            assert part["remaining"] == part["size"] - (part["next_offset"] or part["size"])
            offset = part["next_offset"]
        error = await mcp.error("read_file", {"session_id": session["id"], "path": "blob.bin"})
    assert "".join(chunks) == "é" * 40000
    assert len(chunks) == 3
    assert "not a text file" in error
    assert "download_file" in error


@pytest.mark.asyncio
async def test_transcripts_and_files_are_resources(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    fake_api.add(tool_use("bash", {"command": "echo resource-body > note.txt"}), text("Noted."))
    async with open_mcp() as mcp:
        session = await setup_session(mcp, new_agent())
        await say(mcp, session["id"], "Write a note.")
        await wait_idle(mcp, session["id"])
        listed = await mcp.client.list_resources()
        uris = [str(r.uri) for r in listed.resources]
        transcript = await mcp.client.read_resource(f"session://{session['id']}/transcript")
        note = await mcp.client.read_resource(f"session://{session['id']}/files/note.txt")
        templates = await mcp.client.list_resource_templates()
    assert f"session://{session['id']}/transcript" in uris
    body = transcript.contents[0]
    assert getattr(body, "text", "").startswith("# ")
    assert "## User\n\nWrite a note." in getattr(body, "text", "")
    assert "**bash**" in getattr(body, "text", "")
    assert getattr(note.contents[0], "text", "") == "resource-body\n"
    assert {t.uri_template for t in templates.resource_templates} == {
        "session://{session_id}/transcript",
        "session://{session_id}/files/{+path}",
    }


@pytest.mark.asyncio
async def test_tools_declare_annotations_and_output_schemas(open_mcp: OpenMCP) -> None:
    async with open_mcp() as mcp:
        tools = {t.name: t for t in (await mcp.client.list_tools()).tools}
    assert tools["run_task"].output_schema is not None
    assert "answer" in tools["run_task"].output_schema["properties"]
    assert tools["wait_for_session"].output_schema is not None
    assert tools["read_file"].output_schema is not None
    for name in ("get_session", "list_sessions", "wait_for_session", "read_file", "list_files"):
        annotations = tools[name].annotations
        assert annotations is not None
        assert annotations.read_only_hint is True, name
    for name in ("delete_session", "delete_file", "archive_agent"):
        annotations = tools[name].annotations
        assert annotations is not None
        assert annotations.destructive_hint is True, name
    for tool in tools.values():
        assert tool.description
        assert len(tool.description) > 40, tool.name


def test_stdout_carries_nothing_but_protocol_for_a_whole_session(
    home: Path, fake_api: FakeMessagesAPI
) -> None:
    """A raw JSON-RPC conversation over stdio: every stdout line must be a JSON-RPC message."""
    fake_api.add(
        tool_use("bash", {"command": "echo to-stdout; echo to-stderr >&2; print() { :; }"}),
        text("Done."),
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "MANAGED_AGENTS_HOME": str(home),
        "MANAGED_AGENTS_IMAGE": IMAGE,
        "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": fake_api.url,
        "MANAGED_AGENTS_WARM_POOL": "0",
    }
    if os.environ.get("DOCKER_HOST"):
        env["DOCKER_HOST"] = os.environ["DOCKER_HOST"]
    requests = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "raw", "version": "0"},
            },
        },
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "tools/call",
            "params": {"name": "run_task", "arguments": {"prompt": "Echo things.", "wait_s": 40}},
        },
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=os.getcwd(),
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        process.stdin.write(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
        process.stdin.flush()
        lines: list[bytes] = []
        answered: set[int] = set()
        while answered != {1, 2, 3}:
            line = process.stdout.readline()
            assert line, "the server closed stdout early"
            lines.append(line)
            message = json.loads(line)
            assert message["jsonrpc"] == "2.0"
            if "id" in message and "result" in message:
                answered.add(message["id"])
        rest, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    for line in [*lines, *rest.splitlines()]:
        if line.strip():
            assert json.loads(line)["jsonrpc"] == "2.0"
    result = json.loads(lines[-1])["result"]
    assert result["structuredContent"]["answer"] == "Done."
    del stderr
