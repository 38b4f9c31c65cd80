"""Building the default sandbox image: from the Dockerfile (registry) or offline (debootstrap)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .base import AGENT_HOME, DEFAULT_PATH, OUTPUTS_DIR, UPLOADS_DIR, WORKSPACE
from .errors import SandboxError, map_docker_errors

logger = logging.getLogger(__name__)

DEFAULT_IMAGE = "managed-agents-sandbox:latest"
DOCKERFILE_DIR = Path(__file__).parent / "image"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SUITE = "bookworm"
SANDBOX_PACKAGES = (
    "bash",
    "ca-certificates",
    "curl",
    "git",
    "less",
    "nodejs",
    "npm",
    "procps",
    "python3",
    "python3-pip",
    "python3-venv",
    "ripgrep",
    "tini",
)
IMAGE_CHANGES = (
    "USER 1000:1000",
    f"WORKDIR {WORKSPACE}",
    f"ENV HOME={AGENT_HOME}",
    f"ENV PATH={DEFAULT_PATH}",
    "ENV LANG=C.UTF-8",
    'CMD ["sleep", "infinity"]',
)


class ImageBuildError(SandboxError):
    """Building the sandbox image failed."""

    code = "image_build_error"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "managed-agents-mcp"


def _run(argv: Sequence[str], *, what: str) -> None:
    logger.info("running: %s", " ".join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        msg = f"{what} failed (exit {proc.returncode}):\n{tail}"
        raise ImageBuildError(msg, op="image.build")


def build_rootfs(
    cache_dir: Path,
    *,
    mirror: str = DEFAULT_MIRROR,
    suite: str = DEFAULT_SUITE,
    packages: Sequence[str] = SANDBOX_PACKAGES,
) -> Path:
    """Create (or reuse) a Debian root filesystem with the sandbox's packages, user and dirs.

    Needs root, `debootstrap` and `chroot`. The result is cached under `cache_dir` by a hash of
    its inputs, so a second build costs nothing.

    Raises:
        ImageBuildError: a tool is missing or a step failed.
    """
    if os.geteuid() != 0:
        msg = "the offline build needs root (debootstrap and chroot); run it with sudo"
        raise ImageBuildError(msg, op="image.build")
    if shutil.which("debootstrap") is None:
        msg = "debootstrap is not installed; install it (e.g. `apt-get install debootstrap`)"
        raise ImageBuildError(msg, op="image.build")
    key = hashlib.sha256("\n".join([mirror, suite, *sorted(packages), "v2"]).encode()).hexdigest()
    rootfs = cache_dir / f"rootfs-{suite}-{key[:12]}"
    done = rootfs.with_suffix(".done")
    if done.exists() and rootfs.is_dir():
        logger.info("reusing cached rootfs %s", rootfs)
        return rootfs
    if rootfs.exists():
        shutil.rmtree(rootfs)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _run(
        ["debootstrap", "--variant=minbase", suite, str(rootfs), mirror],
        what="debootstrap",
    )
    # Installing the rest with apt inside the chroot resolves dependencies properly, which
    # debootstrap's own --include does not (npm's tree fails to configure that way).
    env_prefix = ["env", "DEBIAN_FRONTEND=noninteractive", "LANG=C.UTF-8"]
    chroot = ["chroot", str(rootfs), *env_prefix]
    _run(
        [*chroot, "apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        what="apt-get install " + " ".join(packages),
    )
    _run(
        [
            *chroot,
            "useradd",
            "-u",
            "1000",
            "-U",
            "-m",
            "-d",
            AGENT_HOME,
            "-s",
            "/bin/bash",
            "agent",
        ],
        what="useradd",
    )
    _run([*chroot, "apt-get", "clean"], what="apt-get clean")
    for sub in ("var/lib/apt/lists", "usr/share/doc", "usr/share/man", "tmp"):
        target = rootfs / sub
        if target.exists():
            shutil.rmtree(target)
            target.mkdir()
    (rootfs / "tmp").chmod(0o1777)
    for path, owner in ((WORKSPACE, 1000), (UPLOADS_DIR, 0), (OUTPUTS_DIR, 1000)):
        target = rootfs / path.lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        os.chown(target, owner, owner)
    done.touch()
    return rootfs


def import_rootfs(rootfs: Path, tag: str, *, docker_host: str | None = None) -> str:
    """Pack `rootfs` into a tarball and `docker import` it as `tag`; return the image id."""
    import docker

    with tempfile.TemporaryDirectory(prefix="ma-image-") as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        with tarfile.open(tarball, "w") as tar:
            for entry in sorted(rootfs.iterdir()):
                tar.add(entry, arcname=entry.name, recursive=True)
        with map_docker_errors("image.import"):
            client = docker.DockerClient(base_url=docker_host) if docker_host else docker.from_env()
            try:
                repository, _, version = tag.rpartition(":")
                if not repository:
                    repository, version = tag, "latest"
                result = client.api.import_image_from_file(
                    str(tarball), repository=repository, tag=version, changes=list(IMAGE_CHANGES)
                )
            finally:
                client.close()
    logger.info("imported %s: %s", tag, str(result).strip()[:200])
    return tag


def build_offline(
    tag: str = DEFAULT_IMAGE,
    *,
    cache_dir: Path | None = None,
    mirror: str = DEFAULT_MIRROR,
    suite: str = DEFAULT_SUITE,
    docker_host: str | None = None,
) -> str:
    """Build the sandbox image with no registry: debootstrap from a Debian mirror, then import."""
    rootfs = build_rootfs(cache_dir or default_cache_dir(), mirror=mirror, suite=suite)
    return import_rootfs(rootfs, tag, docker_host=docker_host)


def build_from_dockerfile(tag: str = DEFAULT_IMAGE, *, docker_host: str | None = None) -> str:
    """Build the sandbox image from `sandbox/image/Dockerfile` (pulls its base from a registry)."""
    import docker

    with map_docker_errors("image.build"):
        client = docker.DockerClient(base_url=docker_host) if docker_host else docker.from_env()
        try:
            client.images.build(path=str(DOCKERFILE_DIR), tag=tag, rm=True, pull=False)
        finally:
            client.close()
    return tag
