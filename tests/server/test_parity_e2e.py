"""Control-plane parity through the MCP tools: approvals, custom tools, lifecycle, files."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.conftest import OpenMCP, ToolCaller
from tests.fakes.messages_api import FakeMessagesAPI, text, tool_use
from tests.server.helpers import of_type, say, setup_session, wait_for_event, wait_idle

pytestmark = [pytest.mark.asyncio, pytest.mark.docker]
AgentArgs = Callable[..., dict[str, Any]]
ASK_BASH = {
    "type": "agent_toolset_20260401",
    "configs": [{"name": "bash", "permission_policy": {"type": "always_ask"}}],
}
WEATHER = {
    "type": "custom",
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


async def confirm(mcp: ToolCaller, session_id: str, tool_use_id: str, **fields: Any) -> None:
    event = {"type": "user.tool_confirmation", "tool_use_id": tool_use_id, **fields}
    await mcp("send_event", {"session_id": session_id, "event": event})


# --------------------------------------------------------------------------- approvals


async def test_always_ask_waits_for_a_confirmation_then_runs_the_tool(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    fake_api.add(tool_use("bash", {"command": "echo approved-run"}), text("Ran it."))
    async with open_mcp() as mcp:
        session = await setup_session(mcp, new_agent(tools=[ASK_BASH]))
        await say(mcp, session["id"], "Run something.")
        first, events = await wait_idle(mcp, session["id"])

        (asking,) = of_type(events, "agent.tool_use")
        assert asking["evaluated_permission"] == "ask"
        assert asking["evaluation"] == {"type": "always_ask"}
        assert first["stop_reason"] == {"type": "requires_action", "event_ids": [asking["id"]]}
        assert not of_type(events, "agent.tool_result")

        # A separate tool call, as a client would make it later.
        await confirm(mcp, session["id"], asking["id"], result="allow")
        second, events = await wait_idle(mcp, session["id"], after=first["next_after"])

    assert second["stop_reason"] == {"type": "end_turn"}
    (result,) = of_type(events, "agent.tool_result")
    assert result["tool_use_id"] == asking["id"]
    assert result["content"][0]["text"] == "approved-run\n"
    fake_api.assert_complete()


async def test_a_denied_call_does_not_run_and_the_model_hears_why(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    fake_api.add(tool_use("bash", {"command": "touch /workspace/should-not-exist"}), text("OK."))
    async with open_mcp() as mcp:
        session = await setup_session(mcp, new_agent(tools=[ASK_BASH]))
        await say(mcp, session["id"], "Do it.")
        first, events = await wait_idle(mcp, session["id"])
        (asking,) = of_type(events, "agent.tool_use")
        await confirm(
            mcp, session["id"], asking["id"], result="deny", deny_message="Use staging instead."
        )
        _, events = await wait_idle(mcp, session["id"], after=first["next_after"])
        error = await mcp.error(
            "read_file", {"session_id": session["id"], "path": "should-not-exist"}
        )

    (result,) = of_type(events, "agent.tool_result")
    assert result["is_error"] is True
    assert "denied" in result["content"][0]["text"]
    assert "Use staging instead." in result["content"][0]["text"]
    sent = fake_api.requests[1]["messages"][-1]["content"][0]
    assert sent["is_error"] is True
    assert "Use staging instead." in sent["content"][0]["text"]
    assert "not_found_error" in error


async def test_answering_one_of_two_calls_idles_again_with_the_other(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    two_calls = tool_use("bash", {"command": "echo one"})
    two_calls.content.append(
        {"type": "tool_use", "id": "toolu_second", "name": "bash", "input": {"command": "echo 2"}}
    )
    fake_api.add(two_calls, text("Both done."))
    async with open_mcp() as mcp:
        session = await setup_session(mcp, new_agent(tools=[ASK_BASH]))
        await say(mcp, session["id"], "Two things.")
        first, events = await wait_idle(mcp, session["id"])
        one, two = of_type(events, "agent.tool_use")
        assert first["stop_reason"]["event_ids"] == [one["id"], two["id"]]

        await confirm(mcp, session["id"], one["id"], result="allow")
        second, _ = await wait_idle(mcp, session["id"], after=first["next_after"])
        assert second["stop_reason"] == {"type": "requires_action", "event_ids": [two["id"]]}

        error = await mcp.error(
            "send_event",
            {
                "session_id": session["id"],
                "event": {
                    "type": "user.tool_confirmation",
                    "tool_use_id": one["id"],
                    "result": "allow",
                },
            },
        )
        assert "invalid_request_error" in error
        assert two["id"] in error

        await confirm(mcp, session["id"], two["id"], result="allow")
        third, events = await wait_idle(mcp, session["id"], after=second["next_after"])
    assert third["stop_reason"] == {"type": "end_turn"}
    assert of_type(events, "agent.tool_result")[0]["content"][0]["text"] == "2\n"


async def test_a_new_message_instead_of_an_answer_abandons_the_waiting_call(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    fake_api.add(tool_use("bash", {"command": "echo never"}), text("Understood, moving on."))
    async with open_mcp() as mcp:
        session = await setup_session(mcp, new_agent(tools=[ASK_BASH]))
        await say(mcp, session["id"], "Try it.")
        first, _ = await wait_idle(mcp, session["id"])
        await say(mcp, session["id"], "Never mind, just say hi.")
        second, events = await wait_idle(mcp, session["id"], after=first["next_after"])
    assert second["stop_reason"] == {"type": "end_turn"}
    (result,) = of_type(events, "agent.tool_result")
    assert result["is_error"] is True
    assert "Not run" in result["content"][0]["text"]
    last = fake_api.requests[-1]["messages"][-1]["content"]
    assert [b["type"] for b in last] == ["tool_result", "text"]


async def test_custom_tool_round_trip_across_two_calls(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    fake_api.add(tool_use("get_weather", {"city": "Paris"}), text("It is sunny in Paris."))
    async with open_mcp() as mcp:
        session = await setup_session(mcp, new_agent(tools=[WEATHER]))
        await say(mcp, session["id"], "Weather in Paris?")
        first, events = await wait_idle(mcp, session["id"])
        (call,) = of_type(events, "agent.custom_tool_use")
        assert call["name"] == "get_weather"
        assert call["input"] == {"city": "Paris"}
        assert first["stop_reason"] == {"type": "requires_action", "event_ids": [call["id"]]}
        assert fake_api.requests[0]["tools"] == [
            {
                "name": "get_weather",
                "description": "Weather for a city",
                "input_schema": WEATHER["input_schema"],
            }
        ]

        result = {
            "type": "user.custom_tool_result",
            "custom_tool_use_id": call["id"],
            "content": [{"type": "text", "text": "sunny, 21C"}],
        }
        await mcp("send_event", {"session_id": session["id"], "event": result})
        second, events = await wait_idle(mcp, session["id"], after=first["next_after"])
    assert second["stop_reason"] == {"type": "end_turn"}
    assert of_type(events, "agent.message")[0]["content"][0]["text"] == "It is sunny in Paris."
    sent = fake_api.requests[1]["messages"][-1]["content"][0]
    assert sent == {
        "type": "tool_result",
        "tool_use_id": call["id"],
        "content": [{"type": "text", "text": "sunny, 21C"}],
    }


async def test_interrupt_while_waiting_for_approval_ends_the_turn(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    fake_api.add(tool_use("bash", {"command": "echo x"}))
    async with open_mcp() as mcp:
        session = await setup_session(mcp, new_agent(tools=[ASK_BASH]))
        await say(mcp, session["id"], "Go.")
        first, _ = await wait_idle(mcp, session["id"])
        await mcp("interrupt_session", {"session_id": session["id"]})
        second, events = await wait_idle(mcp, session["id"], after=first["next_after"])
    assert second["stop_reason"] == {"type": "end_turn"}
    assert of_type(events, "agent.tool_result")[0]["content"][0]["text"].startswith("Interrupted")


# --------------------------------------------------------------------------- lifecycle


async def test_session_update_archive_and_delete(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    fake_api.add(tool_use("bash", {"command": "sleep 5"}), text("slept"))
    async with open_mcp() as mcp:
        session = await setup_session(mcp, new_agent())
        sid = session["id"]
        updated = await mcp(
            "update_session", {"session_id": sid, "title": "Renamed", "metadata": {"k": "v"}}
        )
        assert updated["title"] == "Renamed"
        assert updated["metadata"] == {"k": "v"}
        events = (await mcp("list_events", {"session_id": sid}))["data"]
        assert events[-1]["type"] == "session.updated"
        assert events[-1]["title"] == "Renamed"

        narrowed = await mcp(
            "update_session",
            {
                "session_id": sid,
                "agent": {
                    "tools": [
                        {
                            "type": "agent_toolset_20260401",
                            "default_config": {"enabled": False},
                            "configs": [{"name": "bash", "enabled": True}],
                        }
                    ]
                },
            },
        )
        enabled = [c["name"] for c in narrowed["agent"]["tools"][0]["configs"] if c["enabled"]]
        assert enabled == ["bash"]

        await mcp("send_message", {"session_id": sid, "text": "Sleep."})
        await wait_for_event(mcp, sid, "agent.tool_use")
        for tool in ("archive_session", "delete_session"):
            error = await mcp.error(tool, {"session_id": sid})
            assert "is running" in error
            assert "user.interrupt" in error
        error = await mcp.error("update_session", {"session_id": sid, "agent": {"tools": []}})
        assert "is running" in error
        await wait_idle(mcp, sid)
        assert fake_api.requests[0]["tools"] == [fake_api.requests[0]["tools"][0]]
        assert fake_api.requests[0]["tools"][0]["name"] == "bash"

        archived = await mcp("archive_session", {"session_id": sid})
        assert archived["archived_at"] is not None
        assert archived["status"] == "terminated"
        error = await mcp.error("send_message", {"session_id": sid, "text": "more"})
        assert "archived" in error
        last = await mcp("list_events", {"session_id": sid, "order": "desc", "limit": 1})
        assert last["data"][0]["type"] == "session.status_terminated"
        assert (await mcp("list_sessions", {}))["data"] == []
        listed = await mcp("list_sessions", {"include_archived": True})
        assert [s["id"] for s in listed["data"]] == [sid]

        env_id = session["environment_id"]
        error = await mcp.error("delete_environment", {"environment_id": env_id})
        assert "used by 1 session" in error

        deleted = await mcp("delete_session", {"session_id": sid})
        assert deleted == {"id": sid, "type": "session_deleted"}
        assert "not_found_error" in await mcp.error("get_session", {"session_id": sid})
        assert "not_found_error" in await mcp.error("list_events", {"session_id": sid})
        client = docker.from_env()
        try:
            assert not client.containers.list(all=True, filters={"name": f"ma-{sid}"})
        finally:
            client.close()
        assert (await mcp("delete_environment", {"environment_id": env_id}))["type"] == (
            "environment_deleted"
        )


async def test_agent_versions_and_conflicts_through_tools(
    open_mcp: OpenMCP, new_agent: AgentArgs
) -> None:
    async with open_mcp() as mcp:
        agent = await mcp("create_agent", new_agent(metadata={"team": "a"}))
        v2 = await mcp(
            "update_agent", {"agent_id": agent["id"], "version": 1, "system": "Be brief."}
        )
        assert v2["version"] == 2
        same = await mcp("update_agent", {"agent_id": agent["id"], "system": "Be brief."})
        assert same["version"] == 2
        error = await mcp.error(
            "update_agent", {"agent_id": agent["id"], "version": 1, "system": "Other."}
        )
        assert error.startswith("Error executing tool update_agent: invalid_request_error: ")
        assert "version conflict" in error
        versions = await mcp("list_agent_versions", {"agent_id": agent["id"]})
        assert [v["version"] for v in versions["data"]] == [2, 1]
        old = await mcp("get_agent", {"agent_id": agent["id"], "version": 1})
        assert old["system"] is None
        cleared = await mcp(
            "update_agent", {"agent_id": agent["id"], "system": "", "metadata": {"team": None}}
        )
        assert cleared["system"] is None
        assert cleared["metadata"] == {}
        assert cleared["version"] == 3


async def test_pinned_versions_overrides_and_initial_events(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    fake_api.add(text("v1 here"), text("overridden"))
    async with open_mcp() as mcp:
        agent = await mcp("create_agent", new_agent(system="version one"))
        await mcp("update_agent", {"agent_id": agent["id"], "system": "version two"})
        env = await mcp("create_environment", {"name": "pin-env"})
        pinned = await mcp(
            "start_session",
            {
                "agent": {"type": "agent", "id": agent["id"], "version": 1},
                "environment_id": env["id"],
                "initial_events": [{"type": "user.message", "content": "hi"}],
            },
        )
        assert pinned["agent"]["version"] == 1
        await wait_idle(mcp, pinned["id"])
        assert fake_api.requests[0]["system"].startswith("version one")

        overridden = await mcp(
            "start_session",
            {
                "agent": {"type": "agent_with_overrides", "id": agent["id"], "system": "pirate"},
                "environment_id": env["id"],
            },
        )
        assert overridden["agent"]["system"] == "pirate"
        assert overridden["agent"]["version"] == 2
        await say(mcp, overridden["id"], "hello")
        await wait_idle(mcp, overridden["id"])
        assert fake_api.requests[1]["system"].startswith("pirate")
        session = await mcp("get_session", {"session_id": overridden["id"]})
        assert session["stats"]["active_seconds"] > 0
        assert session["usage"]["active_seconds"] > 0
        assert session["stats"]["duration_seconds"] >= session["stats"]["active_seconds"]


# ------------------------------------------------------------------------------- files


async def test_files_upload_list_download_and_delete(open_mcp: OpenMCP, tmp_path: Path) -> None:
    source = tmp_path / "data.csv"
    source.write_text("a,b\n1,2\n")
    async with open_mcp() as mcp:
        by_path = await mcp("upload_file", {"path": str(source)})
        assert by_path["id"].startswith("file_")
        assert by_path["filename"] == "data.csv"
        assert by_path["size_bytes"] == 8
        assert by_path["mime_type"] == "text/csv"
        raw = bytes(range(256))
        by_content = await mcp(
            "upload_file",
            {"content_base64": base64.b64encode(raw).decode(), "filename": "blob.bin"},
        )
        listed = await mcp("list_files", {})
        assert [f["id"] for f in listed["data"]] == [by_content["id"], by_path["id"]]
        assert await mcp("get_file", {"file_id": by_path["id"]}) == by_path

        inline = await mcp("download_file", {"file_id": by_path["id"]})
        assert (inline["encoding"], inline["content"]) == ("utf-8", "a,b\n1,2\n")
        binary = await mcp("download_file", {"file_id": by_content["id"]})
        assert base64.b64decode(binary["content"]) == raw
        target = tmp_path / "out.bin"
        saved = await mcp("download_file", {"file_id": by_content["id"], "path": str(target)})
        assert saved["path"] == str(target)
        assert target.read_bytes() == raw
        again = await mcp.error("download_file", {"file_id": by_content["id"], "path": str(target)})
        assert "already exists" in again

        await mcp("delete_file", {"file_id": by_content["id"]})
        assert "not_found_error" in await mcp.error("get_file", {"file_id": by_content["id"]})

        secret = tmp_path / ".env"
        secret.write_text("API_KEY=x")
        error = await mcp.error("upload_file", {"path": str(secret)})
        assert "refusing to upload" in error
        assert "invalid_request_error" in await mcp.error("upload_file", {"path": "rel.txt"})
        both = await mcp.error(
            "upload_file", {"path": str(source), "content_base64": "AA==", "filename": "x"}
        )
        assert "exactly one" in both


async def test_upload_over_the_size_limit_is_refused(open_mcp: OpenMCP, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 2048)
    async with open_mcp(max_upload_bytes=1024) as mcp:
        error = await mcp.error("upload_file", {"path": str(big)})
        assert "request_too_large" in error
        assert "upload limit" in error
        assert (await mcp("list_files", {}))["data"] == []


async def test_mounted_files_are_read_only_copies_at_their_mount_paths(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs, tmp_path: Path
) -> None:
    (tmp_path / "input.csv").write_text("x,y\n")
    (tmp_path / "more.txt").write_text("more\n")
    fake_api.add(
        tool_use(
            "bash",
            {
                "command": "cat /mnt/session/uploads/data/input.csv /mnt/session/uploads/file_*;"
                " echo hack > /mnt/session/uploads/data/input.csv; ls -l "
                "/mnt/session/uploads/data"
            },
        ),
        text("read them"),
    )
    async with open_mcp() as mcp:
        first = await mcp("upload_file", {"path": str(tmp_path / "input.csv")})
        second = await mcp("upload_file", {"path": str(tmp_path / "more.txt")})
        agent = await mcp("create_agent", new_agent())
        env = await mcp("create_environment", {"name": "mount-env"})

        bad = await mcp.error(
            "start_session",
            {
                "agent": agent["id"],
                "environment_id": env["id"],
                "resources": [{"type": "file", "file_id": first["id"], "mount_path": "../x"}],
            },
        )
        assert "mount_path" in bad
        missing = await mcp.error(
            "start_session",
            {
                "agent": agent["id"],
                "environment_id": env["id"],
                "resources": [{"type": "file", "file_id": "file_nope"}],
            },
        )
        assert "not_found_error" in missing
        assert (await mcp("list_sessions", {}))["data"] == []

        session = await mcp(
            "start_session",
            {
                "agent": agent["id"],
                "environment_id": env["id"],
                "resources": [
                    {"type": "file", "file_id": first["id"], "mount_path": "/data/input.csv"}
                ],
            },
        )
        (resource,) = session["resources"]
        assert resource["mount_path"] == "/mnt/session/uploads/data/input.csv"
        assert resource["file_id"] != first["id"]
        scoped = await mcp("get_file", {"file_id": resource["file_id"]})
        assert scoped["scope"] == {"type": "session", "id": session["id"]}

        added = await mcp(
            "add_session_resource", {"session_id": session["id"], "file_id": second["id"]}
        )
        assert added["mount_path"] == f"/mnt/session/uploads/{second['id']}"
        clash = await mcp.error(
            "add_session_resource",
            {
                "session_id": session["id"],
                "file_id": second["id"],
                "mount_path": "/mnt/session/uploads/data/input.csv",
            },
        )
        assert "collides" in clash

        await say(mcp, session["id"], "Read the inputs.")
        _, events = await wait_idle(mcp, session["id"])
        output = of_type(events, "agent.tool_result")[0]["content"][0]["text"]
        assert output.startswith("x,y\nmore\n"), output
        assert "Permission denied" in output
        assert "-r--r--r-- 1 root root" in output

        listed = await mcp("list_session_resources", {"session_id": session["id"]})
        assert [r["id"] for r in listed["data"]] == [resource["id"], added["id"]]
        await mcp(
            "delete_session_resource", {"session_id": session["id"], "resource_id": added["id"]}
        )
        gone = await mcp.error(
            "read_file",
            {"session_id": session["id"], "path": f"/mnt/session/uploads/{second['id']}"},
        )
        assert "not_found_error" in gone
        assert "in use" not in await mcp.error("get_file", {"file_id": added["file_id"]})


async def test_outputs_become_session_files_that_outlive_the_container(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    fake_api.add(
        tool_use(
            "bash",
            {
                "command": "mkdir -p /mnt/session/outputs/charts && "
                "printf 'total: 3\\n' > /mnt/session/outputs/report.txt && "
                "printf 'png' > /mnt/session/outputs/charts/plot.png"
            },
        ),
        text("Report written."),
        tool_use("bash", {"command": "printf 'total: 4\\n' > /mnt/session/outputs/report.txt"}),
        text("Updated."),
    )
    async with open_mcp() as mcp:
        session = await setup_session(mcp, new_agent())
        await say(mcp, session["id"], "Write a report.")
        first, _ = await wait_idle(mcp, session["id"])
        files = (await mcp("list_files", {"scope_id": session["id"]}))["data"]
        by_name = {f["filename"]: f for f in files}
        assert set(by_name) == {"report.txt", "charts_plot.png"}
        assert by_name["report.txt"]["scope"] == {"type": "session", "id": session["id"]}
        assert by_name["charts_plot.png"]["mime_type"] == "image/png"

        await say(mcp, session["id"], "Update it.")
        await wait_idle(mcp, session["id"], after=first["next_after"])
        files = (await mcp("list_files", {"scope_id": session["id"]}))["data"]
        assert len(files) == 2
        report = next(f for f in files if f["filename"] == "report.txt")
        assert report["id"] == by_name["report.txt"]["id"]

        client = docker.from_env()
        try:
            client.containers.get(f"ma-{session['id']}").remove(force=True)
        finally:
            client.close()
        content = await mcp("download_file", {"file_id": report["id"]})
        assert content["content"] == "total: 4\n"
        assert (await mcp("list_files", {}))["data"]


async def test_image_blocks_may_reference_uploaded_files(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs, tmp_path: Path
) -> None:
    png = tmp_path / "pixel.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n-fake")
    fake_api.add(text("I see a pixel."))
    async with open_mcp() as mcp:
        uploaded = await mcp("upload_file", {"path": str(png)})
        session = await setup_session(mcp, new_agent())
        event = {
            "type": "user.message",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "source": {"type": "file", "file_id": uploaded["id"]}},
            ],
        }
        await mcp("send_event", {"session_id": session["id"], "event": event})
        await wait_idle(mcp, session["id"])
        unknown = dict(event)
        unknown["content"] = [{"type": "image", "source": {"type": "file", "file_id": "file_x"}}]
        error = await mcp.error("send_event", {"session_id": session["id"], "event": unknown})
    assert "unknown file file_x" in error
    image = fake_api.requests[0]["messages"][0]["content"][1]
    assert image["source"]["type"] == "base64"
    assert image["source"]["media_type"] == "image/png"
    assert base64.b64decode(image["source"]["data"]) == png.read_bytes()


async def test_a_refusal_ends_the_turn_with_its_stop_reason(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    fake_api.add(text("I can't help with that.", stop_reason="refusal"))
    async with open_mcp() as mcp:
        session = await setup_session(mcp, new_agent())
        await say(mcp, session["id"], "Something bad.")
        answer, events = await wait_idle(mcp, session["id"])
    assert answer["stop_reason"] == {"type": "refusal"}
    assert of_type(events, "agent.message")
    assert of_type(events, "session.usage")


# --------------------------------------------------------------------------- runaway caps


@pytest.mark.parametrize(
    ("overrides", "budget", "tool_results"),
    [
        ({"max_tool_calls": 3}, "3 tool calls", 3),
        ({"max_model_requests": 4}, "4 model requests", 4),
    ],
)
async def test_a_runaway_agent_stops_at_its_budget_with_a_clear_reason(
    open_mcp: OpenMCP,
    fake_api: FakeMessagesAPI,
    new_agent: AgentArgs,
    overrides: dict[str, int],
    budget: str,
    tool_results: int,
) -> None:
    fake_api.set_default(lambda _body: tool_use("bash", {"command": "true"}))
    async with open_mcp(**overrides) as mcp:
        session = await setup_session(mcp, new_agent())
        await say(mcp, session["id"], "Loop forever.")
        answer, events = await wait_idle(mcp, session["id"])
        assert answer["stop_reason"] == {"type": "budget_reached"}
        [error] = of_type(events, "session.error")
        assert error["error"]["type"] == "tool_use_limit_reached_error"
        assert budget in error["error"]["message"]
        results = of_type(events, "agent.tool_result")
        ran = [r for r in results if not r.get("is_error")]
        assert len(ran) == tool_results
        # every call the model made has an answer, so the next message can continue
        assert len(results) == len(of_type(events, "agent.tool_use"))

        # the budget is per user message: the next one gets a fresh allowance
        fake_api.set_default(None)
        fake_api.add(text("Stopped."))
        await say(mcp, session["id"], "Please stop now.")
        answer, _ = await wait_idle(mcp, session["id"], after=answer["next_after"])
        assert answer["stop_reason"] == {"type": "end_turn"}
