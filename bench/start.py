"""Case 1: from starting a session to its first command having run, per way of getting a sandbox."""

from __future__ import annotations

import time

import anyio

from sandbox.base import SandboxBackend, SandboxSpec
from sandbox.bubblewrap import BubblewrapBackend
from sandbox.docker import DockerBackend
from server.app import Services

from .common import Bench, agent_and_environment, elapsed_ms, new_session, session_sandbox
from .results import Case

POOL_WAIT_S = 60.0


def _pool_ready(services: Services) -> bool:
    # Nothing public says "a pooled sandbox has its shell open"; Docker's list cannot either.
    pool = services.supervisor.sandboxes._pool
    return not pool._filling and any(pool._ready.values())


async def _wait_for_pool(services: Services) -> None:
    with anyio.fail_after(POOL_WAIT_S):
        while not _pool_ready(services):  # noqa: ASYNC110 - internal state with no event to await
            await anyio.sleep(0.02)


async def _domain(services: Services, agent: str, env: str) -> tuple[float, float]:
    """(sessions.create ms, create → first `true` done ms); the session is deleted after."""
    started = time.perf_counter()
    session_id = await new_session(services, agent, env)
    created = elapsed_ms(started)
    sandbox = await session_sandbox(services, session_id)
    result = await sandbox.run_shell("true", timeout=30)
    total = elapsed_ms(started)
    assert result.exit_code == 0, result
    await services.sessions.delete(session_id)
    return created, total


async def _raw(backend: SandboxBackend, spec: SandboxSpec) -> tuple[float, float]:
    """(backend.create ms, create → first `true` done ms); the sandbox is removed after."""
    started = time.perf_counter()
    sandbox = await backend.create(spec)
    created = elapsed_ms(started)
    result = await sandbox.run_shell("true", timeout=30)
    total = elapsed_ms(started)
    assert result.exit_code == 0, result
    await sandbox.aclose()
    await backend.remove(spec.name)
    return created, total


async def run(bench: Bench, case: Case) -> None:
    n = bench.counts.start_n
    docker = DockerBackend(bench.docker_host)
    bwrap_raw = BubblewrapBackend(bench.bwrap_root("bwrap-raw"))
    bwrap_domain = BubblewrapBackend(bench.bwrap_root("bwrap-start"))
    names = ("cold", "warm", "bwrap", "raw docker", "raw bwrap")
    creates: dict[str, list[float]] = {k: [] for k in names}
    totals: dict[str, list[float]] = {k: [] for k in names}

    def record(kind: str, pair: tuple[float, float]) -> None:
        creates[kind].append(pair[0])
        totals[kind].append(pair[1])

    async with (
        bench.services("start-cold", DockerBackend(bench.docker_host)) as cold,
        bench.services("start-warm", DockerBackend(bench.docker_host), warm_pool=1) as warm,
        bench.services("start-bwrap", bwrap_domain, sandbox="bubblewrap") as bwrap,
    ):
        cold_ids = await agent_and_environment(cold)
        warm_ids = await agent_and_environment(warm)
        bwrap_ids = await agent_and_environment(bwrap)
        limits = cold.settings.limits
        # Interleaved, so drift in the machine's load hits every variant alike; each starts
        # only once the warm pool's refill (a container start) has finished.
        for i in range(n):
            await _wait_for_pool(warm)
            record("warm", await _domain(warm, *warm_ids))
            await _wait_for_pool(warm)
            record("cold", await _domain(cold, *cold_ids))
            record("bwrap", await _domain(bwrap, *bwrap_ids))
            spec = SandboxSpec(
                image=bench.image,
                name=f"mab-{bench.run_id}-{i}",
                labels=bench.labels,
                limits=limits,
            )
            record("raw docker", await _raw(docker, spec))
            record("raw bwrap", await _raw(bwrap_raw, spec))
    await docker.aclose()

    cold_row = "Docker, cold container: sessions.create → first `true` done"
    warm_row = "Docker, warm pool: sessions.create → first `true` done"
    bwrap_row = "bubblewrap: sessions.create → first `true` done"
    raw_row = "raw DockerBackend.create → first `true` done"
    note = "domain path; warm_pool=0; container create + start + shell open"
    case.add(cold_row, "ms", totals["cold"], note)
    note = "domain path; warm_pool=1, measured with the pool ready (its shell already open)"
    case.add(warm_row, "ms", totals["warm"], note)
    case.add(bwrap_row, "ms", totals["bwrap"], "domain path; no pool")
    for kind, label in (("cold", "cold Docker"), ("warm", "warm pool"), ("bwrap", "bubblewrap")):
        case.add(f"  of which sessions.create, {label}", "ms", creates[kind])
        after = [t - c for t, c in zip(totals[kind], creates[kind], strict=True)]
        case.add(f"  then the first `true` once it returned, {label}", "ms", after)
    case.add(raw_row, "ms", totals["raw docker"], "no store, no pool: the backend alone")
    case.add("  of which DockerBackend.create (opens the shell)", "ms", creates["raw docker"])
    case.add("raw BubblewrapBackend.create → first `true` done", "ms", totals["raw bwrap"])
    case.ratio("cold Docker / warm pool", cold_row, warm_row)
    case.ratio("cold Docker / bubblewrap", cold_row, bwrap_row)
    case.ratio("domain path / raw backend (cold Docker)", cold_row, raw_row)
