"""Collecting /mnt/session/outputs: a tar stream out of the sandbox, hashed into the blob store
as it arrives, trusting nothing in the archive."""

from __future__ import annotations

import hashlib
import io
import secrets
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from sandbox.base import Limits, SandboxSpec
from sandbox.docker import DockerBackend, DockerSandbox
from server.core.files import BlobStore
from server.runner.sandboxes import store_members, stream_outputs
from tests.conftest import IMAGE

LABELS = {"managed-agents-mcp": "1", "managed-agents-mcp.test": "outputs"}


def _archive(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def test_only_wanted_regular_files_are_stored(tmp_path: Path) -> None:
    """Member names are not trusted: `..`, absolute paths, links, devices and names nobody
    asked for are skipped, and nothing but blobs appears on the host."""
    blobs = BlobStore(tmp_path / "blobs")
    archive = _archive(
        (_member("./report.txt"), b"total: 3\n"),
        (_member("../escape.txt"), b"evil"),
        (_member("/etc/cron.d/evil"), b"evil"),
        (_member("./link", tarfile.SYMTYPE, "/etc/passwd"), b""),
        (_member("./hard", tarfile.LNKTYPE, "report.txt"), b""),
        (_member("./fifo", tarfile.FIFOTYPE), b""),
        (_member("./charts/../report.txt"), b"a second copy under the same name"),
        (_member("./charts/plot.png"), b"png"),
        (_member("./not-asked-for.txt"), b"extra"),
    )
    wanted = {"report.txt", "link", "hard", "fifo", "charts/plot.png", "../escape.txt"}
    stored = store_members(io.BytesIO(archive), blobs, wanted)
    assert stored == {
        "report.txt": (hashlib.sha256(b"total: 3\n").hexdigest(), 9),
        "charts/plot.png": (hashlib.sha256(b"png").hexdigest(), 3),
    }
    for sha, _ in stored.values():
        assert blobs.path(sha).is_file()
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {f"blobs/{sha[:2]}/{sha}" for sha, _ in stored.values()}


def test_a_cut_off_archive_keeps_the_files_that_arrived_whole(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    whole = _archive((_member("./a.txt"), b"a" * 5000), (_member("./b.bin"), b"b" * 50_000))
    cut = whole[: len(whole) - 30_000]
    stored = store_members(io.BytesIO(cut), blobs, {"a.txt", "b.bin"})
    assert list(stored) == ["a.txt"]
    assert not list((tmp_path / "blobs").glob(".incoming-*"))


@pytest_asyncio.fixture
async def sandbox() -> AsyncIterator[DockerSandbox]:
    backend = DockerBackend()
    name = f"ma-test-{secrets.token_hex(4)}"
    spec = SandboxSpec(image=IMAGE, name=name, labels=LABELS, limits=Limits(pids=128))
    created = await backend.create(spec)
    try:
        yield created
    finally:
        await created.aclose()
        await backend.remove(name)
        await backend.aclose()


@pytest.mark.asyncio
@pytest.mark.docker
async def test_outputs_stream_out_of_a_docker_sandbox(
    sandbox: DockerSandbox, tmp_path: Path
) -> None:
    """Regular files arrive whole and hashed; a link to a file outside outputs, a fifo and a
    file that does not exist are left out."""
    await sandbox.run_shell(
        "cd /mnt/session/outputs && mkdir -p 'deep dir' && printf 'total: 3\\n' > report.txt && "
        "head -c 3000000 /dev/urandom > 'deep dir/data.bin' && ln -s /etc/passwd passwd && "
        "mkfifo fifo && printf x > -x.txt",
        timeout=30,
    )
    data = await sandbox.read_file("/mnt/session/outputs/deep dir/data.bin", max_bytes=4 << 20)
    blobs = BlobStore(tmp_path / "blobs")
    paths = ["report.txt", "deep dir/data.bin", "passwd", "fifo", "missing", "-x.txt"]
    stored = await stream_outputs(sandbox, blobs, paths)
    assert stored == {
        "report.txt": (hashlib.sha256(b"total: 3\n").hexdigest(), 9),
        "deep dir/data.bin": (hashlib.sha256(data).hexdigest(), len(data)),
        "-x.txt": (hashlib.sha256(b"x").hexdigest(), 1),
    }
    assert blobs.path(stored["deep dir/data.bin"][0]).read_bytes() == data
