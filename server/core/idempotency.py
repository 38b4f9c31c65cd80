"""Idempotency keys: a create repeated with the same client-supplied key makes one object.

A key is reserved, together with the id the new object will get, before anything is created;
the create then uses that id. So whatever moment a server dies at, a retry finds the key and
either the object (it is returned) or nothing (the create is run again, by whoever retries).

Rules, for the MCP tools and the REST API alike:
- Keys are scoped by operation (`agents`, `environments`, `sessions`, `files`, `run_task`);
  this server has one principal (whoever holds its token or its stdio pipe), so there is no
  per-caller scope.
- A repeat with the same key and the same parameters returns the object as it is now (not a
  stored copy of the first response). The same key with different parameters is refused.
- A create that fails releases its key (nothing was created), so the same key may be retried.
- Keys are kept for 24 hours.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import anyio

from .clock import format_time, now
from .errors import InvalidRequestError, NotFoundError
from .ids import new_id
from .instances import InstanceRegistry
from .store import Database

Json = dict[str, Any]
State = Literal["new", "done", "orphaned"]
RETENTION = timedelta(hours=24)
MAX_KEY_LENGTH = 255
# How long a repeat waits for a create another live process is running (image builds included).
PENDING_WAIT = 600.0
PENDING_POLL = 0.05


def request_hash(request: Any) -> str:
    """A stable digest of a create's parameters (key order does not matter)."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_key(key: str) -> str:
    """Validate a client-supplied key.

    Raises:
        InvalidRequestError: empty, too long, or not printable ASCII.
    """
    if not key or len(key) > MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        msg = (
            f"idempotency_key must be 1-{MAX_KEY_LENGTH} printable ASCII characters "
            "(a UUID is a good choice)"
        )
        raise InvalidRequestError(msg)
    return key


class IdempotencyKeys:
    """Runs creates at most once per (scope, key)."""

    def __init__(self, db: Database, instances: InstanceRegistry) -> None:
        self._db = db
        self._instances = instances
        self._locks: dict[tuple[str, str], tuple[anyio.Lock, int]] = {}

    async def create_once(
        self,
        scope: str,
        key: str | None,
        request: Any,
        *,
        prefix: str,
        create: Callable[[str], Awaitable[Json]],
        fetch: Callable[[str], Awaitable[Json]],
    ) -> Json:
        """`create(new_id)` the first time; `fetch(that id)` on every repeat of `key`.

        Raises:
            InvalidRequestError: the key is malformed, or was used with other parameters.
            NotFoundError: the object made with this key has since been deleted.
        """
        if key is None:
            return await create(new_id(prefix))
        check_key(key)
        digest = request_hash(request)
        async with self._lock(scope, key):
            resource_id, state = await self._reserve(scope, key, digest, prefix)
            if state == "done":
                return await self._replay(scope, resource_id, fetch)
            if state == "orphaned":
                # Its creator died mid-create; the object may have been committed already.
                try:
                    existing = await fetch(resource_id)
                except NotFoundError:
                    pass
                else:
                    await self._complete(scope, key)
                    return existing
            try:
                created = await create(resource_id)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._release(scope, key)
                raise
            await self._complete(scope, key)
            return created

    async def _replay(
        self, scope: str, resource_id: str, fetch: Callable[[str], Awaitable[Json]]
    ) -> Json:
        try:
            return await fetch(resource_id)
        except NotFoundError as exc:
            msg = (
                f"the {scope} object created with this idempotency key ({resource_id}) has "
                "since been deleted; use a new key to create another"
            )
            raise NotFoundError(msg) from exc

    def _lock(self, scope: str, key: str) -> _KeyLock:
        return _KeyLock(self._locks, (scope, key))

    async def _reserve(self, scope: str, key: str, digest: str, prefix: str) -> tuple[str, State]:
        """The id for this key, and what became of its create so far."""
        with anyio.fail_after(PENDING_WAIT):
            while True:
                found = await self._db.write(
                    lambda c: self._reserve_in(c, scope, key, digest, new_id(prefix))
                )
                if found is not None:
                    return found
                await anyio.sleep(PENDING_POLL)  # another live process is creating it

    def _reserve_in(
        self, conn: sqlite3.Connection, scope: str, key: str, digest: str, candidate: str
    ) -> tuple[str, State] | None:
        cutoff = format_time(datetime.now(UTC) - RETENTION)
        conn.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (cutoff,))
        row = conn.execute(
            "SELECT request_hash, resource_id, owner, completed FROM idempotency_keys "
            "WHERE scope = ? AND key = ?",
            (scope, key),
        ).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO idempotency_keys (scope, key, request_hash, resource_id, owner, "
                "completed, created_at) VALUES (?, ?, ?, ?, ?, 0, ?)",
                (scope, key, digest, candidate, self._instances.id, now()),
            )
            return candidate, "new"
        if row["request_hash"] != digest:
            msg = (
                f"idempotency key {key!r} was already used for a {scope} create with different "
                "parameters; use a new key for a different request"
            )
            raise InvalidRequestError(msg)
        if row["completed"]:
            return row["resource_id"], "done"
        if row["owner"] == self._instances.id or self._instances.is_alive(row["owner"]):
            return None  # still being created: wait for it
        # Its creator died mid-create: take the reservation over.
        conn.execute(
            "UPDATE idempotency_keys SET owner = ? WHERE scope = ? AND key = ?",
            (self._instances.id, scope, key),
        )
        return row["resource_id"], "orphaned"

    async def _complete(self, scope: str, key: str) -> None:
        await self._db.write(
            lambda c: c.execute(
                "UPDATE idempotency_keys SET completed = 1 WHERE scope = ? AND key = ?",
                (scope, key),
            )
        )

    async def _release(self, scope: str, key: str) -> None:
        await self._db.write(
            lambda c: c.execute(
                "DELETE FROM idempotency_keys WHERE scope = ? AND key = ? AND completed = 0",
                (scope, key),
            )
        )


class _KeyLock:
    """One lock per (scope, key) in this process, dropped when nobody holds or waits on it."""

    def __init__(self, locks: dict[tuple[str, str], tuple[anyio.Lock, int]], name: tuple[str, str]):
        self._locks = locks
        self._name = name

    async def __aenter__(self) -> None:
        lock, users = self._locks.get(self._name, (anyio.Lock(), 0))
        self._locks[self._name] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        lock, _ = self._locks[self._name]
        lock.release()
        self._leave()

    def _leave(self) -> None:
        lock, users = self._locks[self._name]
        if users <= 1:
            del self._locks[self._name]
        else:
            self._locks[self._name] = (lock, users - 1)


async def create_once(
    keys: IdempotencyKeys | None,
    scope: str,
    key: str | None,
    request: Any,
    *,
    prefix: str,
    create: Callable[[str], Awaitable[Json]],
    fetch: Callable[[str], Awaitable[Json]],
) -> Json:
    """`keys.create_once`, for services that may run without a key store (unit tests)."""
    if keys is None:
        if key is not None:
            msg = "idempotency keys are not available in this configuration"
            raise InvalidRequestError(msg)
        return await create(new_id(prefix))
    return await keys.create_once(scope, key, request, prefix=prefix, create=create, fetch=fetch)
