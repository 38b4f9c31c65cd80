"""Building the default sandbox image: from the Dockerfile (registry) or offline (debootstrap)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .base import AGENT_HOME, DEFAULT_PATH, OUTPUTS_DIR, UPLOADS_DIR, WORKSPACE
from .errors import EnvironmentBuildError, ImageBuildError, map_docker_errors

if TYPE_CHECKING:
    import docker

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


# ------------------------------------------------------------------ environment images

INSTALL_ORDER = ("apt", "cargo", "gem", "go", "npm", "pip")
"""The API's order: package managers run alphabetically."""
DERIVED_REPOSITORY = "managed-agents-env"
BUILDER_VERSION = "1"


def _install_command(manager: str, specs: Sequence[str]) -> str:
    """One shell command installing `specs` with `manager` (every spec shell-quoted)."""
    import shlex

    quoted = " ".join(shlex.quote(s) for s in specs)
    if manager == "apt":
        return (
            "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
            f"--no-install-recommends {quoted} && rm -rf /var/lib/apt/lists/*"
        )
    if manager == "cargo":
        parts = []
        for spec in specs:
            name, _, version = spec.partition("@")
            pin = f" --version {shlex.quote(version)}" if version else ""
            parts.append(f"cargo install --root /usr/local {shlex.quote(name)}{pin}")
        return " && ".join(parts)
    if manager == "gem":
        parts = []
        for spec in specs:
            name, _, version = spec.partition(":")
            pin = f" -v {shlex.quote(version)}" if version else ""
            parts.append(f"gem install --no-document {shlex.quote(name)}{pin}")
        return " && ".join(parts)
    if manager == "go":
        return " && ".join(
            f"GOBIN=/usr/local/bin go install {shlex.quote(s if '@' in s else s + '@latest')}"
            for s in specs
        )
    if manager == "npm":
        return f"npm install -g --no-fund --no-audit {quoted}"
    if manager == "pip":
        return (
            "python3 -m pip install --no-cache-dir --break-system-packages "
            f"--root-user-action=ignore {quoted}"
        )
    msg = f"unknown package manager {manager!r}"
    raise ValueError(msg)


CA_PATH = "/usr/local/share/ca-certificates/managed-agents-extra.crt"


def environment_dockerfile(
    base_image: str,
    packages: Mapping[str, Sequence[str]],
    *,
    extra: str | None = None,
    build_args: Sequence[str] = (),
    ca_bundle: bool = False,
) -> str:
    """The Dockerfile of an environment image: base, optional user steps, then packages.

    Each manager gets its own RUN step (so a failure names it) and a marker echo naming the
    manager, which `EnvironmentBuildError` messages use. `build_args` are declared as ARG so
    the operator's index and proxy settings reach the installers without being kept in the
    image; with `ca_bundle`, the build context's `ca.crt` is trusted by the image.
    """
    lines = [f"FROM {base_image}", "USER root"]
    lines += [f"ARG {name}" for name in build_args]
    if ca_bundle:
        lines += [
            f"COPY ca.crt {CA_PATH}",
            "RUN (update-ca-certificates >/dev/null 2>&1 || true) && "
            f"cat {CA_PATH} >> /etc/ssl/certs/ca-certificates.crt",
            f"ENV NODE_EXTRA_CA_CERTS={CA_PATH}",
        ]
    if extra:
        lines.append(extra.strip())
    for manager in INSTALL_ORDER:
        specs = list(packages.get(manager) or [])
        if specs:
            lines.append(
                f'RUN echo "### installing {manager}: {" ".join(specs)}" && '
                + _install_command(manager, specs)
            )
    lines += [
        "RUN mkdir -p /workspace /mnt/session/uploads /mnt/session/outputs /home/agent "
        "&& chown 1000:1000 /workspace /mnt/session/outputs /home/agent",
        "USER 1000:1000",
        "WORKDIR /workspace",
    ]
    return "\n".join(lines) + "\n"


def environment_image_tag(base_image_id: str, dockerfile: str) -> str:
    """Content-addressed tag: the same base and recipe always give the same tag."""
    digest = hashlib.sha256(
        f"{BUILDER_VERSION}\n{base_image_id}\n{dockerfile}".encode()
    ).hexdigest()
    return f"{DERIVED_REPOSITORY}:{digest[:16]}"


def build_environment_image(
    client: docker.DockerClient,
    *,
    base_image: str,
    packages: Mapping[str, Sequence[str]],
    dockerfile_extra: str | None = None,
    network_mode: str | None = None,
    build_args: Mapping[str, str] | None = None,
    ca_bundle: bytes | None = None,
) -> str:
    """Build (or reuse) the image for an environment; blocking. Returns its tag.

    `build_args` (index URLs, proxies) are not part of the content hash: they change where
    packages come from, not what the image holds.

    Raises:
        ImageNotFound: the base image is missing.
        EnvironmentBuildError: a step failed (message names the package manager and packages,
            with the installer's last output lines).
    """
    import io

    import docker.errors

    with map_docker_errors("image.build", image=base_image):
        base_id = str(client.images.get(base_image).id)
    args = dict(build_args or {})
    dockerfile = environment_dockerfile(
        base_image,
        packages,
        extra=dockerfile_extra,
        build_args=sorted(args),
        ca_bundle=ca_bundle is not None,
    )
    key_source = dockerfile + (hashlib.sha256(ca_bundle).hexdigest() if ca_bundle else "")
    tag = environment_image_tag(base_id, key_source)
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    output: list[str] = []
    try:
        context = io.BytesIO()
        with tarfile.open(fileobj=context, mode="w") as tar:
            for name, data in (("Dockerfile", dockerfile.encode()), ("ca.crt", ca_bundle)):
                if data is None:
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        context.seek(0)
        stream = client.api.build(
            fileobj=context,
            custom_context=True,
            buildargs=args,
            tag=tag,
            rm=True,
            forcerm=True,
            pull=False,
            decode=True,
            network_mode=network_mode,
            labels={"managed-agents-mcp": "1"},
        )
        for chunk in stream:
            if "stream" in chunk:
                output.extend(str(chunk["stream"]).splitlines())
            if "error" in chunk:
                raise EnvironmentBuildError(
                    _describe_failure(str(chunk["error"]), output), op="image.build"
                )
    except docker.errors.APIError as exc:
        raise EnvironmentBuildError(
            _describe_failure(str(exc.explanation or exc), output), op="image.build"
        ) from exc
    return tag


def _describe_failure(error: str, output: Sequence[str]) -> str:
    step = next(
        (
            line.split("### installing ", 1)[1]
            for line in reversed(output)
            if "### installing" in line
        ),
        None,
    )
    tail = "\n".join(line for line in output[-12:] if line.strip())
    where = f"installing {step}" if step else "building the environment image"
    return f"{where} failed: {error.strip()}\n--- last output lines ---\n{tail}"
