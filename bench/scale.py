"""Case 4: idle sessions one machine holds (memory each), and 50 sessions working at once."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from sandbox.docker import DockerBackend
from server.app import Services
from server.core.clock import parse_time

from .common import (
    Bench,
    agent_and_environment,
    delete_sessions,
    elapsed_ms,
    mem_available_kib,
    new_session,
    run_to_idle,
    say,
)
from .results import Case, percentile

CREATE_WIDTH = 4
"""Sessions created at once: about what 2 cores sustain (container start is CPU-bound)."""


def _pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _container_memory(bench: Bench, names: list[str]) -> tuple[list[float], list[float], int]:
    """Per container: cgroup memory as `docker stats` shows it (MiB), its containerd-shim's PSS
    (MiB); and how many are running."""
    client = bench.docker()
    usage, shims, running = [], [], 0
    try:
        for name in names:
            container = client.containers.get(name)
            running += container.status == "running"
            stats: dict[str, Any] = container.stats(stream=False, one_shot=True)
            memory = stats.get("memory_stats") or {}
            details = memory.get("stats") or {}
            # What `docker stats` prints: usage less inactive page cache (cgroup v1 or v2 key).
            inactive = details.get("total_inactive_file", details.get("inactive_file", 0))
            usage.append((memory.get("usage", 0) - inactive) / 2**20)
            pid = int(container.attrs["State"]["Pid"])
            shims.append(_pss_kib(_parent(pid)) / 1024)
    finally:
        client.close()
    return usage, shims, running


async def _create_many(services: Services, n: int) -> tuple[list[str], list[float]]:
    agent, env = await agent_and_environment(services)
    ids: list[str] = []
    latencies: list[float] = []
    limiter = anyio.CapacityLimiter(CREATE_WIDTH)

    async def create() -> None:
        async with limiter:
            started = time.perf_counter()
            ids.append(await new_session(services, agent, env))
            latencies.append(elapsed_ms(started))

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(create)
    return ids, latencies


async def _work_all(
    bench: Bench, services: Services, ids: list[str]
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Rounds in which every session runs one turn of `calls` tool calls at once; returns the
    tool calls per second of each round, per-call latencies (tool_use → tool_result, ms),
    per-turn times and turn endings (final answer stored → idle, ms)."""
    calls = bench.counts.calls_per_session
    bench.script.reset(calls)
    rates: list[float] = []
    per_call: list[float] = []
    turns: list[float] = []
    endings: list[float] = []

    async def work(session_id: str, seen: int) -> None:
        events = (await run_to_idle(services, session_id, limit=240))[seen:]
        uses = {e["id"]: e for e in events if e["type"] == "agent.tool_use"}
        results = [e for e in events if e["type"] == "agent.tool_result"]
        if len(results) != calls or any(r.get("is_error") for r in results):
            msg = f"session {session_id}: {len(results)} results, wanted {calls} clean ones"
            raise RuntimeError(msg)
        for result in results:
            use = uses[result["tool_use_id"]]
            spent = parse_time(result["processed_at"]) - parse_time(use["processed_at"])
            per_call.append(spent.total_seconds() * 1000)
        running = next(e for e in events if e["type"] == "session.status_running")
        idle = [e for e in events if e["type"] == "session.status_idle"][-1]
        answer = [e for e in events if e["type"] == "agent.message"][-1]
        spent = parse_time(idle["processed_at"]) - parse_time(running["processed_at"])
        turns.append(spent.total_seconds() * 1000)
        spent = parse_time(idle["processed_at"]) - parse_time(answer["processed_at"])
        endings.append(spent.total_seconds() * 1000)

    for _ in range(bench.counts.active_rounds):
        seen = {sid: len(await services.store.events(sid)) for sid in ids}
        started = time.perf_counter()
        for session_id in ids:
            await say(services, session_id)
        async with anyio.create_task_group() as tg:
            for session_id in ids:
                tg.start_soon(work, session_id, seen[session_id])
        rates.append(len(ids) * calls / (time.perf_counter() - started))
    return rates, per_call, turns, endings


async def run(bench: Bench, case: Case) -> None:
    n = bench.counts.idle_sessions
    async with bench.services("scale", DockerBackend(bench.docker_host)) as services:
        ids: list[str] = []
        try:
            before = mem_available_kib()
            ids, create_ms = await _create_many(services, n)
            after = mem_available_kib()
            names = []
            for session_id in ids:
                record = await services.store.require(session_id)
                names.append(record.sandbox_id or f"ma-{session_id}")
            usage, shims, running = await anyio.to_thread.run_sync(_container_memory, bench, names)
            rates, per_call, turns, endings = await _work_all(bench, services, ids)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(120):
                await delete_sessions(services, ids)

    per_session_mib = (before - after) / 1024 / n
    case.add(
        "idle sessions held at once (all containers running)",
        "sessions",
        [float(running)],
        f"{n} created; a bound the bench sets, not the machine's limit",
    )
    case.add(
        f"sessions.create, {CREATE_WIDTH} at a time, cold containers",
        "ms",
        create_ms,
        "includes waiting for Docker behind the other creates",
    )
    case.add(
        "memory per idle session: its container's cgroup + its containerd-shim's PSS",
        "MiB",
        [u + p for u, p in zip(usage, shims, strict=True)],
        "what can be attributed to one session on the host",
    )
    case.add("  of which the container (docker stats)", "MiB", usage)
    case.add("  of which the containerd-shim (PSS)", "MiB", shims)
    case.compare(
        "host MemAvailable drop per idle session",
        per_session_mib,
        "MiB",
        "whole machine (daemons included), so noisy: other processes move it too",
    )
    calls = bench.counts.calls_per_session
    case.add(
        f"{n} sessions active at once: tool calls per second (whole machine)",
        "calls/s",
        rates,
        f"per round of {n} × {calls} `bash true` calls, from the first send to the last idle "
        "(each turn also ends with an output collection: one docker exec)",
    )
    case.add(
        f"{n} active sessions: per-call latency (tool_use → tool_result)",
        "ms",
        per_call,
        "from event timestamps (ms resolution)",
        p50=statistics.median(per_call),
        p99=percentile(per_call, 99),
    )
    case.add(f"{n} active sessions: one turn of {calls} calls, running → idle", "ms", turns)
    case.add(
        f"{n} active sessions: end of turn, final answer → idle",
        "ms",
        endings,
        "collecting /mnt/session/outputs: one docker exec per turn",
    )
    case.notes.append(
        f"{n} idle sessions took {(before - after) / 1024:.0f} MiB of host memory; "
        f"{after / 2**20:.1f} GiB stayed available"
    )
    if per_session_mib > 0:
        case.compare(
            "idle sessions that would fit in the memory left (extrapolated, not measured)",
            after / 1024 / per_session_mib,
            "sessions",
            "memory alone; CPU, pids and the daemon's own limits are not considered",
        )
    case.compare("per-call latency p50", statistics.median(per_call), "ms")
    case.compare("per-call latency p99", percentile(per_call, 99), "ms")
