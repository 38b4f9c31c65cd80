"""Delegate one task to a sub-agent through the MCP tools, over stdio, and print its answer.

    ANTHROPIC_API_KEY=sk-ant-... uv run python examples/delegate.py "Write fizzbuzz.py and run it"

Needs Docker and the sandbox image (`uv run managed-agents-mcp image build`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio
from mcp import Client, StdioServerParameters


async def main(task: str) -> None:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "server", "serve"],
        env={
            k: v
            for k, v in os.environ.items()
            if k.startswith(("ANTHROPIC_", "MANAGED_AGENTS_", "DOCKER_"))
        }
        | {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "")},
    )
    async with Client(params) as client:

        async def call(name: str, args: dict[str, Any]) -> Any:
            result = await client.call_tool(name, args)
            if result.is_error:
                raise SystemExit(f"{name}: {result.content[0].text}")  # type: ignore[union-attr]
            return result.structured_content

        agents = await call("list_agents", {})
        agent = next(
            (a for a in agents["data"] if a["name"] == "example-worker"), None
        ) or await call(
            "create_agent",
            {
                "name": "example-worker",
                "model": "claude-sonnet-4-6",
                "tools": [{"type": "agent_toolset_20260401"}],
            },
        )
        envs = await call("list_environments", {})
        env = next((e for e in envs["data"] if e["name"] == "example-env"), None) or await call(
            "create_environment", {"name": "example-env"}
        )
        session = await call("start_session", {"agent": agent["id"], "environment_id": env["id"]})
        await call(
            "send_event",
            {"session_id": session["id"], "event": {"type": "user.message", "content": task}},
        )
        after = None
        while True:
            args: dict[str, Any] = {"session_id": session["id"], "timeout_s": 30}
            if after:
                args["after"] = after
            answer = await call("wait_for_session", args)
            for event in answer["events"]:
                if event["type"] == "agent.message":
                    print(event["content"][0]["text"])
                elif event["type"] == "agent.tool_use":
                    print("  $", json.dumps(event["input"])[:200])
            after = answer["next_after"]
            if answer["done"]:
                break


if __name__ == "__main__":
    anyio.run(main, " ".join(sys.argv[1:]) or "Say hello from your sandbox.")
