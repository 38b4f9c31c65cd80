"""The Docker backend against a real daemon: hardening, the persistent shell, files."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import anyio
import docker
import pytest
import pytest_asyncio

from sandbox.base import Limits, SandboxSpec
from sandbox.docker import DockerBackend, DockerSandbox
from sandbox.errors import SandboxPathError
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


async def test_inside_the_process_has_no_privileges(sandbox: DockerSandbox) -> None:
    result = await sandbox.run_shell(
        "grep -E '^(Uid|CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; "
        "touch /etc/x 2>&1; ls /var/run/docker.sock 2>&1; ip -o link 2>/dev/null | wc -l",
        timeout=10,
    )
    fields = dict(line.split(":\t", 1) for line in result.output.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[0] == "1000"
    assert fields["CapEff"].strip() == fields["CapBnd"].strip() == "0000000000000000"
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"
    assert "Read-only file system" in result.output
    assert "No such file" in result.output


async def test_shell_keeps_cwd_and_environment(sandbox: DockerSandbox) -> None:
    await sandbox.run_shell("mkdir -p proj && cd proj && export GREETING=hello", timeout=10)
    result = await sandbox.run_shell('pwd; echo "$GREETING"', timeout=10)
    assert result.output == "/workspace/proj\nhello\n"
    assert result.exit_code == 0
    assert result.cwd == "/workspace/proj"


async def test_exit_codes_stderr_and_syntax_errors(sandbox: DockerSandbox) -> None:
    failed = await sandbox.run_shell("echo out; echo err >&2; false", timeout=10)
    assert failed.exit_code == 1
    assert failed.output == "out\nerr\n"
    broken = await sandbox.run_shell("echo 'unterminated", timeout=10)
    assert broken.exit_code == 2
    after = await sandbox.run_shell("echo still here", timeout=10)
    assert after.output == "still here\n"
    assert not after.shell_restarted


async def test_long_output_keeps_head_and_tail(sandbox: DockerSandbox) -> None:
    result = await sandbox.run_shell("seq 1 200000", timeout=30, output_limit=1000)
    assert result.output.startswith("1\n2\n3\n")
    assert result.output.rstrip().endswith("199999\n200000")
    assert "bytes of output truncated" in result.output
    assert result.truncated_bytes > 1_000_000


async def test_timeout_kills_the_command_but_keeps_the_shell(sandbox: DockerSandbox) -> None:
    await sandbox.run_shell("cd /tmp && export KEEP=1", timeout=10)
    result = await sandbox.run_shell("sleep 60", timeout=1)
    assert result.timed_out
    assert result.exit_code is None
    after = await sandbox.run_shell('pwd; echo "$KEEP"; pgrep -c sleep || true', timeout=10)
    assert after.output.splitlines()[:2] == ["/tmp", "1"]
    assert not after.shell_restarted


async def test_cancelling_a_command_kills_its_process_tree(sandbox: DockerSandbox) -> None:
    with anyio.move_on_after(1):
        await sandbox.run_shell("bash -c 'sleep 120 & sleep 121; wait'", timeout=300)
    with anyio.fail_after(15):
        result = await sandbox.run_shell("ps -eo args | grep -c '^sleep 12' || true", timeout=10)
    assert result.output.strip() == "0"


async def test_busy_builtin_loop_is_replaced_by_a_new_shell(sandbox: DockerSandbox) -> None:
    await sandbox.run_shell("cd /tmp", timeout=10)
    stuck = await sandbox.run_shell("while :; do :; done", timeout=1)
    assert stuck.timed_out
    after = await sandbox.run_shell("pwd", timeout=10)
    assert after.shell_restarted
    assert after.output == "/tmp\n"


async def test_files_round_trip_binary_safe(sandbox: DockerSandbox) -> None:
    data = bytes(range(256)) * 10
    await sandbox.write_file("/workspace/deep/dir/blob.bin", data)
    assert await sandbox.read_file("/workspace/deep/dir/blob.bin", max_bytes=len(data)) == data
    with pytest.raises(SandboxPathError, match="over the 10-byte limit"):
        await sandbox.read_file("/workspace/deep/dir/blob.bin", max_bytes=10)
    with pytest.raises(SandboxPathError, match="no such file"):
        await sandbox.read_file("/workspace/missing", max_bytes=10)
    with pytest.raises(SandboxPathError, match="not a regular file"):
        await sandbox.read_file("/workspace/deep", max_bytes=10)


async def test_symlinks_cannot_lead_reads_out_of_the_allowed_roots(
    sandbox: DockerSandbox,
) -> None:
    await sandbox.run_shell("ln -s /etc/passwd /workspace/passwd-link", timeout=10)
    with pytest.raises(SandboxPathError, match="outside the allowed"):
        await sandbox.read_file("/workspace/passwd-link", max_bytes=100_000, roots=["/workspace"])


async def test_uploads_written_as_root_are_read_only_to_the_agent(
    sandbox: DockerSandbox,
) -> None:
    await sandbox.write_file("/mnt/session/uploads/data.csv", b"a,b\n", user="0", mode=0o444)
    result = await sandbox.run_shell(
        "cat /mnt/session/uploads/data.csv; echo x >> /mnt/session/uploads/data.csv; "
        "rm -f /mnt/session/uploads/data.csv; cat /mnt/session/uploads/data.csv",
        timeout=10,
    )
    assert result.output.count("a,b") == 2
    assert "Permission denied" in result.output


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
