"""The event log: append-only, gapless per-session order, pagination, cross-connection writers."""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import pytest_asyncio

from server.core.changes import ChangeBus
from server.core.errors import InvalidRequestError
from server.core.session_store import SessionStore
from server.core.store import Database

pytestmark = pytest.mark.asyncio


def add_session(conn: sqlite3.Connection, session_id: str) -> None:
    conn.execute(
        "INSERT INTO sessions (id, body, status, agent_id, agent_version, environment_id) "
        "VALUES (?, ?, 'idle', 'agent_x', 1, 'env_x')",
        (session_id, json.dumps({"id": session_id, "usage": {}})),
    )


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[SessionStore]:
    db = await Database.open(tmp_path / "db.sqlite")
    await db.write(lambda c: add_session(c, "sesn_a"))
    await db.write(lambda c: add_session(c, "sesn_b"))
    yield SessionStore(db, ChangeBus())
    await db.aclose()


async def test_events_get_ids_and_processed_at(store: SessionStore) -> None:
    (event,) = await store.append("sesn_a", [{"type": "session.status_running"}])
    assert event["id"].startswith("sevt_")
    assert event["processed_at"].endswith("Z")
    (queued,) = await store.append("sesn_a", [{"type": "user.message", "content": []}], queued=True)
    assert queued["processed_at"] is None
    assert [e["id"] for e in await store.pending("sesn_a")] == [queued["id"]]
    await store.mark_processed("sesn_a", [queued["id"]])
    assert await store.pending("sesn_a") == []


async def test_two_connections_appending_at_once_keep_a_gapless_order(
    store: SessionStore, tmp_path: Path
) -> None:
    """Two writers (as two server processes would) interleave without gaps or duplicates."""
    other_db = await Database.open(tmp_path / "db.sqlite")
    other = SessionStore(other_db, ChangeBus())
    try:

        async def writer(target: SessionStore, tag: str) -> None:
            for i in range(40):
                await target.append("sesn_a", [{"type": "agent.message", "tag": f"{tag}{i}"}])

        async with anyio.create_task_group() as group:
            group.start_soon(writer, store, "x")
            group.start_soon(writer, other, "y")
    finally:
        await other_db.aclose()
    rows = await store.db.read(
        lambda c: c.execute(
            "SELECT position FROM events WHERE session_id = 'sesn_a' ORDER BY position"
        ).fetchall()
    )
    assert [r[0] for r in rows] == list(range(1, 81))
    tags = [e["tag"] for e in await store.events("sesn_a")]
    assert sorted(tags) == sorted([f"x{i}" for i in range(40)] + [f"y{i}" for i in range(40)])
    assert [t for t in tags if t.startswith("x")] == [f"x{i}" for i in range(40)]


async def test_sessions_have_independent_positions(store: SessionStore) -> None:
    await store.append("sesn_a", [{"type": "a1"}, {"type": "a2"}])
    await store.append("sesn_b", [{"type": "b1"}])
    assert [e["type"] for e in await store.events("sesn_b")] == ["b1"]
    assert [e["type"] for e in await store.events("sesn_a", after_position=1)] == ["a2"]


async def test_a_failed_check_writes_nothing(store: SessionStore) -> None:
    def refuse(conn: sqlite3.Connection, session: dict[str, object]) -> None:
        raise InvalidRequestError("no")

    with pytest.raises(InvalidRequestError):
        await store.append("sesn_a", [{"type": "x"}, {"type": "y"}], check=refuse)
    assert await store.events("sesn_a") == []


async def test_append_wakes_waiters(store: SessionStore) -> None:
    token = store.bus.token("sesn_a")
    await store.append("sesn_a", [{"type": "x"}])
    with anyio.fail_after(1):
        await token.wait()


async def test_other_process_writes_wake_waiters_through_polling(
    store: SessionStore, tmp_path: Path
) -> None:
    other_db = await Database.open(tmp_path / "db.sqlite")
    seen: list[set[str]] = []

    async def on_change(ids: set[str]) -> None:
        seen.append(ids)

    try:
        async with anyio.create_task_group() as group:
            await group.start(
                functools.partial(store.bus.watch, store.db, on_change, interval=0.02)
            )
            token = store.bus.token("sesn_b")
            await SessionStore(other_db, ChangeBus()).append("sesn_b", [{"type": "x"}])
            with anyio.fail_after(5):
                await token.wait()
            group.cancel_scope.cancel()
    finally:
        await other_db.aclose()
    assert {"sesn_b"} in seen
