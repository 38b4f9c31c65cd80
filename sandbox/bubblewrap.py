"""Bubblewrap backend: per-session Linux-namespace sandboxes made with `bwrap`, without a daemon.

Layout. Each sandbox owns a state directory `<state_root>/<name>/` on the host (root: the
`state_root` argument, else `$XDG_RUNTIME_DIR/managed-agents-bwrap` when the sandbox user can
traverse it, else `/tmp/managed-agents-bwrap`)::

    state.json     name, labels, env, uid/gid, limits, the running init's pid + start time
    workspace/     -> /workspace             owned by the sandbox user
    home/          -> /home/agent            owned by the sandbox user
    tmp/           -> /tmp                   mode 1777
    uploads/       -> /mnt/session/uploads   owned by root, mode 0755
    outputs/       -> /mnt/session/outputs   owned by the sandbox user
    etc/           generated passwd, group, hosts, hostname (read-only in the sandbox)
    egress/        with egress only: empty on the host, the socket directory's mount point

All of it lives until `remove()`; `stop()` only kills the processes, `attach()` starts them
again over the same directories. The tmpfs size limits of the `Limits.*_bytes` fields are not
enforced (these are plain host directories, not tmpfs); `workspace_bytes` is, as on Docker
(`RLIMIT_FSIZE` through `prlimit` plus the shell's `du` check, see `sandbox.shell`).

The server must run as root (`ping()` says so otherwise): it starts bwrap as the sandbox uid,
creates cgroups and enters namespaces owned by the sandbox's nested user namespace, none of which
an unprivileged process can do.

Processes. `create()`/`attach()` start one long-lived `bwrap` per sandbox whose payload is a
sleep loop; its init's host pid and start time are recorded in `state.json`. Every command -- the
persistent shell, `exec()`, `read_file`/`write_file`, the kill-tree script -- enters that init's
namespaces with `nsenter` and then drops its privileges and installs the seccomp filter itself (a
short `python3 -I -S` step, see `_ENTER`), so all of them see one filesystem and one pid
namespace. bwrap's stderr is a pipe the server drains (its tail is quoted when bwrap fails to
start); the payload swaps its own stdio for /dev/null before it idles. bwrap runs
without `--die-with-parent`, in its own session: sandboxes outlive a server restart like
containers do, and `attach()` from the next server process finds the init by pid (verified by its
start time, so a recycled pid is never entered) or restarts it when it is gone. The server
stopping its sandboxes on shutdown is the supervisor's job, as with Docker.

Isolation, as enforced:

- Namespaces: new user (bwrap runs *as the sandbox user*, so uid 1000 inside is uid 1000 on the
  host; `--disable-userns` forbids nested user namespaces), pid, mount, network (loopback only),
  ipc, uts (hostname `sandbox`) and cgroup (when available).
- Egress (`spec.egress_socket_dir` set): as with Docker, the only way out is the forwarder on
  127.0.0.1:3128, which the payload runs, relaying to the session's proxy socket. The socket's
  directory stays private to root on the host (the egress root is 0700): bwrap is launched
  through `unshare --mount`, in a mount namespace of its own where root bind-mounts that
  directory at `egress/` of the state directory, and bwrap binds it from there, read-only, at
  `CONTAINER_SOCKET_DIR`. No mount appears on the host, and none outlives the sandbox. The
  forwarder script is copied in (`--ro-bind-data`), so its host path needs no access either.
- Privileges: `--cap-drop ALL`, `--new-session`, `NoNewPrivs`; every process -- bwrap's pid 1,
  the payload and every entered process -- has all five capability sets empty, the bounding set
  included, and no supplementary groups. `exec`/`write_file` as another user (e.g. `user="0"`
  for uploads) join every namespace but the user one as that host uid, with the same empty sets
  -- Docker's `exec --user 0` under `cap_drop=ALL`; inside the sandbox such files show as owned
  by `nobody`.
- System calls: every process runs under `sandbox.seccomp.FILTER` (bwrap's `--seccomp` for the
  init, the entry step for entered processes): Docker's default profile as it applies to a
  container without capabilities, plus `ptrace`, `pidfd_getfd` and the keyring calls, answered
  with EPERM; other architectures' calls kill the process.
- Filesystem: a read-only tmpfs root holding read-only binds of the host's `/usr` (and the
  `/bin`, `/sbin`, `/lib*` links or directories), a curated list of `/etc` entries plus
  generated `passwd`/`group`/`hosts`/`hostname`, a fresh `/proc` (bwrap keeps `/proc/sys` and
  friends read-only), a minimal `/dev`, and the five private directories above. Nothing else of
  the host is mounted: no home directories, no `/var`, no `/run`, no Docker socket, no data dir.
  The sandbox sees the *host's* userland, not `spec.image`.
- Environment: `--clearenv`, then exactly what the Docker backend sets (`HOME`, `PATH`, `LANG`,
  `TERM=dumb`, `PAGER`, `GIT_PAGER`, `PYTHONUNBUFFERED`) plus `spec.env`; host-side helper
  processes run with a fixed minimal environment, so `spec.env` never reaches them.

Still weaker than the Docker backend:

- The seccomp filter is a deny list: a call a newer kernel adds is allowed until it is listed
  (Docker's profile allows only what it names).
- The sandbox uid is the same host uid for every sandbox and for any host process of that uid;
  nothing like user-namespace remapping separates them. Sandboxes cannot see or signal each
  other (separate pid namespaces), but they do share `RLIMIT_NPROC` accounting on kernels older
  than 5.14 in rlimit mode, and any file a host process of that uid leaves reachable.
- No LSM profile (Docker applies AppArmor `docker-default` where AppArmor is on).
- The userland is the host's own `/usr`, read-only: its setuid binaries exist (harmless under
  `nosuid` mounts and `NoNewPrivs`), and kernel or userland bugs it exposes are the host's.
- Disk use is not capped, and without writable cgroup v1 controllers neither is total memory nor
  CPU (see Limits).

Limits. With cgroup v1 controllers writable (e.g. the hybrid layout of this project's CI host),
each sandbox gets `managed-agents-bwrap.<name>` under the server's own cgroup in the `memory`
(`memory.limit_in_bytes`, plus `memory.memsw.limit_in_bytes` when swap accounting exists: the OOM
killer picks a victim inside the sandbox), `pids` (`pids.max`, counting threads like Docker's
`pids_limit`) and `cpu` (`cpu.cfs_quota_us` over a 100 ms period) hierarchies; the init and every
entered process join them before entering the namespaces. Otherwise (pure cgroup v2, v1
hierarchies not writable, or `cgroups=False`) entered processes get rlimits through `prlimit`:
`RLIMIT_NPROC` = `pids` -- counted per user namespace and uid on Linux >= 5.14, so per sandbox;
on older kernels per host uid, shared by every sandbox and by any host process of that uid -- and
`RLIMIT_DATA` = `memory_bytes` *per process* (a hog fails with ENOMEM instead of being killed;
several processes together can exceed it). CPU is not limited in that mode. In both modes
`/dev/shm` is a 64 MiB tmpfs and the rest of `/dev` is read-only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from .base import (
    AGENT_HOME,
    DEFAULT_PATH,
    OUTPUTS_DIR,
    UPLOADS_DIR,
    WORKSPACE,
    ExecResult,
    ImageRecipe,
    Limits,
    SandboxInfo,
    SandboxSpec,
)
from .egress import CONTAINER_SOCKET_DIR, CONTAINER_SOCKET_PATH, proxy_env
from .errors import (
    SandboxError,
    SandboxExecError,
    SandboxNotFound,
    SandboxUnavailable,
)
from .forwarder import CONTAINER_FORWARDER_PATH, FORWARDER_PATH, container_command
from .seccomp import FILTER
from .shell import SHELL_LAUNCHER, ShellSandbox

logger = logging.getLogger(__name__)

STATE_DIR_NAME = "managed-agents-bwrap"
CGROUP_PREFIX = "managed-agents-bwrap."
_HOST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# World-readable configuration that common tools need; the rest of the host's /etc (credentials,
# service configs, the docker directory) stays out.
_ETC_ENTRIES = (
    "alternatives",
    "bash.bashrc",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "gai.conf",
    "gitconfig",
    "host.conf",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "localtime",
    "magic",
    "magic.mime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "profile",
    "protocols",
    "python3",
    "python3.11",
    "services",
    "ssl",
    "terminfo",
    "timezone",
)
_TOOLS = ("nsenter", "setpriv", "prlimit", "python3")
"""Needed besides bwrap; python3 (the host's, seen through the sandbox's /usr) installs the
seccomp filter in entered processes."""
_PACKAGES = {"bwrap": "bubblewrap", "python3": "python3", "mount": "mount"}
_SHM_BYTES = 64 << 20
_MIN_BWRAP = (0, 8)
"""`--disable-userns`, `--size` and `--perms` need bubblewrap 0.8."""
_GENERATED_ETC = ("passwd", "group", "hosts", "hostname")
_PRIVATE_DIRS = {
    "workspace": WORKSPACE,
    "home": AGENT_HOME,
    "tmp": "/tmp",
    "uploads": UPLOADS_DIR,
    "outputs": OUTPUTS_DIR,
}
# The sandbox payload: tell the launcher (on stdout, a pipe) that every mount is in place, then
# idle. bwrap's own pid-1 reaper sits above it and collects orphans. Every descriptor the
# launcher handed over is swapped for /dev/null first, so the long-lived processes hold nothing
# of the host's that code inside could take over with pidfd_getfd.
_READY = "printf 'ready\\n'; exec </dev/null >/dev/null 2>&1"
_PAYLOAD = f"{_READY}; while :; do sleep 86400; done"

# Host side, as the server's uid: move this process into the sandbox's cgroups (the files before
# `--`), then become the rest of the argv. Children inherit the cgroups.
_JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo $$ >"$1" || exit 125; shift; done; shift; exec "$@"'

# Host side, as root in a mount namespace of its own: bind-mount the egress socket directory
# ($2, private to root) at $3 (in the sandbox's state directory, which the sandbox uid can
# traverse) with mount(8) ($1), then become the rest of the argv. The mount is never visible on
# the host, and it goes away with the sandbox's processes.
_PRIVATE_BIND = '"$1" --bind -- "$2" "$3" || exit 125; shift 3; exec "$@"'

# Runs inside the sandbox's namespaces as host root, right after nsenter (but in the host's user
# namespace), as `python3 -I -S -B -c _ENTER FILTER_HEX USERNS UID GID ARGV...`. With USERNS a
# path (not "-"): enter that user namespace -- which grants every capability *there*, the
# bounding set included -- and empty the bounding set. Then, in any case, set no_new_privs and
# install the seccomp filter; with USERNS, become UID:GID and ask for SIGKILL when nsenter dies;
# execute ARGV. Only this process can do all that in order: once a process whose uid is not root
# in the sandbox's namespace (uid 0 is not mapped there) executes anything, it has no capability
# left to drop the bounding set with, and a filter is inherited only from the parent (nsenter's
# is on the host). The filter goes in while the process is still host root, which code inside
# can neither ptrace nor write to through /proc/PID/mem. Arguments reach the variadic prctl as
# unsigned longs, as glibc reads them.
_ENTER = """\
import ctypes, os, sys
program, userns = bytes.fromhex(sys.argv[1]), sys.argv[2]
uid, gid = int(sys.argv[3]), int(sys.argv[4])
libc = ctypes.CDLL(None, use_errno=True)
def prctl(option, arg, pointer=None):
    u = ctypes.c_ulong
    return libc.prctl(option, u(arg), pointer or u(0), u(0), u(0))
def check(result, what):
    if result != 0:
        raise OSError(ctypes.get_errno(), what + " failed")
if userns != "-":
    fd = os.open(userns, os.O_RDONLY)
    check(libc.setns(fd, 0x10000000), "setns(CLONE_NEWUSER)")
    os.close(fd)
    cap = 0
    while prctl(24, cap) == 0:
        cap += 1
    if ctypes.get_errno() != 22 or cap == 0:
        check(-1, "prctl(PR_CAPBSET_DROP)")
    if os.getgroups():
        raise SystemExit("supplementary groups would survive; spawn with none")
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
prog = Prog(len(program) // 8, program)
check(prctl(38, 1), "prctl(PR_SET_NO_NEW_PRIVS)")
check(prctl(22, 2, ctypes.byref(prog)), "prctl(PR_SET_SECCOMP)")
if userns != "-":
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    check(prctl(1, 9), "prctl(PR_SET_PDEATHSIG)")
os.execv(sys.argv[5], sys.argv[5:])
"""

_EGRESS_MOUNT = "egress"
"""The mount point (in the state directory) of the egress socket directory."""
_ERR_TAIL = 2000
"""How much of bwrap's stderr is kept for error messages."""


# --------------------------------------------------------------------------------- state


@dataclass
class _State:
    """What `state.json` records about one sandbox."""

    name: str
    labels: dict[str, str]
    image: str
    env: dict[str, str]
    uid: int
    gid: int
    limits: dict[str, Any]
    pid: int | None = None
    start_time: int | None = None
    cgroups: list[str] = field(default_factory=list)
    """Cgroup v1 directories the sandbox's processes join; empty in rlimit mode."""
    limit_mode: str = "rlimit"
    egress_socket_dir: str | None = None
    """Host directory of the egress proxy socket (None: no network at all)."""

    def payload(self) -> str:
        """The init's script: signal readiness, then idle (running the egress forwarder)."""
        if self.egress_socket_dir is None:
            return _PAYLOAD
        forwarder = shlex.join(container_command(CONTAINER_SOCKET_PATH))
        return f"{_READY}; exec {forwarder}"

    @property
    def user(self) -> str:
        return f"{self.uid}:{self.gid}"

    @classmethod
    def from_json(cls, text: str) -> _State:
        """Parse `state.json`, ignoring keys this version does not know."""
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def spec_limits(self) -> Limits:
        return Limits(**self.limits)


def _parse_user(user: str) -> tuple[int, int]:
    """`uid[:gid]`, numeric, or `root`/`agent`; the gid defaults to the uid."""
    named = {"root": (0, 0), "agent": (1000, 1000)}
    if user in named:
        return named[user]
    uid, _, gid = user.partition(":")
    try:
        return int(uid), int(gid or uid)
    except ValueError:
        msg = f"user {user!r}: the bubblewrap backend takes numeric `uid[:gid]`, `root` or `agent`"
        raise SandboxError(msg, op="user") from None


_PF_EXITING = 0x4


def _start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of a live process; None if it is gone or dying.

    A killed pid-namespace init lingers, exiting, until every process of its namespace is reaped:
    entering its namespaces then fails, so it counts as dead.
    """
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data.rsplit(b")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X") or int(fields[6]) & _PF_EXITING:
        return None
    return int(fields[19])


def _alive(state: _State) -> bool:
    return state.pid is not None and _start_time(state.pid) == state.start_time


def _ppids() -> dict[int, int]:
    """Host pid -> parent pid for every process visible in /proc."""
    result: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            data = Path(f"/proc/{entry.name}/stat").read_bytes()
        except OSError:
            continue
        fields = data.rsplit(b")", 1)[-1].split()
        if len(fields) > 1:
            result[int(entry.name)] = int(fields[1])
    return result


def _kill_host_tree(root: int) -> None:
    """SIGKILL the host-side descendants of `root` (not `root`), freezing them first.

    `root` is an `nsenter` that reaps its child and then exits on its own: killing it first would
    hand the child's zombie to the host's init, and the sandbox's pid namespace could not be torn
    down until that init got round to reaping it.
    """

    def tree() -> list[int]:
        ppids = _ppids()
        children: dict[int, list[int]] = {}
        for pid, ppid in ppids.items():
            children.setdefault(ppid, []).append(pid)
        found, stack = [], [root]
        while stack:
            for child in children.get(stack.pop(), []):
                found.append(child)
                stack.append(child)
        return found

    for _ in range(2):
        pids = tree()
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)


async def _end_process(process: anyio.abc.Process) -> None:
    """Kill what `process` (an nsenter) runs, let it exit, and close it. Shielded and bounded."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(10):
        if process.returncode is None:
            await anyio.to_thread.run_sync(_kill_host_tree, process.pid)
            with anyio.move_on_after(2):
                await process.wait()
            if process.returncode is None:
                process.kill()
        await process.aclose()


@dataclass
class _LaunchFds:
    """Descriptors bwrap inherits; their numbers go into its arguments."""

    info: int
    seccomp: int
    forwarder: int | None = None


def _memfd(name: str, data: bytes, opened: list[int]) -> int:
    """A memfd holding `data`, rewound, and appended to `opened` (the caller closes it)."""
    fd = os.memfd_create(name, 0)
    opened.append(fd)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_tail(fd: int, tail: bytes, *, timeout: float) -> bytes:
    """`tail` plus what `fd` yields until EOF or `timeout`, keeping the last `_ERR_TAIL` bytes."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while (remaining := deadline - time.monotonic()) > 0:
        if not poller.poll(remaining * 1000):
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        tail = (tail + chunk)[-_ERR_TAIL:]
    return tail


def _reap_in_background(process: subprocess.Popen[bytes], err_r: int | None, name: str) -> None:
    """Drain (and then close) `err_r` until every writer is gone, then reap `process`, in a
    daemon thread: the outer bwrap stays this process's child for the sandbox's life."""

    def run() -> None:
        tail = b""
        if err_r is not None:
            try:
                while chunk := os.read(err_r, 65536):
                    tail = (tail + chunk)[-_ERR_TAIL:]
            except OSError:
                pass
            finally:
                os.close(err_r)
        process.wait()
        if text := tail.decode(errors="replace").strip():
            logger.info("bwrap of sandbox %s ended with: %s", name, text)

    threading.Thread(target=run, name=f"bwrap-{name}", daemon=True).start()


def _exit_status(returncode: int) -> int:
    """A shell-style status: killed by signal N reads as 128 + N, as Docker reports it."""
    return 128 - returncode if returncode < 0 else returncode


# ------------------------------------------------------------------------------- cgroups


def _v1_parents() -> dict[str, Path] | None:
    """Per v1 controller, the server's own cgroup directory; None without cgroup v1."""
    base = Path("/sys/fs/cgroup")
    own: dict[str, str] = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(","):
                own[controller] = path
    except (OSError, ValueError):
        return None
    parents: dict[str, Path] = {}
    for controller in ("memory", "pids", "cpu"):
        mount = base / controller
        if not (mount / "cgroup.procs").exists() or controller not in own:
            if controller == "cpu":
                continue
            return None
        candidate = mount / own[controller].lstrip("/")
        # Inside a cgroup namespace the recorded path may not exist in this mount.
        parents[controller] = candidate if candidate.is_dir() else mount
    return parents


def _setup_cgroups_v1(name: str, limits: Limits) -> list[str]:
    """Create and configure the sandbox's v1 cgroups; raise OSError when that is not possible."""
    parents = _v1_parents()
    if parents is None:
        raise OSError("no cgroup v1 memory and pids hierarchies")
    created: list[Path] = []
    try:
        for controller, parent in parents.items():
            path = parent / f"{CGROUP_PREFIX}{name}"
            path.mkdir(exist_ok=True)
            created.append(path)
            if controller == "memory":
                (path / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
                memsw = path / "memory.memsw.limit_in_bytes"
                if memsw.exists():
                    memsw.write_text(str(limits.memory_bytes))
            elif controller == "pids":
                (path / "pids.max").write_text(str(limits.pids))
            elif controller == "cpu" and limits.cpus > 0:
                (path / "cpu.cfs_period_us").write_text("100000")
                (path / "cpu.cfs_quota_us").write_text(str(max(1000, int(limits.cpus * 100000))))
    except OSError:
        _remove_cgroups_sync([str(p) for p in created], timeout=2)
        raise
    return [str(p) for p in created]


def _remove_cgroups_sync(dirs: Sequence[str], *, timeout: float = 5.0) -> None:
    """Kill whatever is left in the cgroups and remove them (bounded)."""
    deadline = time.monotonic() + timeout
    remaining = [Path(d) for d in dirs if Path(d).is_dir()]
    while remaining:
        for path in list(remaining):
            try:
                pids = (path / "cgroup.procs").read_text().split()
            except OSError:
                pids = []
            for pid in pids:
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                continue
            remaining.remove(path)
        if remaining:
            if time.monotonic() > deadline:
                logger.warning("could not remove cgroups %s", [str(p) for p in remaining])
                return
            time.sleep(0.01)


# ------------------------------------------------------------------------------- channels


class _ProcessChannel:
    """The persistent shell's `ByteChannel`: the pipes of an `nsenter`ed shell, stderr merged."""

    def __init__(self, process: anyio.abc.Process) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        self._process = process
        self._stdin = process.stdin
        self._stdout = process.stdout
        self._closed = False

    async def send(self, data: bytes) -> None:
        await self._stdin.send(data)

    async def receive(self) -> bytes:
        return await self._stdout.receive()

    async def exit_code(self) -> int | None:
        return _exit_status(await self._process.wait())

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await _end_process(self._process)


# ------------------------------------------------------------------------------- sandbox


class BubblewrapSandbox(ShellSandbox):
    """A handle on one bubblewrap sandbox; survives the sandbox being restarted by `attach()`."""

    def __init__(self, backend: BubblewrapBackend, state: _State) -> None:
        self._backend = backend
        self._state = state
        self.user = state.user
        super().__init__(workspace_limit=state.spec_limits().workspace_bytes)

    @property
    def id(self) -> str:
        return self._state.name

    def rename(self, state: _State) -> None:
        """Follow the backend's `rename`: the same processes, a new name and state path."""
        self._state = state

    async def _live_state(self) -> _State:
        """The current state, re-read when the init this handle knew has gone."""
        if _alive(self._state):
            return self._state
        state = await self._backend.load_state(self._state.name)
        if not _alive(state):
            msg = f"sandbox {state.name} is not running; attach() restarts it"
            raise SandboxExecError(msg, op="exec")
        self._state = state
        return state

    async def _spawn(
        self, argv: Sequence[str], *, user: str | None, merge_stderr: bool
    ) -> anyio.abc.Process:
        state = await self._live_state()
        command = self._backend.enter_argv(state, argv, user=user or self.user)
        try:
            return await anyio.open_process(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                env=_HOST_ENV,
                start_new_session=True,
                extra_groups=[],
            )
        except OSError as exc:
            msg = f"could not enter sandbox {state.name}: {exc}"
            raise SandboxExecError(msg, op="exec") from exc

    async def _open_shell_channel(self) -> _ProcessChannel:
        process = await self._spawn(["sh", "-c", SHELL_LAUNCHER], user=None, merge_stderr=True)
        return _ProcessChannel(process)

    async def exec(
        self,
        argv: Sequence[str],
        *,
        user: str | None = None,
        stdin: bytes | None = None,
        timeout: float = 60.0,
        max_output: int = 64 << 20,
    ) -> ExecResult:
        """Run `argv` in /workspace; on timeout or cancellation its process tree is killed."""
        if not argv:
            raise SandboxExecError("exec needs a command", op="exec")
        process = await self._spawn(argv, user=user, merge_stderr=False)
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        out, err = bytearray(), bytearray()
        overflow = False
        reading = anyio.CancelScope()

        async def feed(stream: anyio.abc.ByteSendStream) -> None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                if stdin:
                    await stream.send(stdin)
            await stream.aclose()

        async def drain(stream: anyio.abc.ByteReceiveStream, target: bytearray) -> None:
            nonlocal overflow
            async for chunk in stream:
                if len(out) + len(err) + len(chunk) > max_output:
                    overflow = True
                    reading.cancel()
                    return
                target += chunk

        try:
            with anyio.fail_after(timeout):
                with reading:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(feed, process.stdin)
                        tg.start_soon(drain, process.stdout, out)
                        tg.start_soon(drain, process.stderr, err)
                if overflow:
                    msg = f"output of {argv[0]!r} exceeded {max_output} bytes"
                    raise SandboxExecError(msg, op="exec")
                returncode = await process.wait()
        except TimeoutError as exc:
            msg = f"{argv[0]!r} did not finish within {timeout:g} s"
            raise SandboxExecError(msg, op="exec") from exc
        finally:
            await _end_process(process)
        if returncode != 0 and not _alive(self._state):
            msg = f"sandbox {self._state.name} stopped while {argv[0]!r} ran"
            raise SandboxExecError(msg, op="exec")
        return ExecResult(exit_code=_exit_status(returncode), stdout=bytes(out), stderr=bytes(err))


# ------------------------------------------------------------------------------- backend


class BubblewrapBackend:
    """Creates sandboxes as bubblewrap-confined process trees under `state_root`.

    Args:
        state_root: where the per-sandbox state directories live (see the module docstring).
        cgroups: use cgroup v1 limits when possible; False forces the rlimit fallback.
        extra_ro_paths: further host paths to mount read-only at the same place (e.g. `/opt`).
        start_timeout: seconds bwrap may take to set a sandbox up.
    """

    name = "bubblewrap"

    def __init__(
        self,
        state_root: str | os.PathLike[str] | None = None,
        *,
        cgroups: bool = True,
        extra_ro_paths: Sequence[str] = (),
        start_timeout: float = 15.0,
    ) -> None:
        self._root = Path(state_root) if state_root is not None else None
        self._cgroups = cgroups
        self._extra_ro_paths = tuple(extra_ro_paths)
        self._start_timeout = start_timeout
        self._locks: dict[str, anyio.Lock] = {}
        self._tools: dict[str, str] = {}

    # ------------------------------------------------------------------- paths and tools

    def _tool(self, name: str) -> str:
        path = self._tools.get(name)
        if path is None:
            found = shutil.which(name, path=_HOST_ENV["PATH"])
            if found is None:
                package = _PACKAGES.get(name, "util-linux")
                msg = (
                    f"`{name}` is not installed; the bubblewrap backend needs bwrap, nsenter, "
                    f"setpriv, prlimit and python3 (plus unshare and mount for sandboxes with "
                    f"network access), e.g. `apt-get install {package}`"
                )
                raise SandboxUnavailable(msg, op="tools")
            path = self._tools[name] = found
        return path

    @property
    def state_root(self) -> Path:
        """The directory holding one state directory per sandbox."""
        if self._root is None:
            self._root = _default_state_root()
        return self._root

    def _dir(self, name: str) -> Path:
        """The state directory of `name`; names that cannot exist raise `SandboxNotFound`."""
        if not _NAME.fullmatch(name):
            msg = f"no sandbox can be named {name!r} (letters, digits, `_.-`, at most 128)"
            raise SandboxNotFound(msg, op="name")
        return self.state_root / name

    def _lock(self, name: str) -> anyio.Lock:
        return self._locks.setdefault(name, anyio.Lock())

    async def load_state(self, name: str) -> _State:
        """The recorded state of sandbox `name`; raise `SandboxNotFound` when it is gone."""
        path = self._dir(name) / "state.json"

        def read() -> _State:
            try:
                return _State.from_json(path.read_text())
            except FileNotFoundError:
                msg = f"sandbox {name} does not exist"
                raise SandboxNotFound(msg, op="attach") from None
            except (OSError, ValueError, TypeError) as exc:
                msg = f"sandbox {name}: unreadable state ({exc})"
                raise SandboxError(msg, op="attach") from exc

        return await anyio.to_thread.run_sync(read)

    @staticmethod
    def _save_state_sync(directory: Path, state: _State) -> None:
        tmp = directory / "state.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(state), f)
        tmp.replace(directory / "state.json")

    # ------------------------------------------------------------------- protocol

    async def ping(self) -> str:
        _require_root()
        bwrap = self._tool("bwrap")
        for tool in _TOOLS:
            self._tool(tool)
        version = await anyio.run_process([bwrap, "--version"], env=_HOST_ENV, check=False)
        text = version.stdout.decode(errors="replace").strip() or "bubblewrap (unknown version)"
        found = re.search(r"(\d+)\.(\d+)", text)
        if found is None or (int(found[1]), int(found[2])) < _MIN_BWRAP:
            msg = f"{text} is too old; the bubblewrap backend needs bubblewrap >= 0.8"
            raise SandboxUnavailable(msg, op="ping")
        probe = [*self._as_user(1000, 1000), bwrap, "--unshare-user", "--unshare-pid"]
        probe += ["--unshare-net", "--ro-bind", "/", "/", "true"]
        result = await anyio.run_process(probe, env=_HOST_ENV, check=False)
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip()
            msg = (
                f"bubblewrap cannot create user namespaces here ({detail}); enable them, e.g. "
                "`sysctl user.max_user_namespaces=15000 kernel.unprivileged_userns_clone=1` "
                "(and `kernel.apparmor_restrict_unprivileged_userns=0` on Ubuntu)"
            )
            raise SandboxUnavailable(msg, op="ping")
        mode = "cgroup v1 limits" if self._cgroups and _cgroups_usable() else "rlimit limits"
        return f"{text} ({mode})"

    async def image_present(self, image: str) -> bool:
        """Always True: sandboxes run the host's read-only userland, images do not apply."""
        return True

    async def prepare_image(self, recipe: ImageRecipe) -> str:
        """Return `recipe.base_image` for recipes that add nothing to it; refuse the others.

        Sandboxes run the host's read-only userland, so there is nothing to build packages or
        Dockerfile steps into.

        Raises:
            SandboxError: the recipe installs packages or runs Dockerfile steps.
        """
        if recipe.packages or recipe.dockerfile:
            wanted = [*recipe.packages, *(["dockerfile"] if recipe.dockerfile else [])]
            msg = (
                f"the bubblewrap backend runs the host's userland and cannot build images "
                f"({', '.join(wanted)} requested); use the Docker backend for environments with "
                "packages or Dockerfile steps"
            )
            raise SandboxError(msg, op="image.build")
        return recipe.base_image

    async def create(self, spec: SandboxSpec) -> BubblewrapSandbox:
        uid, gid = _parse_user(spec.user)
        self._check_user(uid, gid)
        bad = [k for k in spec.env if not _ENV_NAME.fullmatch(k)]
        if bad:
            raise SandboxError(f"invalid environment variable names: {bad}", op="create")
        if not _NAME.fullmatch(spec.name):
            msg = f"invalid sandbox name {spec.name!r} (letters, digits, `_.-`, at most 128)"
            raise SandboxError(msg, op="create")
        directory = self._dir(spec.name)
        env = {
            "HOME": AGENT_HOME,
            "PATH": DEFAULT_PATH,
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            "PAGER": "cat",
            "GIT_PAGER": "cat",
            "PYTHONUNBUFFERED": "1",
            **spec.env,
        }
        if spec.egress_socket_dir is not None:
            env.update(proxy_env())
        state = _State(
            name=spec.name,
            labels=dict(spec.labels),
            image=spec.image,
            env=env,
            uid=uid,
            gid=gid,
            limits=dataclasses.asdict(spec.limits),
            egress_socket_dir=spec.egress_socket_dir,
        )
        async with self._lock(spec.name):
            # Shielded: a cancellation arriving while the thread runs would otherwise surface
            # after the directory exists but before the cleanup below covers it.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._make_dirs_sync, directory, state)
            try:
                await self._start(directory, state)
            except BaseException:
                with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                    await self._remove_locked(spec.name)
                raise
        sandbox = BubblewrapSandbox(self, state)
        # Open the shell now, so the first tool call pays nothing for it.
        try:
            await sandbox.run_shell("true", timeout=30)
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                await sandbox.aclose()
                await self.remove(spec.name)
            raise
        return sandbox

    async def attach(self, sandbox_id: str) -> BubblewrapSandbox:
        async with self._lock(sandbox_id):
            state = await self.load_state(sandbox_id)
            if not _alive(state):
                self._check_user(state.uid, state.gid)
                await self._start(self._dir(sandbox_id), state)
        return BubblewrapSandbox(self, state)

    async def list(self, labels: Mapping[str, str]) -> list[SandboxInfo]:
        root = self.state_root

        def scan() -> list[SandboxInfo]:
            found: list[SandboxInfo] = []
            try:
                entries = sorted(root.iterdir())
            except FileNotFoundError:
                return found
            for entry in entries:
                try:
                    state = _State.from_json((entry / "state.json").read_text())
                except (OSError, ValueError, TypeError):
                    continue
                if all(state.labels.get(k) == v for k, v in labels.items()):
                    found.append(
                        SandboxInfo(
                            id=state.name,
                            name=state.name,
                            labels=dict(state.labels),
                            running=_alive(state),
                        )
                    )
            return found

        return await anyio.to_thread.run_sync(scan)

    async def inspect(self, sandbox_id: str) -> SandboxInfo | None:
        if not _NAME.fullmatch(sandbox_id):
            return None
        try:
            state = await self.load_state(sandbox_id)
        except SandboxNotFound:
            return None
        return SandboxInfo(
            id=state.name, name=state.name, labels=dict(state.labels), running=_alive(state)
        )

    async def stop(self, sandbox_id: str) -> None:
        if not _NAME.fullmatch(sandbox_id):
            return
        with anyio.CancelScope(shield=True):
            async with self._lock(sandbox_id):
                try:
                    state = await self.load_state(sandbox_id)
                except SandboxNotFound:
                    return
                await self._stop_locked(state)

    async def remove(self, sandbox_id: str) -> None:
        if not _NAME.fullmatch(sandbox_id):
            return
        with anyio.CancelScope(shield=True):
            async with self._lock(sandbox_id):
                await self._remove_locked(sandbox_id)

    async def rename(self, sandbox: BubblewrapSandbox, name: str) -> BubblewrapSandbox:
        """Give a sandbox a new name (a warm-pool sandbox handed to a session), keeping it running.

        Its state directory moves (the running mounts follow the directory); its cgroups keep
        their names, which `state.json` records.
        """
        if not _NAME.fullmatch(name):
            msg = f"invalid sandbox name {name!r} (letters, digits, `_.-`, at most 128)"
            raise SandboxError(msg, op="rename")
        old = sandbox.id
        if old == name:
            return sandbox
        first, second = sorted([old, name])
        async with self._lock(first), self._lock(second):
            state = await self.load_state(old)
            state.name = name
            source, target = self._dir(old), self._dir(name)

            def move() -> None:
                if target.exists():
                    msg = f"a sandbox named {name} already exists"
                    raise SandboxError(msg, op="rename")
                source.rename(target)
                self._save_state_sync(target, state)

            await anyio.to_thread.run_sync(move)
        sandbox.rename(state)
        return sandbox

    async def aclose(self) -> None:
        """Nothing to release: sandboxes keep running, like containers after a client closes."""

    # ------------------------------------------------------------------- internals

    @staticmethod
    def _check_user(uid: int, gid: int) -> None:
        _require_root()
        if uid == 0 or gid == 0:
            msg = "the bubblewrap backend does not run sandboxes as root (user or group 0)"
            raise SandboxError(msg, op="create")

    def _as_user(self, uid: int, gid: int) -> list[str]:
        """Argv prefix that drops from root to uid:gid."""
        return [self._tool("setpriv"), f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]

    def _make_dirs_sync(self, directory: Path, state: _State) -> None:
        _ensure_state_root(directory.parent)
        try:
            directory.mkdir(mode=0o711)
        except FileExistsError:
            msg = f"a sandbox named {state.name} already exists"
            raise SandboxError(msg, op="create") from None
        try:
            self._fill_dir_sync(directory, state)
        except BaseException as exc:
            _rmtree(directory)
            if isinstance(exc, OSError):
                msg = f"could not prepare {directory}: {exc}"
                raise SandboxError(msg, op="create") from exc
            raise

    def _fill_dir_sync(self, directory: Path, state: _State) -> None:
        directory.chmod(0o711)
        for sub in _PRIVATE_DIRS:
            path = directory / sub
            path.mkdir()
            path.chmod(0o1777 if sub == "tmp" else 0o755)
            # uploads/ stays the server's: the agent may read it, never change it.
            if sub not in ("tmp", "uploads"):
                os.chown(path, state.uid, state.gid)
        etc = directory / "etc"
        etc.mkdir()
        etc.chmod(0o755)
        files = {
            "passwd": (
                "root:x:0:0:root:/root:/usr/sbin/nologin\n"
                f"agent:x:{state.uid}:{state.gid}:agent:{AGENT_HOME}:/bin/bash\n"
                "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            ),
            "group": f"root:x:0:\nagent:x:{state.gid}:\nnogroup:x:65534:\n",
            "hosts": "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            "hostname": "sandbox\n",
        }
        for file_name, text in files.items():
            (etc / file_name).write_text(text)
            (etc / file_name).chmod(0o644)
        self._save_state_sync(directory, state)

    def _bwrap_argv(self, directory: Path, state: _State, fds: _LaunchFds) -> list[str]:
        """bwrap's options (they travel through `--args`); the payload command follows them."""
        args = ["--unshare-user", "--disable-userns", "--unshare-pid", "--unshare-net"]
        args += ["--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        args += ["--hostname", "sandbox", "--uid", str(state.uid), "--gid", str(state.gid)]
        args += ["--new-session", "--cap-drop", "ALL", "--clearenv"]
        for key, value in state.env.items():
            args += ["--setenv", key, value]
        args += ["--ro-bind", "/usr", "/usr"]
        for path in _SYSTEM_DIRS:
            if Path(path).is_symlink():
                args += ["--symlink", str(Path(path).readlink()), path]
            elif Path(path).is_dir():
                args += ["--ro-bind", path, path]
        args += ["--perms", "0755", "--dir", "/etc"]
        for entry in _ETC_ENTRIES:
            args += ["--ro-bind-try", f"/etc/{entry}", f"/etc/{entry}"]
        for entry in _GENERATED_ETC:
            args += ["--ro-bind", str(directory / "etc" / entry), f"/etc/{entry}"]
        for path in self._extra_ro_paths:
            args += ["--ro-bind", path, path]
        # bwrap's /dev is a tmpfs the sandbox user owns: freeze it, and give /dev/shm a bounded
        # tmpfs of its own (Docker's default size), so neither can eat the host's memory.
        args += ["--proc", "/proc", "--dev", "/dev"]
        args += ["--perms", "1777", "--size", str(_SHM_BYTES), "--tmpfs", "/dev/shm"]
        args += ["--remount-ro", "/dev"]
        for dest in ("/home", "/mnt", "/mnt/session"):
            args += ["--perms", "0755", "--dir", dest]
        for sub, dest in _PRIVATE_DIRS.items():
            args += ["--bind", str(directory / sub), dest]
        if state.egress_socket_dir is not None:
            assert fds.forwarder is not None
            # The only way out, as with Docker: a forwarder to the server's proxy socket. The
            # socket's directory is private to root on the host; the launcher bind-mounts it at
            # `egress/` in a mount namespace of its own, where bwrap (the sandbox uid) reaches it.
            args += ["--ro-bind", str(directory / _EGRESS_MOUNT), CONTAINER_SOCKET_DIR]
            args += ["--perms", "0444", "--ro-bind-data", str(fds.forwarder)]
            args += [CONTAINER_FORWARDER_PATH]
        args += ["--remount-ro", "/", "--chdir", WORKSPACE, "--info-fd", str(fds.info)]
        # Last: bwrap applies it to its pid-1 reaper and the payload, right before they run.
        args += ["--seccomp", str(fds.seccomp)]
        return args

    async def _start(self, directory: Path, state: _State) -> None:
        """Start the sandbox's init (limits first) and record its pid in `state.json`."""
        bwrap = self._tool("bwrap")
        for tool in _TOOLS if state.egress_socket_dir is None else (*_TOOLS, "unshare", "mount"):
            self._tool(tool)
        limits = state.spec_limits()
        state.cgroups, state.limit_mode = [], "rlimit"
        # Shielded (each step is bounded): once bwrap runs, its pid must reach state.json, or a
        # cancellation would leave an init that nothing knows how to stop.
        with anyio.CancelScope(shield=True):
            if self._cgroups:
                try:
                    state.cgroups = await anyio.to_thread.run_sync(
                        _setup_cgroups_v1, state.name, limits
                    )
                    state.limit_mode = "cgroup-v1"
                except OSError as exc:
                    logger.warning(
                        "sandbox %s: cgroup limits unavailable (%s); using rlimits",
                        state.name,
                        exc,
                    )
            try:
                pid, start_time = await anyio.to_thread.run_sync(
                    self._launch_sync, bwrap, directory, state
                )
            except BaseException:
                await anyio.to_thread.run_sync(_remove_cgroups_sync, state.cgroups)
                raise
            state.pid, state.start_time = pid, start_time
            await anyio.to_thread.run_sync(self._save_state_sync, directory, state)

    def _launch_sync(self, bwrap: str, directory: Path, state: _State) -> tuple[int, int]:
        ours: list[int] = []  # read ends this process keeps
        theirs: list[int] = []  # handed to bwrap, closed here once it runs
        try:
            for read_end, write_end in (os.pipe(), os.pipe(), os.pipe()):
                ours.append(read_end)
                theirs.append(write_end)
            (info_r, ready_r, err_r), (info_w, ready_w, err_w) = ours, theirs
            # Arguments, filter and forwarder reach bwrap as memfds: the sandbox's /proc/1/cmdline
            # shows `bwrap --args N` instead of host paths, and no host path is involved that
            # the sandbox uid would have to be able to reach.
            launch = _LaunchFds(info=info_w, seccomp=_memfd("bwrap-seccomp", FILTER, theirs))
            if state.egress_socket_dir is not None:
                script = FORWARDER_PATH.read_bytes()
                launch.forwarder = _memfd("egress-forwarder", script, theirs)
            args = self._bwrap_argv(directory, state, launch)
            args_fd = _memfd("bwrap-args", b"".join(a.encode() + b"\0" for a in args), theirs)
            argv: list[str] = []
            if state.cgroups:
                procs = [f"{d}/cgroup.procs" for d in state.cgroups]
                argv += [self._tool("sh"), "-c", _JOIN_CGROUPS, "sh", *procs, "--"]
            if state.egress_socket_dir is not None:
                mountpoint = directory / _EGRESS_MOUNT
                mountpoint.mkdir(mode=0o755, exist_ok=True)
                argv += [self._tool("unshare"), "--mount", "--propagation", "private", "--"]
                argv += [self._tool("sh"), "-c", _PRIVATE_BIND, "sh", self._tool("mount")]
                argv += [state.egress_socket_dir, str(mountpoint)]
            argv += [*self._as_user(state.uid, state.gid), bwrap, "--args", str(args_fd)]
            argv += ["--", "/bin/sh", "-c", state.payload()]
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=ready_w,
                # A pipe, not a host file: bwrap's pid 1 keeps its stderr for the sandbox's life.
                stderr=err_w,
                pass_fds=[fd for fd in theirs if fd not in (ready_w, err_w)],
                env=_HOST_ENV,
                start_new_session=True,
            )
        except OSError as exc:
            for fd in ours + theirs:
                os.close(fd)
            msg = f"could not run bwrap for sandbox {state.name}: {exc}"
            raise SandboxUnavailable(msg, op="create") from exc
        for fd in theirs:
            os.close(fd)
        try:
            pid, ready, errors = self._await_ready_sync(info_r, ready_r, err_r)
        except BaseException:
            with contextlib.suppress(OSError):
                os.kill(process.pid, signal.SIGKILL)
            _reap_in_background(process, err_r, state.name)
            raise
        finally:
            os.close(info_r)
            os.close(ready_r)
        start_time = _start_time(pid) if pid is not None and ready else None
        if pid is None or start_time is None:
            # Without --die-with-parent the init would outlive the outer bwrap.
            for victim in (pid, process.pid):
                if victim is not None:
                    with contextlib.suppress(OSError):
                        os.kill(victim, signal.SIGKILL)
            # What bwrap said before it ended (or was killed just now) is still in the pipe.
            errors = _read_tail(err_r, errors, timeout=2.0)
            _reap_in_background(process, None, state.name)
            os.close(err_r)
            problem = "did not set the sandbox up in time" if ready is None else "failed"
            text = errors.decode(errors="replace").strip()
            detail = f": {text[-_ERR_TAIL:]}" if text else ""
            msg = f"bwrap {problem} for sandbox {state.name}{detail}"
            raise SandboxExecError(msg, op="create")
        # The outer bwrap stays our child for the sandbox's life: reap it when it ends, and keep
        # its stderr (and its pid 1's) drained meanwhile so a late message never blocks them.
        _reap_in_background(process, err_r, state.name)
        return pid, start_time

    def _await_ready_sync(
        self, info_r: int, ready_r: int, err_r: int
    ) -> tuple[int | None, bool | None, bytes]:
        """Read bwrap's info JSON (the init's pid) and the payload's ready line, bounded.

        Returns the pid (None if never reported), whether the payload reported ready (None
        when the deadline passed first) and the tail of what bwrap wrote to stderr meanwhile.
        """
        deadline = time.monotonic() + self._start_timeout
        info, ready, errors = b"", b"", b""
        # poll, not select: a busy server's descriptors can exceed FD_SETSIZE.
        poller = select.poll()
        for fd in (info_r, ready_r, err_r):
            poller.register(fd, select.POLLIN)
        pending = {info_r, ready_r}
        pid: int | None = None
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return pid, None, errors
            for fd, _ in poller.poll(remaining * 1000):
                chunk = os.read(fd, 65536)
                if fd == err_r:
                    errors = (errors + chunk)[-_ERR_TAIL:]
                    if not chunk:
                        poller.unregister(err_r)
                    continue
                if fd == info_r:
                    info += chunk
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        pid = int(json.loads(info)["child-pid"])
                        pending.discard(info_r)
                        poller.unregister(info_r)
                else:
                    ready += chunk
                    if b"ready\n" in ready:
                        pending.discard(ready_r)
                        poller.unregister(ready_r)
                if not chunk:
                    pending.clear()
        return pid, b"ready\n" in ready, errors

    async def _stop_locked(self, state: _State) -> None:
        if state.pid is not None:
            try:
                pidfd = os.pidfd_open(state.pid)
            except OSError:
                pidfd = None
            if pidfd is not None:
                try:
                    # Checked after opening the pidfd, so it cannot name a recycled pid.
                    if _alive(state):
                        # The init is pid 1 of the sandbox's pid namespace: the kernel kills the
                        # rest of it.
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                        with anyio.move_on_after(10):
                            await anyio.wait_readable(pidfd)
                finally:
                    os.close(pidfd)
        await anyio.to_thread.run_sync(_remove_cgroups_sync, state.cgroups)
        if state.pid is not None or state.cgroups:
            state.pid = state.start_time = None
            state.cgroups = []
            directory = self._dir(state.name)
            with contextlib.suppress(FileNotFoundError):
                await anyio.to_thread.run_sync(self._save_state_sync, directory, state)

    async def _remove_locked(self, name: str) -> None:
        directory = self._dir(name)
        try:
            state: _State | None = await self.load_state(name)
        except SandboxError:
            state = None
        if state is not None:
            await self._stop_locked(state)
        else:
            # A half-created sandbox: no pid recorded, maybe cgroups made before the crash.
            stale = [
                str(parent / f"{CGROUP_PREFIX}{name}") for parent in (_v1_parents() or {}).values()
            ]
            await anyio.to_thread.run_sync(_remove_cgroups_sync, stale)
        await anyio.to_thread.run_sync(_rmtree, directory)

    def enter_argv(self, state: _State, argv: Sequence[str], *, user: str) -> list[str]:
        """The host argv that runs `argv` as `user` inside the sandbox's namespaces, in /workspace.

        The sandbox user enters the user namespace too; any other user joins every namespace
        but the user one, as that host uid -- like Docker's `exec --user 0` under
        `cap_drop=ALL`. Either way the process ends with every capability set empty (the
        bounding set included), `NoNewPrivs` and the sandbox's seccomp filter (see `_ENTER`).
        """
        uid, gid = _parse_user(user)
        assert state.pid is not None
        limits = state.spec_limits()
        # As on Docker: no file may outgrow the workspace limit (uploads up to their tmpfs size
        # must still fit); the total is checked after commands (see sandbox.shell).
        max_file = max(limits.workspace_bytes, limits.uploads_bytes)
        command = [self._tool("prlimit"), f"--fsize={max_file}"]
        if state.cgroups:
            procs = [f"{d}/cgroup.procs" for d in state.cgroups]
            command += ["--", self._tool("sh"), "-c", _JOIN_CGROUPS, "sh", *procs, "--"]
        else:
            command += [f"--nproc={limits.pids}", f"--data={limits.memory_bytes}", "--"]
        nsenter = [self._tool("nsenter"), f"--target={state.pid}"]
        nsenter += ["--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup"]
        nsenter += ["--root", f"--wdns={WORKSPACE}"]
        # Tools below run inside the sandbox's mount namespace, from its read-only /usr.
        env = ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in state.env.items())]
        if "=" in argv[0]:
            # env would take it for an assignment.
            argv = ["sh", "-c", 'exec "$@"', "sh", *argv]
        enter = [self._tool("python3"), "-I", "-S", "-B", "-c", _ENTER, FILTER.hex()]
        if (uid, gid) == (state.uid, state.gid):
            # The sandbox's own pid 1 is `state.pid`: its user namespace is the sandbox's.
            enter += ["/proc/1/ns/user", str(uid), str(gid)]
            filtered = [*enter, *env, *argv]
        else:
            enter += ["-", str(uid), str(gid)]
            setpriv = [self._tool("setpriv"), f"--reuid={uid}", f"--regid={gid}"]
            setpriv += ["--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]
            setpriv += ["--no-new-privs", "--pdeathsig=KILL", "--"]
            filtered = [*enter, *setpriv, *env, *argv]
        return [*command, *nsenter, *filtered]


# --------------------------------------------------------------------------------- helpers


def _cgroups_usable() -> bool:
    return _v1_parents() is not None


def _require_root() -> None:
    if os.geteuid() != 0:
        msg = (
            "the bubblewrap backend needs the server to run as root: it starts each sandbox as "
            "the sandbox uid and enters its namespaces with nsenter, which an unprivileged "
            "process cannot do for namespaces of a nested user namespace; run as root or use "
            "the Docker backend"
        )
        raise SandboxUnavailable(msg, op="ping")


def _default_state_root() -> Path:
    """`$XDG_RUNTIME_DIR/managed-agents-bwrap` if others can traverse it (the server drops to
    the sandbox uid to run bwrap, which must reach the bind sources), else under /tmp."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and _traversable(Path(runtime)):
        return Path(runtime) / STATE_DIR_NAME
    return Path("/tmp") / STATE_DIR_NAME


def _traversable(path: Path) -> bool:
    for part in [path, *path.parents]:
        try:
            if not part.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def _ensure_state_root(root: Path) -> None:
    """Create `root` (mode 0711) or check that an existing one is ours and not writable by others.

    The default lives in a world-writable /tmp, where someone else could have planted it.
    """
    try:
        root.mkdir(mode=0o711, parents=True)
        root.chmod(0o711)
        return
    except FileExistsError:
        pass
    info = root.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        msg = (
            f"the state root {root} is not a directory owned by root and writable only by it; "
            "remove it or pass another state_root"
        )
        raise SandboxUnavailable(msg, op="create")
    if not info.st_mode & 0o001:
        msg = f"the state root {root} must be traversable by the sandbox user (mode 0711)"
        raise SandboxUnavailable(msg, op="create")


def _rmtree(path: Path) -> None:
    """Remove a state directory; entries that refuse are made writable and retried."""

    def retry(func: Any, target: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            Path(target).parent.chmod(0o700)
            Path(target).chmod(0o700)
        with contextlib.suppress(FileNotFoundError):
            func(target)

    if not path.is_dir() or path.is_symlink():
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)
