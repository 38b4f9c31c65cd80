"""Case 6: the same work for us and the peers: start a sandbox, run short commands, tear down."""

from __future__ import annotations

import contextlib
import io
import statistics
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from sandbox.base import SandboxSpec
from sandbox.bubblewrap import BubblewrapBackend
from sandbox.docker import DockerBackend

from .common import BENCH_LABEL, Bench, elapsed_ms, remove_containers
from .results import Case

COMMAND = "echo hi"
CYCLE_LIMIT_S = 90.0
SWEREX_VERSION = "1.4.0"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass
class Cycle:
    start: float
    commands: list[float]
    teardown: float
    extra: dict[str, list[float]] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.start + sum(self.commands) + self.teardown


def _check(output: str) -> None:
    if output.strip() != "hi":
        msg = f"`{COMMAND}` printed {output!r}"
        raise RuntimeError(msg)


class Peer:
    """One sandbox library doing the cycle; `blocked` says why it cannot run here, if it cannot.

    All run on the same daemon and image in the same run, interleaved round by round; a blocked
    peer is reported and the run goes on.
    """

    name = ""
    blocked: str | None = None

    async def setup(self, bench: Bench) -> None:
        """Prepare (untimed); set `blocked` instead of raising when this peer cannot run here."""

    async def cycle(self, bench: Bench, index: int, commands: int) -> Cycle:
        raise NotImplementedError

    async def cleanup(self, bench: Bench) -> None:
        """Remove what `setup` made (the run's final sweep catches anything left)."""


class OursDocker(Peer):
    name = "ours (Docker)"

    def __init__(self) -> None:
        self.backend: DockerBackend | None = None

    async def setup(self, bench: Bench) -> None:
        self.backend = DockerBackend(bench.docker_host)

    async def cycle(self, bench: Bench, index: int, commands: int) -> Cycle:
        assert self.backend is not None
        spec = SandboxSpec(
            image=bench.image, name=f"mab-{bench.run_id}-p{index}", labels=bench.labels
        )
        started = time.perf_counter()
        sandbox = await self.backend.create(spec)
        start = elapsed_ms(started)
        times = []
        for _ in range(commands):
            started = time.perf_counter()
            result = await sandbox.run_shell(COMMAND, timeout=30)
            times.append(elapsed_ms(started))
            _check(result.output)
        started = time.perf_counter()
        await sandbox.aclose()
        await self.backend.remove(spec.name)
        return Cycle(start, times, elapsed_ms(started))

    async def cleanup(self, bench: Bench) -> None:
        if self.backend is not None:
            await self.backend.aclose()


class OursBubblewrap(OursDocker):
    name = "ours (bubblewrap)"

    async def setup(self, bench: Bench) -> None:
        self.backend = BubblewrapBackend(bench.bwrap_root("bwrap-peers"))  # type: ignore[assignment]


class LlmSandbox(Peer):
    """llm-sandbox's Docker backend, with the defaults a user gets (its own docker client)."""

    name = "llm-sandbox"

    async def setup(self, bench: Bench) -> None:
        try:
            import llm_sandbox  # pyright: ignore[reportMissingImports]  # noqa: F401
        except ImportError as exc:
            self.blocked = f"blocked: llm-sandbox is not installed ({exc}); uv sync --group bench"
            return
        client = bench.docker()
        try:
            command = client.images.get(bench.image).attrs["Config"].get("Cmd")
        finally:
            client.close()
        if not command:
            # Its containers run the image's CMD; without one they exit at once.
            self.blocked = f"blocked: {bench.image} has no CMD, which llm-sandbox needs"

    async def cycle(self, bench: Bench, index: int, commands: int) -> Cycle:
        return await anyio.to_thread.run_sync(
            self._cycle_sync, bench, commands, abandon_on_cancel=True
        )

    @staticmethod
    def _cycle_sync(bench: Bench, commands: int) -> Cycle:
        from llm_sandbox import SandboxSession  # pyright: ignore[reportMissingImports]

        started = time.perf_counter()
        session: Any = SandboxSession(
            backend="docker",
            image=bench.image,
            # Its Python setup makes a venv and upgrades pip from PyPI; we do neither.
            skip_environment_setup=True,
            runtime_configs={"network_mode": "none", "labels": dict(bench.labels)},
        )
        session.open()
        start = elapsed_ms(started)
        times = []
        try:
            for _ in range(commands):
                started = time.perf_counter()
                result = session.execute_command(COMMAND)
                times.append(elapsed_ms(started))
                _check(result.stdout)
        finally:
            started = time.perf_counter()
            session.close()
            teardown = elapsed_ms(started)
        return Cycle(start, times, teardown)


class SweRex(Peer):
    """swe-rex's DockerDeployment: `docker run -p` of an image with `swerex-remote`, then HTTP."""

    name = "swe-rex"

    def __init__(self) -> None:
        self.image = ""
        self.network = ""
        self.build_seconds = 0.0

    async def setup(self, bench: Bench) -> None:
        try:
            import swerex.deployment.docker  # pyright: ignore[reportMissingImports]  # noqa: F401
        except ImportError as exc:
            self.blocked = f"blocked: swe-rex cannot be imported ({exc}); uv sync --group bench"
            return
        self.image = f"managed-agents-bench-swerex:{bench.run_id}"
        self.network = f"managed-agents-bench-{bench.run_id}"
        started = time.perf_counter()
        problem = await anyio.to_thread.run_sync(self._prepare_sync, bench)
        self.build_seconds = time.perf_counter() - started
        if problem:
            self.blocked = f"blocked: {problem}"

    def _prepare_sync(self, bench: Bench) -> str | None:
        import docker.errors

        client = bench.docker()
        try:
            try:
                # It publishes a port (-p), which needs a bridge; the daemon has no default one.
                client.networks.create(self.network, driver="bridge", labels=dict(bench.labels))
            except docker.errors.APIError as exc:
                return f"creating a bridge network for its published port failed: {exc}"
            return _build_swerex_image(client, bench, self.image)
        finally:
            client.close()

    async def cleanup(self, bench: Bench) -> None:
        if self.image:
            await anyio.to_thread.run_sync(self._cleanup_sync, bench)

    def _cleanup_sync(self, bench: Bench) -> None:
        import docker.errors

        client = bench.docker()
        try:
            # Its containers run with --rm, which the daemon finishes after `docker kill`
            # returns; the network can only go once they are gone (bounded polling).
            label = f"{BENCH_LABEL}={bench.run_id}"
            deadline = time.monotonic() + 30
            while client.containers.list(all=True, sparse=True, filters={"label": label}):
                remove_containers(client, label)
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            for network in client.networks.list(names=[self.network]):
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    network.remove()
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                client.images.remove(self.image, force=True)
        finally:
            client.close()

    async def cycle(self, bench: Bench, index: int, commands: int) -> Cycle:
        from swerex.deployment.docker import DockerDeployment  # pyright: ignore[reportMissingImports]
        from swerex.runtime.abstract import (  # pyright: ignore[reportMissingImports]
            BashAction,
            Command,
            CreateBashSessionRequest,
        )

        deployment: Any = DockerDeployment(
            image=self.image,
            pull="never",
            docker_args=["--network", self.network, "--label", f"{BENCH_LABEL}={bench.run_id}"],
            startup_timeout=60,
        )
        started = time.perf_counter()
        try:
            await deployment.start()
            runtime = deployment.runtime
            await runtime.create_session(CreateBashSessionRequest())
            start = elapsed_ms(started)
            times, one_shot = [], []
            for _ in range(commands):
                started = time.perf_counter()
                result = await runtime.run_in_session(BashAction(command=COMMAND))
                times.append(elapsed_ms(started))
                _check(result.output)
            for _ in range(commands):
                started = time.perf_counter()
                result = await runtime.execute(Command(command=COMMAND, shell=True))
                one_shot.append(elapsed_ms(started))
                _check(result.stdout)
        finally:
            started = time.perf_counter()
            await deployment.stop()
            teardown = elapsed_ms(started)
        return Cycle(start, times, teardown, {"execute": one_shot})


def _build_swerex_image(client: Any, bench: Bench, tag: str) -> str | None:
    """Build FROM the sandbox image with swe-rex pip-installed; return why it failed, or None.

    The daemon has no default bridge, so the build uses the host's network; pip inside trusts
    the host's CA bundle (the way out to PyPI here may re-sign TLS).
    """
    import docker.errors

    dockerfile = (
        f"FROM {bench.image}\n"
        "USER root\n"
        "COPY ca.crt /etc/ssl/certs/bench-host-ca.crt\n"
        "RUN PIP_CERT=/etc/ssl/certs/bench-host-ca.crt python3 -m pip install --no-cache-dir "
        f"--break-system-packages --root-user-action=ignore swe-rex=={SWEREX_VERSION} "
        "&& swerex-remote --help >/dev/null\n"
        "USER 1000:1000\n"
    )
    ca = CA_BUNDLE.read_bytes() if CA_BUNDLE.is_file() else b""
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data in (("Dockerfile", dockerfile.encode()), ("ca.crt", ca)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    output: list[str] = []
    try:
        for chunk in client.api.build(
            fileobj=context,
            custom_context=True,
            tag=tag,
            rm=True,
            forcerm=True,
            pull=False,
            decode=True,
            network_mode="host",
            labels=dict(bench.labels),
        ):
            output.extend(str(chunk.get("stream", "")).splitlines())
            if "error" in chunk:
                tail = " | ".join(line for line in output[-6:] if line.strip())
                return f"building its image (pip install swe-rex) failed: {chunk['error']} {tail}"
    except docker.errors.APIError as exc:
        return f"building its image failed: {exc}"
    return None


def _rotate(items: list[Peer], by: int) -> list[Peer]:
    by %= len(items)
    return items[by:] + items[:by]


async def run(bench: Bench, case: Case) -> None:
    reps, commands = bench.counts.peer_reps, bench.counts.peer_commands
    peers: list[Peer] = [OursDocker(), OursBubblewrap(), LlmSandbox(), SweRex()]
    cycles: dict[str, list[Cycle]] = {p.name: [] for p in peers}
    try:
        for peer in peers:
            await peer.setup(bench)
        for rep in range(reps):
            # Rotated each round so drift in the machine's load hits every library alike.
            for peer in _rotate([p for p in peers if p.blocked is None], rep):
                try:
                    with anyio.fail_after(CYCLE_LIMIT_S):
                        cycles[peer.name].append(await peer.cycle(bench, rep, commands))
                except Exception as exc:
                    peer.blocked = f"blocked: failed while running: {type(exc).__name__}: {exc}"
    finally:
        with anyio.CancelScope(shield=True):
            for peer in peers:
                await peer.cleanup(bench)

    for peer in peers:
        case.peers[peer.name] = peer.blocked or "ran"
        done = cycles[peer.name]
        if not done or peer.blocked:
            continue
        _rows(case, peer.name, done, commands)
        if isinstance(peer, SweRex):
            case.add(
                f"swe-rex: per command via runtime.execute (one-shot `{COMMAND}`)",
                "ms",
                [t for c in done for t in c.extra["execute"]],
                "a fresh subprocess per call in its server; not part of its total",
            )
            case.notes.append(
                f"swe-rex setup (untimed above): derived image with swe-rex {SWEREX_VERSION} "
                f"built in {peer.build_seconds:.1f} s; a user-defined bridge network for its "
                "published port"
            )
    ours = "ours (Docker)"
    for peer in peers:
        if peer.name.startswith("ours") or case.peers[peer.name] != "ran":
            continue
        for part in ("total", "start", "per command", "tear down"):
            case.ratio(
                f"{ours} / {peer.name}, {part}",
                _row_name(ours, part, commands),
                _row_name(peer.name, part, commands),
            )
    case.notes.append(
        f"each round: start a sandbox, run `{COMMAND}` {commands} times (output checked), tear "
        f"down; {reps} rounds, libraries interleaved; all on image {bench.image}"
    )


def _row_name(peer: str, part: str, commands: int) -> str:
    return {
        "total": f"{peer}: total (start + {commands} × `{COMMAND}` + tear down)",
        "start": f"{peer}: start, until ready for a command",
        "per command": f"{peer}: per command",
        "tear down": f"{peer}: tear down",
    }[part]


def _rows(case: Case, peer: str, done: list[Cycle], commands: int) -> None:
    values: dict[str, Callable[[Cycle], list[float]]] = {
        "total": lambda c: [c.total],
        "start": lambda c: [c.start],
        "per command": lambda c: c.commands,
        "tear down": lambda c: [c.teardown],
    }
    for part, pick in values.items():
        samples = [v for cycle in done for v in pick(cycle)]
        case.add(_row_name(peer, part, commands), "ms", samples)
    medians = [statistics.median(c.commands) for c in done]
    case.rows[-3].extra["median_per_round_ms"] = medians
