"""Delegate one task to a sub-agent through the MCP tools, over stdio, and print its answer.

    ANTHROPIC_API_KEY=sk-ant-... uv run python examples/delegate.py "Write fizzbuzz.py and run it"

Needs Docker (or bubblewrap) and the sandbox image (`uv run managed-agents-mcp image build`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio
from mcp import Client, StdioServerParameters

PASSED = ("ANTHROPIC_", "MANAGED_AGENTS_", "DOCKER_")


async def main(task: str) -> None:
    env = {k: v for k, v in os.environ.items() if k.startswith(PASSED)}
    env |= {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "")}
    params = StdioServerParameters(command=sys.executable, args=["-m", "server", "serve"], env=env)
    async with Client(params) as client:

        async def call(name: str, args: dict[str, Any]) -> Any:
            result = await client.call_tool(name, args)
            if result.is_error:
                raise SystemExit(f"{name}: {result.content[0].text}")  # type: ignore[union-attr]
            return result.structured_content

        result = await call("run_task", {"prompt": task, "wait_s": 40})
        after = result["next_after"]
        while not result["done"]:
            result = await call(
                "wait_for_session",
                {"session_id": result["session_id"], "after": after, "timeout_s": 40},
            )
            for event in result["events"]:
                if event["type"] == "agent.tool_use":
                    print("  $", json.dumps(event["input"])[:200])
            after = result["next_after"]
        answer = result.get("answer")
        if answer is None:
            listed = await call(
                "list_events",
                {
                    "session_id": result["session_id"],
                    "types": ["agent.message"],
                    "order": "desc",
                    "limit": 1,
                },
            )
            answer = listed["data"][0]["content"][0]["text"] if listed["data"] else "(no answer)"
        print(answer)


if __name__ == "__main__":
    anyio.run(main, " ".join(sys.argv[1:]) or "Say hello from your sandbox.")
