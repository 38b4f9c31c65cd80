"""Case 2: what one `bash true` costs through the whole agent loop, against its floors."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from typing import Any

import anyio
import anyio.to_thread

from sandbox.base import Sandbox
from sandbox.bubblewrap import BubblewrapBackend
from sandbox.docker import DockerBackend
from server.app import Services

from .common import (
    Bench,
    agent_and_environment,
    elapsed_ms,
    new_session,
    run_to_idle,
    say,
    session_sandbox,
)
from .results import Case

WARM_UP = 3


async def _loop(bench: Bench, services: Services) -> tuple[list[float], float, str]:
    """One turn of N scripted `bash true` calls: per-call ms (between model requests), wall
    ms per call (send → idle / N), and the session id."""
    n = bench.counts.tool_calls
    agent, env = await agent_and_environment(services)
    session_id = await new_session(services, agent, env)
    await session_sandbox(services, session_id)
    bench.script.reset(n)
    started = time.perf_counter()
    await say(services, session_id)
    events = await run_to_idle(services, session_id, limit=60 + n)
    wall = elapsed_ms(started) / n
    arrivals = list(bench.script.arrivals)
    results = [e for e in events if e["type"] == "agent.tool_result"]
    failed = [r for r in results if r.get("is_error")]
    if len(results) != n or failed or len(arrivals) != n + 1:
        msg = f"expected {n} clean tool results, got {len(results)} ({failed[:1]})"
        raise RuntimeError(msg)
    # Request k+1 arrives once call k has run and its result is stored: one full iteration.
    per_call = [(b - a) * 1000 for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return per_call, wall, session_id


async def _timed(fn: Any, n: int) -> list[float]:
    """n timings (ms) of `await fn()`, after a few discarded warm-up calls."""
    for _ in range(WARM_UP):
        await fn()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await fn()
        samples.append(elapsed_ms(started))
    return samples


def _docker_exec_samples(bench: Bench, container: str, n: int) -> list[float]:
    client = bench.docker()
    try:
        target = client.containers.get(container)
        samples = []
        for i in range(n + WARM_UP):
            started = time.perf_counter()
            result = target.exec_run(["true"])
            if i >= WARM_UP:
                samples.append(elapsed_ms(started))
            assert result.exit_code == 0, result
        return samples
    finally:
        client.close()


def _spawn_samples(n: int) -> tuple[list[float], list[float]]:
    true = shutil.which("true") or "/bin/true"
    spawn, run = [], []
    for i in range(n + WARM_UP):
        started = time.perf_counter()
        pid = os.posix_spawn(true, [true], os.environ)
        os.waitpid(pid, 0)
        spawned = elapsed_ms(started)
        started = time.perf_counter()
        subprocess.run([true], check=True)
        ran = elapsed_ms(started)
        if i >= WARM_UP:
            spawn.append(spawned)
            run.append(ran)
    return spawn, run


async def _shell_true(sandbox: Sandbox) -> None:
    result = await sandbox.run_shell("true", timeout=30)
    assert result.exit_code == 0, result


async def _exec_true(sandbox: Sandbox) -> None:
    result = await sandbox.exec(["true"])
    assert result.exit_code == 0, result


async def run(bench: Bench, case: Case) -> None:
    counts = bench.counts
    bwrap = BubblewrapBackend(bench.bwrap_root("bwrap-toolcall"))
    async with (
        bench.services("toolcall-docker", DockerBackend(bench.docker_host)) as docker,
        bench.services("toolcall-bwrap", bwrap, sandbox="bubblewrap") as local,
    ):
        loop_docker, wall_docker, docker_session = await _loop(bench, docker)
        loop_bwrap, wall_bwrap, bwrap_session = await _loop(bench, local)
        docker_box = await session_sandbox(docker, docker_session)
        bwrap_box = await session_sandbox(local, bwrap_session)
        record = await docker.store.require(docker_session)
        container = record.sandbox_id or f"ma-{docker_session}"

        raw_exec = await anyio.to_thread.run_sync(
            _docker_exec_samples, bench, container, counts.exec_n
        )
        our_exec = await _timed(lambda: _exec_true(docker_box), counts.exec_n)
        shell_docker = await _timed(lambda: _shell_true(docker_box), counts.floor_n)
        shell_bwrap = await _timed(lambda: _shell_true(bwrap_box), counts.floor_n)
        spawn, run_true = await anyio.to_thread.run_sync(_spawn_samples, counts.floor_n)
        await docker.sessions.delete(docker_session)
        await local.sessions.delete(bwrap_session)

    n = counts.tool_calls
    loop_row = f"whole loop, Docker: one `bash true` per model call ({n} in one turn)"
    exec_row = "raw `docker exec true` (docker-py exec_run)"
    shell_row = "persistent shell channel alone: run_shell('true'), Docker"
    floor_row = "host floor: posix_spawn + waitpid of `true`"
    tail = max(1, len(loop_docker) // 10)
    case.add(
        loop_row,
        "ms",
        loop_docker,
        "between consecutive model requests: SSE reply parsed, tool_use stored, command run, "
        "tool_result stored, history rebuilt from the log, next request sent",
        wall_per_call_ms=wall_docker,
        first_tenth_median_ms=statistics.median(loop_docker[:tail]),
        last_tenth_median_ms=statistics.median(loop_docker[-tail:]),
    )
    case.add(
        f"whole loop, bubblewrap: one `bash true` per model call ({n} in one turn)",
        "ms",
        loop_bwrap,
        wall_per_call_ms=wall_bwrap,
    )
    case.add(exec_row, "ms", raw_exec, "a fresh exec per command, as most Docker sandboxes do")
    case.add("one-shot DockerSandbox.exec(['true']) (our hijacked exec)", "ms", our_exec)
    case.add(shell_row, "ms", shell_docker, "one long-lived `docker exec` socket per session")
    case.add("persistent shell channel alone: run_shell('true'), bubblewrap", "ms", shell_bwrap)
    case.add(floor_row, "ms", spawn)
    case.add("host: subprocess.run(['true'])", "ms", run_true)
    loop_median, exec_median = case.median(loop_row), case.median(exec_row)
    if loop_median is not None and exec_median is not None:
        case.compare(
            "whole loop − raw docker exec (medians)",
            loop_median - exec_median,
            "ms",
            "negative: the whole loop costs less than one fresh docker exec",
        )
    case.ratio("whole loop / raw docker exec", loop_row, exec_row)
    shell_median = case.median(shell_row)
    if loop_median is not None and shell_median is not None:
        case.compare(
            "loop overhead beyond the shell channel (medians)",
            loop_median - shell_median,
            "ms",
            "model round trip on loopback, event appends, history rebuild",
        )
    case.ratio("raw docker exec / persistent shell", exec_row, shell_row)
    case.ratio("persistent shell (Docker) / host floor", shell_row, floor_row)
    case.notes.append(
        f"whole loop (Docker) per call, median of the turn's first tenth "
        f"{case.rows[0].extra['first_tenth_median_ms']:.1f} ms, of its last tenth "
        f"{case.rows[0].extra['last_tenth_median_ms']:.1f} ms (each model request rebuilds the "
        "conversation from the log)"
    )
