"""What every case shares: counts, labels, scratch dirs, the scripted model, services, cleanup."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from sandbox.base import Sandbox, SandboxBackend
from sandbox.images import DEFAULT_IMAGE
from server.app import Services, open_services
from server.core.models import (
    AgentCreateParams,
    EnvironmentCreateParams,
    SessionCreateParams,
    UserMessageEvent,
)
from server.runner.model import AnthropicModelClient
from server.settings import Settings
from tests.fakes.messages_api import FakeMessagesAPI, Reply, text, tool_use

logger = logging.getLogger("bench")

BENCH_LABEL = "managed-agents-bench"
HOME_LABEL = "managed-agents-mcp.home"


@dataclass(frozen=True)
class Counts:
    """How much of everything one run does."""

    start_n: int
    tool_calls: int
    exec_n: int
    floor_n: int
    events_total: int
    events_batch: int
    single_appends: int
    stream_n: int
    send_n: int
    idle_sessions: int
    calls_per_session: int
    cold_start_n: int
    active_rounds: int
    peer_reps: int
    peer_commands: int


FULL = Counts(
    start_n=20,
    tool_calls=100,
    exec_n=30,
    floor_n=200,
    events_total=100_000,
    events_batch=1000,
    single_appends=1000,
    stream_n=200,
    send_n=5,
    idle_sessions=50,
    calls_per_session=4,
    cold_start_n=10,
    active_rounds=3,
    peer_reps=5,
    peer_commands=100,
)
SMOKE = Counts(
    start_n=2,
    tool_calls=5,
    exec_n=3,
    floor_n=20,
    events_total=2000,
    events_batch=500,
    single_appends=20,
    stream_n=5,
    send_n=1,
    idle_sessions=2,
    calls_per_session=2,
    cold_start_n=1,
    active_rounds=1,
    peer_reps=1,
    peer_commands=5,
)


class ModelScript:
    """The fake model's behaviour: `bash true` until the turn holds `calls` results, then text.

    Counting the tool results already in the request makes one script serve many sessions at
    once. Arrival times of requests are kept (perf_counter, taken in the fake's thread).
    """

    def __init__(self) -> None:
        self.calls = 0
        self.command = "true"
        self.arrivals: list[float] = []
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> Reply:
        arrived = time.perf_counter()
        with self._lock:
            self.arrivals.append(arrived)
        if _results_this_turn(body.get("messages", [])) < self.calls:
            return tool_use("bash", {"command": self.command})
        return text("done")

    def reset(self, calls: int) -> None:
        with self._lock:
            self.calls = calls
            self.arrivals = []


def _results_this_turn(messages: list[dict[str, Any]]) -> int:
    """Tool results since the user's last words (earlier turns of the session do not count)."""
    count = 0
    for message in reversed(messages):
        content = message.get("content")
        if message.get("role") != "user":
            continue
        if not isinstance(content, list):
            break
        kinds = [block.get("type") for block in content]
        count += kinds.count("tool_result")
        if any(kind != "tool_result" for kind in kinds):
            break
    return count


@dataclass
class Bench:
    """One run: its id (every Docker object it makes carries it), scratch dir and counts."""

    counts: Counts
    smoke: bool
    image: str = field(default_factory=lambda: os.environ.get("MANAGED_AGENTS_IMAGE") or "")
    docker_host: str | None = field(default_factory=lambda: os.environ.get("DOCKER_HOST") or None)
    run_id: str = field(default_factory=lambda: f"{os.getpid()}-{int(time.time())}")
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ma-bench-")))
    home_labels: set[str] = field(default_factory=set)
    bwrap_roots: list[Path] = field(default_factory=list)
    script: ModelScript = field(default_factory=ModelScript)
    _fake: FakeMessagesAPI | None = None

    def __post_init__(self) -> None:
        self.image = self.image or DEFAULT_IMAGE
        # bwrap runs as the sandbox uid, which must reach the bind sources under here.
        self.work.chmod(0o711)

    @property
    def labels(self) -> dict[str, str]:
        return {BENCH_LABEL: self.run_id}

    @contextlib.contextmanager
    def fake_model(self) -> Iterator[FakeMessagesAPI]:
        with FakeMessagesAPI(default=self.script) as fake:
            self._fake = fake
            try:
                yield fake
            finally:
                self._fake = None

    @property
    def fake(self) -> FakeMessagesAPI:
        assert self._fake is not None, "the fake model is not running"
        return self._fake

    def scratch(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(mode=0o711, parents=True, exist_ok=True)
        return path

    def bwrap_root(self, name: str) -> Path:
        root = self.scratch(name)
        self.bwrap_roots.append(root)
        return root

    def settings(self, name: str, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "home": self.scratch(name),
            "image": self.image,
            "sandbox": "docker",
            "docker_host": self.docker_host,
            "retry_delay": 0.01,
            "warm_pool": 0,
            "max_tokens": 1024,
        }
        values.update(overrides)
        return Settings(**values)

    @contextlib.asynccontextmanager
    async def services(
        self, name: str, backend: SandboxBackend, **overrides: Any
    ) -> AsyncIterator[Services]:
        """Services over a fresh data dir, the fake model, and `backend`."""
        settings = self.settings(name, **overrides)
        model = AnthropicModelClient(api_key="bench-key", base_url=self.fake.url)
        async with open_services(settings, backend=backend, model=model) as services:
            self.home_labels.add(services.supervisor.sandboxes.home_label)
            yield services

    def docker(self) -> Any:
        import docker

        if self.docker_host:
            return docker.DockerClient(base_url=self.docker_host, timeout=120)
        return docker.from_env(timeout=120)


async def agent_and_environment(services: Services) -> tuple[str, str]:
    """An agent with the built-in toolset and an environment without network (no proxy)."""
    agent = await services.agents.create(
        AgentCreateParams.model_validate(
            {
                "name": "bench",
                "model": "claude-sonnet-4-6",
                "tools": [{"type": "agent_toolset_20260401"}],
            }
        )
    )
    environment = await services.environments.create(
        EnvironmentCreateParams.model_validate(
            {
                "name": f"bench-{agent['id'][-8:]}",
                "config": {"networking": {"type": "limited", "allowed_hosts": []}},
            }
        )
    )
    return agent["id"], environment["id"]


async def new_session(services: Services, agent_id: str, environment_id: str) -> str:
    session = await services.sessions.create(
        SessionCreateParams(agent=agent_id, environment_id=environment_id)
    )
    return session["id"]


async def session_sandbox(services: Services, session_id: str) -> Sandbox:
    return await services.supervisor.sandboxes.sandbox_for(session_id)


async def say(services: Services, session_id: str, words: str = "go") -> None:
    event = UserMessageEvent.model_validate({"type": "user.message", "content": words})
    await services.sessions.send_events(session_id, [event])


async def run_to_idle(services: Services, session_id: str, *, limit: float) -> list[dict[str, Any]]:
    """Wait (bounded) until the session needs input again; return all its events."""
    with anyio.fail_after(limit):
        while not (await services.sessions.wait(session_id, after=None, timeout=30)).done:
            pass
    return await services.store.events(session_id)


async def delete_sessions(services: Services, session_ids: list[str], *, width: int = 4) -> None:
    """Delete sessions (container and workspace included), a few at a time."""
    limiter = anyio.CapacityLimiter(width)

    async def delete(session_id: str) -> None:
        async with limiter:
            await services.sessions.delete(session_id)

    async with anyio.create_task_group() as tg:
        for session_id in session_ids:
            tg.start_soon(delete, session_id)


def elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    msg = "MemAvailable missing from /proc/meminfo"
    raise RuntimeError(msg)


def sweep_docker(bench: Bench) -> list[str]:
    """Remove every Docker object this run made (by its labels); return what was removed."""
    import docker.errors

    removed: list[str] = []
    client = bench.docker()
    try:
        filters = [f"{BENCH_LABEL}={bench.run_id}"]
        filters += [f"{HOME_LABEL}={label}" for label in bench.home_labels]
        for label in filters:
            for name in remove_containers(client, label):
                removed.append(f"container {name}")
            for volume in client.volumes.list(filters={"label": label}):
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    volume.remove(force=True)
                    removed.append(f"volume {volume.name}")
        label = f"{BENCH_LABEL}={bench.run_id}"
        for network in client.networks.list(filters={"label": label}):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                network.remove()
                removed.append(f"network {network.name}")
        for image in client.images.list(filters={"label": label}):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                client.images.remove(image.id, force=True)
                removed.append(f"image {', '.join(image.tags) or image.id}")
    finally:
        client.close()
    return removed


def remove_containers(client: Any, label: str) -> list[str]:
    """Force-remove the containers carrying `label`; return the names of those removed.

    The sparse list does not inspect each container, which fails when one goes away meanwhile
    (swe-rex's run with --rm, which the daemon finishes on its own).
    """
    import docker.errors

    removed = []
    for container in client.containers.list(all=True, sparse=True, filters={"label": label}):
        name = str((container.attrs.get("Names") or [container.id])[0]).lstrip("/")
        # Gone already, or being removed by the daemon (--rm): either way not ours to finish.
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            container.remove(force=True, v=True)
            removed.append(name)
    return removed


async def sweep_bwrap(bench: Bench) -> list[str]:
    """Remove every bubblewrap sandbox left under this run's state roots."""
    from sandbox.bubblewrap import BubblewrapBackend

    removed: list[str] = []
    for root in bench.bwrap_roots:
        if not root.is_dir():
            continue
        backend = BubblewrapBackend(root)
        try:
            for info in await backend.list({}):
                await backend.remove(info.id)
                removed.append(f"bwrap {info.name}")
        finally:
            await backend.aclose()
    return removed


def remove_work(bench: Bench) -> None:
    shutil.rmtree(bench.work, ignore_errors=True)
