"""Case 3: the event log: append throughput; send → stream latency (in-process) at 100k events."""

from __future__ import annotations

import time
from typing import Any

import anyio

from sandbox.docker import DockerBackend
from server.app import Services
from server.core.models import UserInterruptEvent

from .common import Bench, agent_and_environment, elapsed_ms, new_session
from .results import Case

TEXT = "The command finished; the output is below. " * 4  # ~180 bytes, a typical short message


def _event(i: int) -> dict[str, Any]:
    return {"type": "agent.message", "content": [{"type": "text", "text": f"{i} {TEXT}"}]}


async def _send_to_stream(
    services: Services, session_id: str, position: int
) -> tuple[float, float]:
    """(append ms, append → follower holding the new event ms), as a `wait_for_session` sees it:
    take the change token, then wake on it and read the log after the last seen position."""
    store = services.store
    token = store.bus.token(session_id)
    received: list[float] = []

    async def follow() -> None:
        await token.wait()
        events = await store.events(session_id, after_position=position)
        received.append(time.perf_counter())
        assert len(events) == 1, len(events)

    sent: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        sent.append(time.perf_counter())
        await store.append(session_id, [_event(position + 1)])
        sent.append(time.perf_counter())
    return (sent[1] - sent[0]) * 1000, (received[0] - sent[0]) * 1000


async def _send_interrupt(services: Services, session_id: str) -> tuple[float, float]:
    """(sessions.send_events ms, send → processed by the session's worker ms)."""
    store = services.store
    started = time.perf_counter()
    await services.sessions.send_events(
        session_id, [UserInterruptEvent.model_validate({"type": "user.interrupt"})]
    )
    sent = elapsed_ms(started)
    with anyio.fail_after(60):
        while True:
            token = store.bus.token(session_id)
            if not await store.pending(session_id):
                break
            await token.wait()
    return sent, elapsed_ms(started)


async def _latencies(services: Services, session_id: str, position: int, n: int) -> dict[str, Any]:
    appends, streams, reads = [], [], []
    last_id = ""
    for _ in range(n):
        appended, streamed = await _send_to_stream(services, session_id, position)
        position += 1
        appends.append(appended)
        streams.append(streamed)
    events = await services.store.events(session_id, after_position=position - 1)
    last_id = events[-1]["id"]
    for _ in range(n):
        started = time.perf_counter()
        result = await services.sessions.wait(session_id, after=last_id, timeout=0)
        reads.append(elapsed_ms(started))
        assert result.events == [], result.events
    return {"append": appends, "stream": streams, "wait": reads, "position": position}


async def run(bench: Bench, case: Case) -> None:
    counts = bench.counts
    async with bench.services("events", DockerBackend(bench.docker_host)) as services:
        agent, env = await agent_and_environment(services)
        session_id = await new_session(services, agent, env)
        store = services.store

        # One event per transaction (each one fsynced: synchronous=FULL).
        singles: list[float] = []
        for i in range(counts.single_appends):
            started = time.perf_counter()
            await store.append(session_id, [_event(i)])
            singles.append(elapsed_ms(started))
        position = counts.single_appends
        small = await _latencies(services, session_id, position, counts.stream_n)
        position = small["position"]
        small_send = [await _send_interrupt(services, session_id) for _ in range(counts.send_n)]
        position += counts.send_n

        # Fill the log in batches up to the target size.
        batch_rates: list[float] = []
        batch = counts.events_batch
        while position < counts.events_total:
            count = min(batch, counts.events_total - position)
            events = [_event(position + k) for k in range(count)]
            started = time.perf_counter()
            await store.append(session_id, events)
            batch_rates.append(count / (time.perf_counter() - started))
            position += count
        big = await _latencies(services, session_id, position, counts.stream_n)
        position = big["position"]
        big_send = [await _send_interrupt(services, session_id) for _ in range(counts.send_n)]
        await services.sessions.delete(session_id)

    chunk = max(1, len(singles) // 5)
    single_rates = [
        len(part) / (sum(part) / 1000)
        for part in (singles[i : i + chunk] for i in range(0, len(singles), chunk))
    ]
    size = f"{counts.events_total:,}"
    case.notes.append(
        "in-process: the follower is a task in the same process, woken by the change bus "
        "(as wait_for_session is), then reading the log after its last position"
    )
    case.add("append, one event per transaction (store.append)", "ms", singles)
    case.add("append throughput, one event per transaction", "events/s", single_rates, "per chunk")
    case.add(f"append throughput, batches of {batch}", "events/s", batch_rates, "per batch")
    case.add(
        f"send → stream latency, session with {counts.single_appends:,} events",
        "ms",
        small["stream"],
        "append (durable) → follower woken and holding the new event",
    )
    stream_row = f"send → stream latency, session with {size} events"
    case.add(stream_row, "ms", big["stream"], "append (durable) → follower holding the event")
    case.add(f"  of which the durable append, {size} events", "ms", big["append"])
    case.add(
        f"wait_for_session read (after = last event), {size} events",
        "ms",
        big["wait"],
        "sessions.wait with timeout 0: cursor lookup + read of what follows",
    )
    case.add(
        f"sessions.send_events (user.interrupt), {counts.single_appends:,}-event session",
        "ms",
        [s for s, _ in small_send],
    )
    send_row = f"sessions.send_events (user.interrupt), {size}-event session"
    case.add(send_row, "ms", [s for s, _ in big_send], "validation reads the session's whole log")
    case.add(
        f"  send → processed by the worker, {size}-event session",
        "ms",
        [p for _, p in big_send],
        "the worker also reads the whole log",
    )
    case.ratio(
        "stream latency, big log / small log",
        stream_row,
        f"send → stream latency, session with {counts.single_appends:,} events",
    )
    case.ratio(
        "send_events, big log / small log",
        send_row,
        f"sessions.send_events (user.interrupt), {counts.single_appends:,}-event session",
    )
