"""A warm pool of ready sandboxes per environment recipe, so `start_session` need not create one.

Pool sandboxes run with their shell already open; handing one out is a rename. Each process
keeps its own pool (labelled with its instance id), removes it on shutdown, and the start-up
sweep removes pools of processes that died.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc

from sandbox.base import Sandbox, SandboxBackend, SandboxSpec
from sandbox.errors import SandboxError

logger = logging.getLogger(__name__)

POOL_LABEL = "managed-agents-mcp.pool"
"""Pool sandboxes carry the environment id here (empty once handed out is not possible:
labels are immutable, so hand-out renames and the name tells sessions from pool entries)."""
POOL_PREFIX = "ma-pool-"
ARRIVAL_WAIT_S = 15.0


class WarmPool:
    """Ready sandboxes keyed by the spec they were made from (minus name and labels)."""

    def __init__(
        self,
        backend: SandboxBackend,
        size: int,
        *,
        on_discard: Callable[[Sandbox], Awaitable[None]],
    ) -> None:
        self._backend = backend
        self.size = size
        self._on_discard = on_discard
        self._ready: dict[str, deque[Sandbox]] = {}
        self._filling: set[str] = set()
        self._arrivals: dict[str, anyio.Event] = {}
        self._retired: set[str] = set()
        self._task_group: anyio.abc.TaskGroup | None = None

    def bind(self, task_group: anyio.abc.TaskGroup) -> None:
        self._task_group = task_group

    @staticmethod
    def new_name() -> str:
        return POOL_PREFIX + secrets.token_hex(6)

    async def take(self, key: str, name: str) -> tuple[Sandbox, str] | None:
        """A ready sandbox for `key`, renamed to `name`, with its pool name; None if empty.

        When one is being created right now, it is waited for: it started before any new one
        could, so it is never slower.
        """
        ready = self._ready.get(key)
        if not ready and key in self._filling:
            with anyio.move_on_after(ARRIVAL_WAIT_S):
                await self._arrival(key).wait()
            ready = self._ready.get(key)
        while ready:
            sandbox = ready.popleft()
            pool_name = sandbox.id
            try:
                return await self._backend.rename(sandbox, name), pool_name
            except SandboxError as exc:
                logger.warning("discarding pool sandbox %s: %s", sandbox.id, exc)
                await self._discard(sandbox)
        return None

    def fill(self, key: str, make: Callable[[], Awaitable[Sandbox]]) -> None:
        """Top the pool for `key` up to `size` in the background (no-op if already filling)."""
        if self.size <= 0 or self._task_group is None:
            return
        self._retired.discard(key)
        if key in self._filling:
            return
        self._filling.add(key)
        self._task_group.start_soon(self._fill, key, make)

    async def _fill(self, key: str, make: Callable[[], Awaitable[Sandbox]]) -> None:
        try:
            ready = self._ready.setdefault(key, deque())
            while len(ready) < self.size:
                sandbox = await make()
                if key in self._retired:
                    # The recipe changed while this one was being made.
                    await self._discard(sandbox)
                    return
                ready.append(sandbox)
                self._arrival(key).set()
                self._arrivals.pop(key, None)
        except Exception as exc:  # a full pool is an optimisation; failing to fill is not fatal
            logger.warning("could not fill the warm pool: %s", exc)
        finally:
            self._filling.discard(key)
            self._arrival(key).set()
            self._arrivals.pop(key, None)

    def _arrival(self, key: str) -> anyio.Event:
        event = self._arrivals.get(key)
        if event is None:
            event = self._arrivals[key] = anyio.Event()
        return event

    async def retire(self, keep: Callable[[str], bool]) -> None:
        """Remove pooled sandboxes whose key no longer matches any environment."""
        for key in [k for k in {*self._ready, *self._filling} if not keep(k)]:
            self._retired.add(key)
            for sandbox in self._ready.pop(key, ()):
                await self._discard(sandbox)

    async def _discard(self, sandbox: Sandbox) -> None:
        try:
            await sandbox.aclose()
            await self._backend.remove(sandbox.id)
        except SandboxError as exc:
            logger.warning("could not remove pool sandbox %s: %s", sandbox.id, exc)
        await self._on_discard(sandbox)

    async def drain(self) -> None:
        """Remove every pooled sandbox (shutdown). Shielded and bounded by the caller."""
        pools, self._ready = self._ready, {}
        for ready in pools.values():
            for sandbox in ready:
                await self._discard(sandbox)


def spec_key(spec: SandboxSpec, policy: str) -> str:
    """What makes two sandboxes interchangeable: image, user, env, limits, network policy."""
    import hashlib
    import json

    limits = spec.limits
    material = json.dumps(
        [
            spec.image,
            spec.user,
            sorted(spec.env.items()),
            [
                limits.memory_bytes,
                limits.cpus,
                limits.pids,
                limits.tmp_bytes,
                limits.home_bytes,
                limits.outputs_bytes,
                limits.uploads_bytes,
            ],
            policy,
        ]
    )
    return hashlib.sha256(material.encode()).hexdigest()[:24]
