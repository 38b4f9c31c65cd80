"""Docker-specific checks (the shared behaviour is in tests/contracts, run for every backend)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import docker
import pytest
import pytest_asyncio

from sandbox.base import Limits, SandboxSpec
from sandbox.docker import DockerBackend, DockerSandbox
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
