"""Sessions end to end through the MCP tools: real containers, real anthropic SDK, fake API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from tests.conftest import OpenMCP
from tests.fakes.messages_api import ErrorReply, FakeMessagesAPI, text, tool_use
from tests.server.helpers import of_type, say, setup_session, wait_for_event, wait_idle

pytestmark = [pytest.mark.asyncio, pytest.mark.docker]
AgentArgs = Callable[..., dict[str, Any]]


async def test_scripted_bash_conversation_writes_a_file_the_client_can_read(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    async with open_mcp() as mcp:
        fake_api.add(
            tool_use("bash", {"command": "echo 'hello from the sandbox' > greeting.txt && pwd"}),
            text("I wrote greeting.txt in /workspace."),
        )
        session = await setup_session(mcp, new_agent())
        assert session["status"] == "idle"
        sent = await say(mcp, session["id"], "Write a greeting file.")
        assert sent["type"] == "user.message"
        assert sent["processed_at"] is None

        answer, events = await wait_idle(mcp, session["id"])

        assert answer["status"] == "idle"
        assert answer["stop_reason"] == {"type": "end_turn"}
        assert [e["type"] for e in events] == [
            "user.message",
            "session.status_running",
            "span.model_request_start",
            "span.model_request_end",
            "agent.tool_use",
            "agent.tool_result",
            "span.model_request_start",
            "agent.message",
            "span.model_request_end",
            "session.usage",
            "session.status_idle",
        ]
        (result,) = of_type(events, "agent.tool_result")
        assert result["content"] == [{"type": "text", "text": "/workspace\n"}]
        assert result["is_error"] is False
        assert of_type(events, "agent.message")[0]["content"][0]["text"].startswith("I wrote")
        assert events[0]["processed_at"] is not None

        # The model got the tool result back, tied to its tool_use.
        second_request = fake_api.requests[1]
        tool_result = second_request["messages"][-1]["content"][0]
        assert tool_result["type"] == "tool_result"
        assert tool_result["tool_use_id"] == of_type(events, "agent.tool_use")[0]["id"]

        file = await mcp("read_file", {"session_id": session["id"], "path": "greeting.txt"})
        assert file == {
            "path": "/workspace/greeting.txt",
            "size": 23,
            "offset": 0,
            "content": "hello from the sandbox\n",
            "next_offset": None,
            "remaining": 0,
        }
        usage = (await mcp("get_session", {"session_id": session["id"]}))["usage"]
        assert usage["input_tokens"] == 20
        assert usage["output_tokens"] == 10
        fake_api.assert_complete()


async def test_second_turn_sees_the_first_turns_files_and_history(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    async with open_mcp() as mcp:
        fake_api.add(
            tool_use("write", {"file_path": "notes/todo.md", "content": "- ship it\n"}),
            text("Saved."),
            tool_use("bash", {"command": "cat notes/todo.md"}),
            text("It says ship it."),
        )
        session = await setup_session(mcp, new_agent())
        await say(mcp, session["id"], "Save a todo.")
        first, _ = await wait_idle(mcp, session["id"])
        await say(mcp, session["id"], "What does it say?")
        _, events = await wait_idle(mcp, session["id"], after=first["next_after"])

        (result,) = of_type(events, "agent.tool_result")
        assert result["content"][0]["text"] == "- ship it\n"
        history = fake_api.requests[2]["messages"]
        assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant", "user"]
        assert history[-1]["content"] == [{"type": "text", "text": "What does it say?"}]


async def test_interrupt_stops_a_long_command_and_the_session_goes_idle(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    async with open_mcp() as mcp:
        fake_api.add(
            tool_use("bash", {"command": "sleep 120"}),
            tool_use("bash", {"command": "ps -eo args | grep -c '^sleep 120' || true"}),
            text("No sleep left."),
        )
        session = await setup_session(mcp, new_agent())
        await say(mcp, session["id"], "Sleep for a while.")
        await wait_for_event(mcp, session["id"], "agent.tool_use")

        with anyio.fail_after(20):
            await mcp(
                "send_event", {"session_id": session["id"], "event": {"type": "user.interrupt"}}
            )
            answer, events = await wait_idle(mcp, session["id"])

        assert answer["stop_reason"] == {"type": "end_turn"}
        (result,) = of_type(events, "agent.tool_result")
        assert result["is_error"] is True
        assert "Interrupted" in result["content"][0]["text"]
        (interrupt,) = of_type(events, "user.interrupt")
        listed = await mcp(
            "list_events", {"session_id": session["id"], "types": ["user.interrupt"]}
        )
        assert listed["data"][0]["id"] == interrupt["id"]
        assert listed["data"][0]["processed_at"] is not None

        # The killed command is really gone, and the session works on.
        await say(mcp, session["id"], "Check.")
        _, events = await wait_idle(mcp, session["id"], after=answer["next_after"])
        assert of_type(events, "agent.tool_result")[0]["content"][0]["text"].strip() == "0"


async def test_failing_command_goes_back_to_the_model_as_an_error_result(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    async with open_mcp() as mcp:
        fake_api.add(
            tool_use("bash", {"command": "echo nope >&2; exit 3"}),
            tool_use("read", {"file_path": "/workspace/missing.txt"}),
            text("Both failed."),
        )
        session = await setup_session(mcp, new_agent())
        await say(mcp, session["id"], "Try things.")
        answer, events = await wait_idle(mcp, session["id"])

        assert answer["stop_reason"] == {"type": "end_turn"}
        bash_result, read_result = of_type(events, "agent.tool_result")
        assert bash_result["is_error"] is True
        assert bash_result["content"][0]["text"].startswith("nope\n")
        assert "[the shell exited" in bash_result["content"][0]["text"]
        assert read_result["is_error"] is True
        assert "no such file" in read_result["content"][0]["text"]
        sent_back = fake_api.requests[1]["messages"][-1]["content"][0]
        assert sent_back["is_error"] is True


async def test_long_output_is_truncated_with_a_marker(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    async with open_mcp() as mcp:
        fake_api.add(tool_use("bash", {"command": "seq 1 300000"}), text("Lots."))
        session = await setup_session(mcp, new_agent())
        await say(mcp, session["id"], "Count.")
        await wait_idle(mcp, session["id"])
        # Stored events come whole through list_events (wait_for_session clips huge ones).
        listed = await mcp(
            "list_events", {"session_id": session["id"], "types": ["agent.tool_result"]}
        )
        output = listed["data"][0]["content"][0]["text"]
        assert output.startswith("1\n2\n")
        assert "bytes of output truncated" in output
        assert output.rstrip().endswith("300000")
        assert len(output) < 110 * 1024


async def test_overloaded_model_is_retried_and_the_turn_completes(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    async with open_mcp() as mcp:
        fake_api.add(
            ErrorReply(529, "overloaded_error", headers={"retry-after-ms": "1"}),
            text("Hello after a retry."),
        )
        session = await setup_session(mcp, new_agent())
        await say(mcp, session["id"], "Hi.")
        answer, events = await wait_idle(mcp, session["id"])

        assert answer["stop_reason"] == {"type": "end_turn"}
        (error,) = of_type(events, "session.error")
        assert error["error"]["type"] == "model_overloaded_error"
        assert error["error"]["retry_status"] == {"type": "retrying"}
        assert of_type(events, "session.status_rescheduled")
        assert of_type(events, "agent.message")[0]["content"][0]["text"] == "Hello after a retry."


async def test_exhausted_retries_end_the_turn_and_keep_the_message(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    async with open_mcp() as mcp:
        fake_api.add(*[ErrorReply(429, "rate_limit_error") for _ in range(5)])
        session = await setup_session(mcp, new_agent())
        await say(mcp, session["id"], "Hi.")
        answer, events = await wait_idle(mcp, session["id"])

        assert answer["stop_reason"] == {"type": "retries_exhausted"}
        errors = of_type(events, "session.error")
        assert [e["error"]["retry_status"]["type"] for e in errors] == ["retrying"] * 4 + [
            "exhausted"
        ]
        assert of_type(events, "user.message")[0]["processed_at"] is not None


async def test_a_message_sent_mid_turn_steers_the_next_model_call(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    fake_api.add(tool_use("bash", {"command": "sleep 2"}), text("Done, noted the extra ask."))
    async with open_mcp() as mcp:
        session = await setup_session(mcp, new_agent())
        await say(mcp, session["id"], "First.")
        await wait_for_event(mcp, session["id"], "agent.tool_use")
        await say(mcp, session["id"], "Also this.")
        _, events = await wait_idle(mcp, session["id"])

    assert len(of_type(events, "session.status_idle")) == 1
    second_call = fake_api.requests[1]["messages"][-1]["content"]
    assert [b["type"] for b in second_call] == ["tool_result", "text"]
    assert second_call[1] == {"type": "text", "text": "Also this."}
    fake_api.assert_complete()


async def test_bad_input_gets_errors_that_say_what_to_do(
    open_mcp: OpenMCP, new_agent: AgentArgs
) -> None:
    async with open_mcp() as mcp:
        error = await mcp.error("get_agent", {"agent_id": "agent_nope"})
        assert "not_found_error" in error
        assert "list_agents" in error

        agent = await mcp("create_agent", new_agent())
        env = await mcp("create_environment", {"name": "bad-input-env"})
        error = await mcp.error(
            "start_session", {"agent": "agent_nope", "environment_id": env["id"]}
        )
        assert "not_found_error" in error
        error = await mcp.error("start_session", {"agent": agent["id"], "environment_id": "env_x"})
        assert "not_found_error: environment env_x not found" in error

        await mcp("archive_agent", {"agent_id": agent["id"]})
        error = await mcp.error(
            "start_session", {"agent": agent["id"], "environment_id": env["id"]}
        )
        assert "archived" in error
        sessions = await mcp("list_sessions", {})
        assert sessions["data"] == []  # nothing half-created

        error = await mcp.error("create_agent", {"model": "claude-sonnet-4-6"})
        assert "name" in error
        assert "Traceback" not in error

        error = await mcp.error("create_environment", {"name": "bad-input-env"})
        assert "already exists" in error


async def test_read_file_refuses_paths_outside_the_session_files(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    async with open_mcp() as mcp:
        fake_api.add(tool_use("bash", {"command": "ln -s /etc/passwd leak"}), text("ok"))
        session = await setup_session(mcp, new_agent())
        await say(mcp, session["id"], "Make a link.")
        await wait_idle(mcp, session["id"])

        for path in ("/etc/passwd", "../etc/passwd", "/workspace/../etc/shadow", "a\x00b"):
            error = await mcp.error("read_file", {"session_id": session["id"], "path": path})
            assert "invalid_request_error" in error
        error = await mcp.error("read_file", {"session_id": session["id"], "path": "leak"})
        assert "outside the allowed directories" in error
        error = await mcp.error("read_file", {"session_id": session["id"], "path": "nothing.txt"})
        assert "not_found_error" in error


async def test_list_events_pages_through_the_log(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    async with open_mcp() as mcp:
        fake_api.add(text("one"))
        session = await setup_session(mcp, new_agent())
        await say(mcp, session["id"], "Hi.")
        _, events = await wait_idle(mcp, session["id"])

        seen: list[str] = []
        page: str | None = None
        while True:
            args: dict[str, Any] = {"session_id": session["id"], "limit": 2}
            if page:
                args["page"] = page
            result = await mcp("list_events", args)
            seen.extend(e["id"] for e in result["data"])
            page = result["next_page"]
            if page is None:
                break
        assert seen == [e["id"] for e in events]
        newest = await mcp(
            "list_events", {"session_id": session["id"], "order": "desc", "limit": 1}
        )
        assert newest["data"][0]["type"] == "session.status_idle"
        error = await mcp.error(
            "list_events", {"session_id": session["id"], "order": "asc", "page": "page_garbage"}
        )
        assert "invalid_request_error" in error
