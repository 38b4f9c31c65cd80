"""Persistence of sessions and their event log: every method is one transaction."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .changes import ChangeBus
from .clock import now, parse_time
from .errors import NotFoundError
from .store import Database, Json, dumps, event_from_row, insert_events

ZERO_USAGE: Json = {
    "input_tokens": 0,
    "output_tokens": 0,
    "cache_read_input_tokens": 0,
    "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
    "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
    "active_seconds": 0.0,
}


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A session row: the API object plus the bookkeeping columns."""

    session: Json
    owner: str | None
    sandbox_id: str | None


def decode_session(row: sqlite3.Row) -> Json:
    body: Json = json.loads(row["body"])
    body["status"] = row["status"]
    body["archived_at"] = row["archived_at"]
    stats = dict(body.get("stats") or {})
    elapsed = (parse_time(now()) - parse_time(body["created_at"])).total_seconds()
    stats["duration_seconds"] = round(max(0.0, elapsed), 3)
    body["stats"] = stats
    return body


def session_not_found(session_id: str) -> NotFoundError:
    msg = f"session {session_id} not found; call list_sessions to see existing sessions"
    return NotFoundError(msg)


def add_usage(total: Json, delta: Json) -> Json:
    """Add token counts (nested dicts add per key)."""
    result: Json = json.loads(json.dumps(total))
    for key, value in delta.items():
        if isinstance(value, dict):
            result[key] = add_usage(result.get(key) or {}, value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            result[key] = (result.get(key) or 0) + value
    return result


Check = Callable[[sqlite3.Connection, Json], None]


class SessionStore:
    """All SQL about sessions and events, with change notifications."""

    def __init__(self, db: Database, bus: ChangeBus) -> None:
        self.db = db
        self.bus = bus

    async def get(self, session_id: str) -> SessionRecord | None:
        row = await self.db.read(
            lambda c: c.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
        )
        if row is None:
            return None
        return SessionRecord(decode_session(row), row["owner"], row["sandbox_id"])

    async def require(self, session_id: str) -> SessionRecord:
        record = await self.get(session_id)
        if record is None:
            raise session_not_found(session_id)
        return record

    async def append(
        self,
        session_id: str,
        events: Sequence[Json],
        *,
        status: str | None = None,
        usage: Json | None = None,
        active_seconds: float = 0.0,
        processed: Iterable[str] = (),
        check: Check | None = None,
        queued: bool = False,
    ) -> list[Json]:
        """Append events atomically, optionally changing status, usage and `processed_at` marks.

        `usage` is added to the session's running totals and `active_seconds` to its stats.
        `processed` names queued client events to mark processed now. `check(conn, session)`
        may raise to abort the whole write. `queued=True` stores the events with
        `processed_at` null (client events waiting for the loop).
        """
        stamp = now()

        def write(conn: sqlite3.Connection) -> list[Json]:
            row = conn.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None:
                raise session_not_found(session_id)
            session = json.loads(row["body"])
            session["status"] = row["status"]
            session["archived_at"] = row["archived_at"]
            if check is not None:
                check(conn, session)
            stored = insert_events(conn, session_id, events, processed=not queued)
            for event_id in processed:
                conn.execute(
                    "UPDATE events SET processed_at = ? WHERE id = ? AND processed_at IS NULL",
                    (stamp, event_id),
                )
            changed = False
            if status is not None and status != session["status"]:
                session["status"] = status
                changed = True
            if usage:
                session["usage"] = add_usage(session.get("usage") or ZERO_USAGE, usage)
                changed = True
            if active_seconds:
                delta = round(active_seconds, 3)
                session["usage"] = add_usage(session["usage"], {"active_seconds": delta})
                stats = session.setdefault("stats", {})
                stats["active_seconds"] = round((stats.get("active_seconds") or 0.0) + delta, 3)
                changed = True
            if changed:
                session["updated_at"] = stamp
                conn.execute(
                    "UPDATE sessions SET status = ?, body = ? WHERE id = ?",
                    (session["status"], dumps(session), session_id),
                )
            return stored

        stored = await self.db.write(write)
        self.bus.notify(session_id)
        return stored

    async def events(
        self, session_id: str, *, after_position: int = 0, types: Sequence[str] = ()
    ) -> list[Json]:
        """Every event after `after_position` (only those of `types`, if given), in log order."""
        only = f" AND type IN ({', '.join('?' for _ in types)})" if types else ""
        rows = await self.db.read(
            lambda c: c.execute(
                "SELECT processed_at, body FROM events WHERE session_id = ? AND position > ?"
                f"{only} ORDER BY position",
                (session_id, after_position, *types),
            ).fetchall()
        )
        return [event_from_row(r) for r in rows]

    async def pending(self, session_id: str) -> list[Json]:
        """Client events not yet processed, in the order they were sent."""
        rows = await self.db.read(
            lambda c: c.execute(
                "SELECT processed_at, body FROM events WHERE session_id = ? "
                "AND processed_at IS NULL ORDER BY seq",
                (session_id,),
            ).fetchall()
        )
        return [event_from_row(r) for r in rows]

    async def mark_processed(self, session_id: str, event_ids: Sequence[str]) -> None:
        if not event_ids:
            return
        await self.append(session_id, [], processed=event_ids)

    async def set_columns(self, session_id: str, **columns: Any) -> None:
        """Update bookkeeping columns (`owner`, `sandbox_id`)."""
        allowed = {"owner", "sandbox_id"}
        if not columns or set(columns) - allowed:
            msg = f"set_columns takes only {sorted(allowed)}"
            raise ValueError(msg)
        assignments = ", ".join(f"{k} = ?" for k in columns)
        await self.db.write(
            lambda c: c.execute(
                f"UPDATE sessions SET {assignments} WHERE id = ?",
                (*columns.values(), session_id),
            )
        )

    async def claim(self, session_id: str, instance: str, previous: str | None) -> bool:
        """Take ownership if nobody else did meanwhile (compare-and-set on `owner`)."""
        return await self.db.write(
            lambda c: (
                c.execute(
                    "UPDATE sessions SET owner = ? WHERE id = ? AND owner IS ?",
                    (instance, session_id, previous),
                ).rowcount
                == 1
            )
        )

    async def all_sessions(self) -> list[SessionRecord]:
        rows = await self.db.read(lambda c: c.execute("SELECT * FROM sessions").fetchall())
        return [SessionRecord(decode_session(r), r["owner"], r["sandbox_id"]) for r in rows]

    async def resources(self, session_id: str) -> list[Json]:
        rows = await self.db.read(
            lambda c: c.execute(
                "SELECT body FROM session_resources WHERE session_id = ? ORDER BY id",
                (session_id,),
            ).fetchall()
        )
        return [json.loads(r[0]) for r in rows]
