"""Wake-ups for code waiting on a session: local writes at once, other processes' by polling."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

import anyio
import anyio.abc

from .store import Database

logger = logging.getLogger(__name__)

PreviewListener = Callable[[dict[str, object]], None]


class ChangeBus:
    """Per-session `anyio.Event`s that fire when the session's log or state changes.

    Waiters take a token first, then read the store, then wait on the token, so a change that
    lands between the read and the wait is never missed.
    """

    def __init__(self) -> None:
        self._events: dict[str, anyio.Event] = {}
        self._last_seq = 0
        self._deleted: dict[str, dict[str, object]] = {}
        self._previews: dict[str, list[PreviewListener]] = {}

    @contextlib.contextmanager
    def previews(self, session_id: str, listener: PreviewListener) -> Iterator[None]:
        """Call `listener` with each of a session's live previews (`event_start` /
        `event_delta`) while inside, best effort.

        The call is synchronous, in the publisher's task: a preview is handed over before the
        publisher goes on to store the event it previews, so no follower can see that event
        first. `listener` must not block (queue and wake up); previews are never stored.
        """
        listeners = self._previews.setdefault(session_id, [])
        listeners.append(listener)
        try:
            yield
        finally:
            listeners.remove(listener)
            if not listeners:
                self._previews.pop(session_id, None)

    def publish_preview(self, session_id: str, preview: dict[str, object]) -> None:
        """Hand a preview to this process's listeners without waiting."""
        for listener in list(self._previews.get(session_id, ())):
            try:
                listener(preview)
            except Exception:
                logger.exception("a preview listener of session %s failed", session_id)

    def mark_deleted(self, session_id: str, event: dict[str, object]) -> None:
        """Remember a deleted session's final `session.deleted` event and wake its followers."""
        if len(self._deleted) >= 1024:
            self._deleted.pop(next(iter(self._deleted)))
        self._deleted[session_id] = event
        self.notify(session_id)

    def deleted_event(self, session_id: str) -> dict[str, object] | None:
        """The `session.deleted` event of a session deleted by this process, if any."""
        return self._deleted.get(session_id)

    def token(self, session_id: str) -> anyio.Event:
        event = self._events.get(session_id)
        if event is None:
            event = self._events[session_id] = anyio.Event()
        return event

    def notify(self, session_id: str) -> None:
        event = self._events.pop(session_id, None)
        if event is not None:
            event.set()

    def notify_all(self) -> None:
        events, self._events = self._events, {}
        for event in events.values():
            event.set()

    async def watch(
        self,
        db: Database,
        on_change: Callable[[set[str]], Awaitable[None]],
        *,
        interval: float = 0.1,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Poll for commits made by other processes and wake the sessions they touched.

        Runs until cancelled (reports started once it has its baseline). `on_change` gets the
        ids of sessions with new events.
        """
        self._last_seq = await db.read(
            lambda c: int(c.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])
        )
        version = await db.data_version()
        task_status.started()
        while True:
            await anyio.sleep(interval)
            current = await db.data_version()
            if current == version:
                continue
            version = current
            last = self._last_seq

            def changed(conn: object, last: int = last) -> tuple[int, set[str]]:
                import sqlite3

                assert isinstance(conn, sqlite3.Connection)
                rows = conn.execute(
                    "SELECT seq, session_id FROM events WHERE seq > ? ORDER BY seq", (last,)
                ).fetchall()
                top = max((int(r[0]) for r in rows), default=last)
                return top, {str(r[1]) for r in rows}

            self._last_seq, sessions = await db.read(changed)
            for session_id in sessions:
                self.notify(session_id)
            # Status-only changes (another process claimed or recovered a session) carry no
            # event, so everyone re-checks.
            self.notify_all()
            if sessions:
                try:
                    await on_change(sessions)
                except Exception:
                    logger.exception("handling changes from another process failed")
