"""Docker-specific checks (the shared behaviour is in tests/contracts, run for every backend)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import anyio
import docker
import pytest
import pytest_asyncio

from sandbox.base import Limits, SandboxSpec
from sandbox.docker import WORKSPACE_LIMIT_LABEL, DockerBackend, DockerSandbox
from tests.conftest import IMAGE

pytestmark = [pytest.mark.asyncio, pytest.mark.docker]
LABELS = {"managed-agents-mcp": "1", "managed-agents-mcp.test": "sandbox"}


@pytest_asyncio.fixture
async def backend() -> AsyncIterator[DockerBackend]:
    backend = DockerBackend()
    yield backend
    await backend.aclose()


@pytest_asyncio.fixture
async def sandbox(backend: DockerBackend) -> AsyncIterator[DockerSandbox]:
    name = f"ma-test-{secrets.token_hex(4)}"
    spec = SandboxSpec(
        image=IMAGE, name=name, labels=LABELS, limits=Limits(memory_bytes=512 << 20, pids=128)
    )
    created = await backend.create(spec)
    try:
        yield created
    finally:
        await created.aclose()
        await backend.remove(name)


async def test_container_is_hardened(sandbox: DockerSandbox) -> None:
    """The container runs with the hardened profile, whatever the image says."""
    client = docker.from_env()
    try:
        attrs = client.containers.get(sandbox.id).attrs
    finally:
        client.close()
    host = attrs["HostConfig"]
    assert host["CapDrop"] == ["ALL"]
    assert not host["CapAdd"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["ReadonlyRootfs"] is True
    assert host["Privileged"] is False
    assert host["PidsLimit"] == 128
    assert host["Memory"] == host["MemorySwap"] == 512 << 20
    assert host["NetworkMode"] == "none"
    assert host["IpcMode"] == "private"
    assert host["Init"] is True
    assert attrs["Config"]["User"] == "1000:1000"
    assert host["Ulimits"] == [{"Name": "fsize", "Soft": 10 << 30, "Hard": 10 << 30}]
    assert attrs["Config"]["Labels"][WORKSPACE_LIMIT_LABEL] == str(10 << 30)
    assert all("docker.sock" not in (m.get("Source") or "") for m in attrs["Mounts"])
    assert [m["Type"] for m in attrs["Mounts"]] == ["volume"]


async def test_remove_deletes_container_and_workspace(backend: DockerBackend) -> None:
    name = f"ma-test-{secrets.token_hex(4)}"
    sandbox = await backend.create(SandboxSpec(image=IMAGE, name=name, labels=LABELS))
    await sandbox.aclose()
    assert [s.name for s in await backend.list({"managed-agents-mcp.test": "sandbox"})].count(
        name
    ) == 1
    await backend.remove(name)
    await backend.remove(name)  # idempotent
    client = docker.from_env()
    try:
        assert not client.containers.list(all=True, filters={"name": name})
        assert not [v for v in client.volumes.list() if v.name == f"{name}-workspace"]
    finally:
        client.close()


async def test_attach_keeps_the_workspace_limit(
    sandbox: DockerSandbox, backend: DockerBackend
) -> None:
    """A handle made by `attach` (another server process, a restart) checks the same limit."""
    again = await backend.attach(sandbox.id)
    try:
        assert again.workspace_limit == sandbox.workspace_limit == 10 << 30
    finally:
        await again.aclose()


# Run by bash: its processes retry failed forks and linger (dash gives up and dies out).
ROOT_BOMB = "exec </dev/null >/dev/null 2>&1; bomb() { bomb | bomb & }; bomb"
FULL = (
    "read -r c < /sys/fs/cgroup/pids/pids.current 2>/dev/null "
    "|| read -r c < /sys/fs/cgroup/pids.current; echo $c"
)


async def test_a_sandbox_whose_processes_cannot_be_killed_is_restarted(
    sandbox: DockerSandbox,
) -> None:
    """Processes the sandbox user cannot kill (root's, here, started by the server) fill the
    pids limit: the container is restarted, /workspace kept, the owner's hook called."""
    restarted = anyio.Event()

    async def put_files_back() -> None:
        restarted.set()

    sandbox.after_restart = put_files_back
    await sandbox.run_shell("echo kept > /workspace/kept; touch /tmp/lost", timeout=10)
    await sandbox.exec(["bash", "-c", ROOT_BOMB], user="0", timeout=10)
    with anyio.fail_after(30):
        while True:
            probe = await sandbox.exec(["sh", "-c", FULL], timeout=10)
            if probe.exit_code == 0 and int(probe.stdout) >= 124:
                break
    with anyio.fail_after(120):
        result = await sandbox.run_shell("echo ok; cat /workspace/kept; ls -A /tmp", timeout=30)
    assert result.output.endswith("ok\nkept\n"), result
    assert "restarted" in result.notices[-1]
    assert result.shell_restarted
    assert restarted.is_set()
    probe = await sandbox.exec(["sh", "-c", FULL], timeout=10)
    assert int(probe.stdout) < 10
