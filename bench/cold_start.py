"""Case 5: a fresh `python -m server serve` until it answers `tools/list` over stdio."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters

from .common import Bench, elapsed_ms
from .results import Case


def _params(bench: Bench, home: Path) -> StdioServerParameters:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", str(home)),
        "MANAGED_AGENTS_HOME": str(home),
        "MANAGED_AGENTS_IMAGE": bench.image,
        "MANAGED_AGENTS_LOG_LEVEL": "WARNING",
        "ANTHROPIC_API_KEY": "bench-key",
        "ANTHROPIC_BASE_URL": bench.fake.url,
    }
    if bench.docker_host:
        env["DOCKER_HOST"] = bench.docker_host
    return StdioServerParameters(
        command=sys.executable, args=["-m", "server", "serve"], env=env, cwd=Path.cwd()
    )


async def run(bench: Bench, case: Case) -> None:
    ready, listed, closed = [], [], []
    tools = 0
    for i in range(bench.counts.cold_start_n):
        home = bench.scratch(f"cold-start-{i}")
        with anyio.fail_after(60):
            started = time.perf_counter()
            async with Client(_params(bench, home)) as client:
                ready.append(elapsed_ms(started))
                tools = len((await client.list_tools()).tools)
                listed.append(elapsed_ms(started))
                leaving = time.perf_counter()
            closed.append(elapsed_ms(leaving))
    row = "spawn → first tools/list answer"
    case.add(row, "ms", listed, f"fresh MANAGED_AGENTS_HOME each time; {tools} tools listed")
    case.add("  of which spawn → initialize answered", "ms", ready)
    case.add("client closes stdin → server process gone", "ms", closed)
