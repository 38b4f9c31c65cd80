"""Every sandbox conformance check against every backend: Docker, and bubblewrap with both
of its limit mechanisms (cgroup v1 where the host allows it, rlimits otherwise)."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from sandbox.base import SandboxBackend
from sandbox.bubblewrap import CGROUP_PREFIX, BubblewrapBackend
from sandbox.docker import DockerBackend
from tests.conftest import IMAGE
from tests.contracts.sandbox import CONFORMANCE_CHECKS, Check, Harness

TEST_LABEL = {"managed-agents-mcp.test": "conformance"}
CASE_LABEL = "managed-agents-mcp.conformance-case"
BACKENDS = ("docker", "bubblewrap", "bubblewrap-rlimits")

_NO_PIDS_GUARD = (
    "bubblewrap mounts no /sys, so the shell cannot see that the sandbox ran out of processes, "
    "and entering it to kill them forks inside the full cgroup (or NPROC) in the first place"
)
KNOWN_GAPS: dict[tuple[str, str], str] = {
    (backend, check): reason
    for backend in ("bubblewrap", "bubblewrap-rlimits")
    for check, reason in (
        ("check_running_out_of_processes_is_cleared_before_the_next_command", _NO_PIDS_GUARD),
    )
}


def _cases() -> Iterator[object]:
    for backend in BACKENDS:
        for check in CONFORMANCE_CHECKS:
            marks: list[pytest.MarkDecorator] = []
            marks.append(pytest.mark.docker if backend == "docker" else pytest.mark.bubblewrap)
            gap = KNOWN_GAPS.get((backend, check.__name__))
            if gap:
                marks.append(pytest.mark.xfail(strict=True, reason=gap))
            name = check.__name__.removeprefix("check_")
            yield pytest.param(backend, check, id=f"{backend}-{name}", marks=marks)


@pytest.fixture
def state_parent() -> Iterator[Path]:
    """A traversable scratch dir for bubblewrap state; it must be empty again after the test."""
    parent = Path(tempfile.mkdtemp(prefix="ma-bwrap-conformance-"))
    parent.chmod(0o711)  # bwrap runs as the sandbox uid and must reach the bind sources
    yield parent
    shutil.rmtree(parent, ignore_errors=True)


def _host_dirs(*extra: Path) -> list[str]:
    candidates = [Path.home(), Path.cwd(), *extra]
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        candidates.append(Path(host.removeprefix("unix://")).parent)
    return [str(p) for p in candidates if p.is_dir() and any(p.iterdir())]


def _docker_leftovers(case: str) -> list[str]:
    client = docker.from_env()
    try:
        label = f"{CASE_LABEL}={case}"
        containers = client.containers.list(all=True, filters={"label": label})
        volumes = client.volumes.list(filters={"label": label})
        return [f"container {c.name}" for c in containers] + [f"volume {v.name}" for v in volumes]
    finally:
        client.close()


def _bwrap_leftovers(state_root: Path, case: str) -> list[str]:
    left = [f"state {p}" for p in state_root.iterdir()] if state_root.exists() else []
    cgroups = Path("/sys/fs/cgroup")
    pattern = f"{CGROUP_PREFIX}ma-conf-*"
    for controller in ("memory", "pids", "cpu"):
        left += [f"cgroup {p}" for p in (cgroups / controller).rglob(pattern)]
    return left


@pytest.mark.asyncio
@pytest.mark.parametrize(("backend_name", "check"), list(_cases()))
async def test_conformance(backend_name: str, check: Check, state_parent: Path) -> None:
    case = secrets.token_hex(6)
    labels = {**TEST_LABEL, CASE_LABEL: case}
    state_root = state_parent / "state"
    backend: SandboxBackend
    if backend_name == "docker":
        backend = DockerBackend()
        host_dirs = _host_dirs()
    else:
        backend = BubblewrapBackend(state_root, cgroups=backend_name == "bubblewrap")
        host_dirs = _host_dirs(state_parent)
    harness = Harness(backend=backend, image=IMAGE, labels=labels, host_dirs=host_dirs)
    try:
        await check(harness)
    finally:
        await backend.aclose()
    if backend_name == "docker":
        assert _docker_leftovers(case) == []
    else:
        assert _bwrap_leftovers(state_root, case) == []
