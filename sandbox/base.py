"""The two seams of every sandbox backend: `SandboxBackend` (lifecycle), `Sandbox` (operations)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

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


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """Everything a backend needs to create one session's sandbox."""

    image: str
    name: str
    """A unique, human-readable name (the container name for Docker)."""
    labels: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    network: str = "none"
    """`none`, or the name of a network the backend should attach the sandbox to."""
    user: str = DEFAULT_USER
    limits: Limits = field(default_factory=Limits)


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
    (killed after a timeout, or exited): environment variables were reset, the cwd was kept."""
    cwd: str | None = None


@dataclass(frozen=True, slots=True)
class ExecResult:
    """The outcome of a one-shot command."""

    exit_code: int
    stdout: bytes
    stderr: bytes


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

    async def read_file(self, path: str, *, max_bytes: int, roots: Sequence[str] = ()) -> bytes:
        """Return the bytes of the regular file at absolute `path` (at most `max_bytes`).

        With `roots`, the file's real path (symlinks resolved) must lie under one of them.

        Raises:
            SandboxPathError: the path does not exist, is not a regular file, is too large or
                resolves outside `roots`.
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

    async def create(self, spec: SandboxSpec) -> Sandbox:
        """Create and start a sandbox; return it with its shell ready."""
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

    async def stop(self, sandbox_id: str) -> None:
        """Stop a sandbox, keeping its workspace. Missing sandboxes are ignored."""
        ...

    async def remove(self, sandbox_id: str) -> None:
        """Remove a sandbox and its workspace. Missing sandboxes are ignored."""
        ...

    async def aclose(self) -> None: ...
