"""The one-call delegation tool: `run_task`."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

from server.core.models import AgentSelector
from server.present import final_answer

from ._common import (
    RUNS_AGENT,
    IdempotencyKey,
    ProgressReporter,
    last_stop_reason,
    services,
    tool_errors,
)
from ._schemas import RunTaskOutput
from .resources import announce_new_session

MAX_WAIT_S = 45.0


def register(mcp: MCPServer) -> None:
    @mcp.tool(title="Run task", annotations=RUNS_AGENT)
    async def run_task(
        ctx: Context,
        prompt: Annotated[
            str,
            Field(
                min_length=1,
                description="The task for the sub-agent, with all the context it "
                "needs (it cannot see this conversation).",
            ),
        ],
        agent: Annotated[
            AgentSelector | None,
            Field(
                description="An agent id or `{type: agent, id, version}`; default: a built-in "
                "agent with all the sandbox tools."
            ),
        ] = None,
        environment_id: Annotated[
            str | None,
            Field(
                description="Environment to run in; default: a built-in one (default image, "
                "public internet through the egress proxy)."
            ),
        ] = None,
        files: Annotated[
            list[str] | None,
            Field(
                description="Absolute host paths to upload; they appear read-only under "
                "/mnt/session/uploads/<name>."
            ),
        ] = None,
        wait_s: Annotated[
            float, Field(ge=0, le=MAX_WAIT_S, description="Seconds to wait for the answer (≤45).")
        ] = 40.0,
        title: str | None = None,
        idempotency_key: IdempotencyKey = None,
    ) -> RunTaskOutput:
        """Delegate a task to a sandboxed sub-agent in one call: the easiest way to use this server.

        Starts a session, sends the prompt and waits up to `wait_s`. If the sub-agent finishes
        in time you get its `answer` and `output_files`; otherwise `done` is false and you
        continue with `wait_for_session(session_id, after=next_after)` until it is done. Use
        `send_message` on the same session for follow-ups.
        """
        with tool_errors():
            result = await services(ctx).tasks.run(
                prompt,
                agent=agent,
                environment_id=environment_id,
                files=files or (),
                title=title,
                wait_s=min(wait_s, MAX_WAIT_S),
                idempotency_key=idempotency_key,
                on_events=ProgressReporter(ctx),
            )
        await announce_new_session(ctx)
        session = result["session"]
        events = result["events"]
        done = result["done"]
        stop = last_stop_reason(events) if done else None
        if not done:
            step = (
                f"call wait_for_session(session_id={session['id']!r}, after="
                f"{result['next_after']!r}) until done"
            )
        elif stop and stop.get("type") == "requires_action":
            step = (
                "the sub-agent is waiting for you: answer the events in stop_reason.event_ids "
                "with send_event (user.tool_confirmation or user.custom_tool_result)"
            )
        else:
            step = "done; use send_message on this session for follow-ups"
        return RunTaskOutput(
            session_id=session["id"],
            status=session["status"],
            done=done,
            answer=final_answer(events) if done else None,
            stop_reason=stop,
            output_files=result["output_files"],
            next_after=result["next_after"],
            next_step=step,
        )
