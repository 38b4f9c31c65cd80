"""The two seams of every sandbox backend: `SandboxBackend` (lifecycle), `Sandbox` (operations)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

WORKSPACE = "/workspace"
"""The sub-agent's working directory; it survives container restarts."""

SESSION_MOUNT_ROOT = "/mnt/session"
UPLOADS_DIR = "/mnt/session/uploads"
OUTPUTS_DIR = "/mnt/session/outputs"
AGENT_HOME = "/home/agent"
DEFAULT_USER = "1000:1000"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits for one sandbox.

    Usage::

        Limits(memory_bytes=2 << 30, cpus=1.5, pids=256)   # 2 GiB, 1.5 CPUs, 256 processes
    """

    memory_bytes: int = 2 << 30
    cpus: float = 2.0
    pids: int = 256
    tmp_bytes: int = 512 << 20
    """Size of the `/tmp` tmpfs."""
    home_bytes: int = 256 << 20
    """Size of the `$HOME` tmpfs."""
    outputs_bytes: int = 512 << 20
    """Size of the `/mnt/session/outputs` tmpfs."""
    uploads_bytes: int = 1 << 30
    """Size of the read-only `/mnt/session/uploads` tmpfs the server fills."""
    workspace_bytes: int = 10 << 30
    """How much `/workspace` may hold (it lives on the host's disk, not in memory).

    Enforced in two ways (see `sandbox.shell`, "Workspace size"): a `du` after shell commands
    that, over the limit, turns file writes off until the agent deletes enough; and, on Docker,
    `RLIMIT_FSIZE` so that no single file can outgrow the limit at all."""


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """Everything a backend needs to create one session's sandbox."""

    image: str
    name: str
    """A unique, human-readable name (the container name for Docker)."""
    labels: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    egress_socket_dir: str | None = None
    """Host directory holding the session's egress proxy socket; None means no network at all.

    The sandbox itself never has a network interface besides loopback: outbound HTTP(S) goes
    through a forwarder on 127.0.0.1:3128 to this socket (see `sandbox.egress`)."""
    user: str = DEFAULT_USER
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True, slots=True)
class ImageRecipe:
    """What an environment's image is made of: a base, Dockerfile steps, packages."""

    base_image: str
    packages: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Package manager (`apt`, `cargo`, `gem`, `go`, `npm`, `pip`) → specs."""
    dockerfile: str | None = None
    """Extra Dockerfile instructions (no FROM), run as root before the packages."""
    build_args: Mapping[str, str] = field(default_factory=dict)
    """Passed to the build only (package index URLs, proxies); not part of the image's key."""
    ca_bundle: bytes | None = None
    """Extra CA certificates the image should trust (e.g. a corporate TLS proxy's)."""
    network: str | None = None
    """Network for build steps: None = the backend's choice, or `host`, `bridge`, `none`."""


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    """What a backend knows about an existing sandbox it manages."""

    id: str
    name: str
    labels: Mapping[str, str]
    running: bool


@dataclass(frozen=True, slots=True)
class ShellResult:
    """The outcome of one command run in the persistent shell."""

    output: str
    """Merged stdout and stderr, ANSI escapes stripped, head and tail kept when truncated."""
    exit_code: int | None
    """None when the command did not finish (timed out or interrupted)."""
    truncated_bytes: int = 0
    timed_out: bool = False
    shell_exited: bool = False
    """True when the command ended the shell itself (e.g. `exit`)."""
    shell_restarted: bool = False
    """True when this command ran in a new shell because the previous one was lost
    (killed after a timeout, or exited, or replaced by the sandbox, see `notices`):
    environment variables were reset, the cwd was kept."""
    cwd: str | None = None
    notices: tuple[str, ...] = ()
    """What the sandbox did around this command that the agent should know (processes it killed,
    the container it restarted, the workspace over its size limit). Each is one bracketed line,
    and `output` already starts with them."""
    workspace_bytes: int | None = None
    """How much `/workspace` held after the command, when it was measured (only sandboxes with a
    workspace limit measure, and not after every command; see `sandbox.shell`)."""


@dataclass(frozen=True, slots=True)
class ExecResult:
    """The outcome of a one-shot command."""

    exit_code: int
    stdout: bytes
    stderr: bytes


ByteSink = Callable[[bytes], Awaitable[None]]
"""Receives a stream chunk by chunk; awaiting it is the back-pressure (the producer waits)."""


@runtime_checkable
class Sandbox(Protocol):
    """Operations on one running sandbox.

    `run_shell` calls are serialised per sandbox; the other methods may run beside them.
    """

    @property
    def id(self) -> str: ...

    async def run_shell(
        self, command: str, *, timeout: float, output_limit: int = 100 * 1024
    ) -> ShellResult:
        """Run `command` in the sandbox's persistent shell (cwd and environment persist).

        Cancelling the caller kills the command's process tree and leaves the shell usable.
        """
        ...

    async def restart_shell(self) -> None:
        """Replace the persistent shell with a fresh one in the workspace."""
        ...

    async def exec(
        self,
        argv: Sequence[str],
        *,
        user: str | None = None,
        stdin: bytes | None = None,
        timeout: float = 60.0,
        max_output: int = 64 << 20,
    ) -> ExecResult:
        """Run a one-shot command outside the persistent shell.

        Raises:
            SandboxExecError: it did not finish within `timeout`, or wrote more than
                `max_output` bytes.
        """
        ...

    async def exec_stream(
        self,
        argv: Sequence[str],
        sink: ByteSink,
        *,
        user: str | None = None,
        stdin: bytes | None = None,
        timeout: float = 60.0,
    ) -> ExecResult:
        """Like `exec`, but stdout goes to `sink` as it arrives instead of being kept.

        The returned `stdout` is empty; `stderr` keeps its first 64 KiB. A backend that cannot
        stream may run `exec` and feed `sink` afterwards (bounded by `exec`'s `max_output`).

        Raises:
            SandboxExecError: as `exec` (did not finish within `timeout`).
        """
        ...

    async def read_file(self, path: str, *, max_bytes: int, roots: Sequence[str] = ()) -> bytes:
        """Return the bytes of the regular file at absolute `path` (at most `max_bytes`).

        With `roots`, the file's real path (symlinks resolved) must lie under one of them.

        Raises:
            SandboxPathError: the path does not exist, is not a regular file, is too large or
                resolves outside `roots`.
        """
        ...

    async def read_range(
        self, path: str, *, offset: int, length: int, roots: Sequence[str] = ()
    ) -> tuple[bytes, int]:
        """Up to `length` bytes from byte `offset` of a regular file, and its total size.

        Raises:
            SandboxPathError: as `read_file`, or `offset` is past the end.
        """
        ...

    async def write_file(
        self, path: str, data: bytes, *, user: str | None = None, mode: int | None = None
    ) -> None:
        """Create or replace the file at absolute `path`, creating parent directories."""
        ...

    async def aclose(self) -> None:
        """Close channels to the sandbox; the sandbox itself keeps running. Idempotent."""
        ...


@runtime_checkable
class SandboxBackend(Protocol):
    """Creates, finds and removes sandboxes."""

    name: str

    async def ping(self) -> str:
        """Return a one-line description of the backend, or raise `SandboxUnavailable`."""
        ...

    async def image_present(self, image: str) -> bool: ...

    async def prepare_image(self, recipe: ImageRecipe) -> str:
        """Build (or reuse, keyed by content) the image for `recipe`; return its name.

        Raises:
            ImageNotFound: the base image is missing.
            ImageBuildError: a build step failed; the message names it and shows its output.
        """
        ...

    async def create(self, spec: SandboxSpec) -> Sandbox:
        """Create and start a sandbox; return it with its shell ready."""
        ...

    async def inspect(self, sandbox_id: str) -> SandboxInfo | None:
        """What the backend knows about a sandbox (None when it does not exist)."""
        ...

    async def attach(self, sandbox_id: str) -> Sandbox:
        """Return a handle on an existing sandbox, starting it if it was stopped.

        Raises:
            SandboxNotFound: it no longer exists.
        """
        ...

    async def list(self, labels: Mapping[str, str]) -> list[SandboxInfo]:
        """Sandboxes carrying all of `labels`."""
        ...

    async def rename(self, sandbox: Any, name: str) -> Sandbox:
        """Give a running sandbox a new id/name (a warm-pool sandbox handed to a session)."""
        ...

    async def stop(self, sandbox_id: str) -> None:
        """Stop a sandbox, keeping its workspace. Missing sandboxes are ignored."""
        ...

    async def remove(self, sandbox_id: str) -> None:
        """Remove a sandbox and its workspace. Missing sandboxes are ignored."""
        ...

    async def aclose(self) -> None: ...
