"""A persistent POSIX shell driven over a byte channel, with framed, injection-proof command runs.

Each command is sent base64-encoded and `eval`ed by the shell itself, so quoting mistakes or
syntax errors in the command cannot desynchronise the channel; a per-command random marker
carries the exit status and working directory back.

Stray processes. Background jobs are legitimate (a dev server started with `&` or `nohup` must
outlive its tool call, as on the hosted product), so nothing is killed after a command that ends
normally. Processes die in these cases only:

- A command times out or is interrupted: every sandbox process started since the command began
  is killed -- its process tree, and whatever escaped the tree (re-parented to init by a double
  fork, `setsid`, or a fork bomb whose parents exited). Background jobs of earlier commands live
  on. "Since" is the /proc clock the shell reads as the command begins (its start line).
- The shell is restarted (`restart_shell`, a stuck shell replaced, the handle closed): every
  sandbox process is killed but the sandbox's init and its payload.
- The sandbox has run out of processes: before each command the shell reads the pids cgroup
  (with builtins: nothing can fork then) and, when fewer than `PIDS_HEADROOM` are left, does not
  run the command; every process but init, the payload and the shell is killed, then the command
  runs, with a notice on top of its output. If that cannot free enough (the kill cannot start,
  or the cgroup stays full), the backend's last resort restarts the whole sandbox (Docker:
  `docker restart`, which keeps `/workspace` and empties the tmpfs mounts; the owner's
  `after_restart` hook can put uploads back), and the notice says so instead.

The killing is `REAP_SCRIPT`, run as a one-shot `exec` by the sandbox user: shell builtins only
(`read` over `/proc`, `kill`), so it works when no process can be forked (Docker charges the
exec'd process to the full pids cgroup anyway, and it needs nothing more). It stops its victims
before killing them, so nothing forks away meanwhile. "Init and its payload" are the sandbox's
pid 1 and the first process pid 1 started, with that process's session (Docker's idle loop and
egress forwarder, bubblewrap's payload); each `docker exec` gets a session of its own, and the
agent cannot join another.

Workspace size. `/workspace` lives on the host's disk; `Limits.workspace_bytes` bounds it:

- Both backends set `RLIMIT_FSIZE` (`sandbox.docker`: a ulimit; `sandbox.bubblewrap`:
  `prlimit` on every entered process), so no single file can grow past the limit
  (writes fail with EFBIG, "File too large"; the shell ignores SIGXFSZ, so writers are not
  killed for it).
- The shell runs `du -skx /workspace` after each command, in the same round trip (when `du`
  takes over `DU_ALWAYS`, only as often as keeps it under `DU_TIME_SHARE` of the time). Over
  the limit, the result carries a notice saying how much is used and what to do, and from then
  on each command runs in a shell with a hard file-size limit of 0 (nothing can write a file;
  deleting works), every other sandbox process being stopped when that shell takes over (a
  background writer would keep filling); `write_file` refuses paths in `/workspace`. Once `du`
  shows it back under the limit, the next command gets a normal shell.

This bounds accidents (a download or build that grows too big) within one command's worth of
writing, not a determined agent: many files, each under the cap, can be reserved within one
command (`fallocate` is instant), before any `du` runs. Only a fixed-size filesystem would bound
that, and none is available to an unprivileged server: Docker's `local` volume driver mounts
existing devices only (a loop image needs root on the host; `o=loop` is refused) or tmpfs
(memory, lost on restart), and `--storage-opt size` covers the root filesystem on xfs with
project quotas only. Also: directories the agent makes unreadable (`chmod 000`) hide their
contents from `du`.
"""

from __future__ import annotations

import abc
import base64
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import anyio

from . import file_ops
from .base import WORKSPACE, ByteSink, ExecResult, ShellResult
from .errors import SandboxError, SandboxExecError, SandboxPathError

logger = logging.getLogger(__name__)

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]")


class ByteChannel(Protocol):
    """A bidirectional stream to a shell whose stdout and stderr arrive merged."""

    async def send(self, data: bytes) -> None: ...

    async def receive(self) -> bytes:
        """Next chunk of output; raises `anyio.EndOfStream` when the shell is gone."""
        ...

    async def exit_code(self) -> int | None:
        """The shell's exit status once it has ended (None if unknown)."""
        ...

    async def aclose(self) -> None: ...


ChannelOpener = Callable[[], Awaitable[ByteChannel]]
"""Opens a new channel running `sh` as the sandbox user in the workspace."""


@dataclass(frozen=True, slots=True)
class Since:
    """The processes a reap may kill by age: those started after clock tick `tick` of the
    sandbox's /proc clock (read by the shell as the command began), or in that tick with a pid
    of at least `first_pid` (the command's first process); without a tick, those started within
    the last `seconds` (measured by the server, so it includes the latency of starting the
    reap)."""

    tick: int | None
    first_pid: int | None
    seconds: float

    def arg(self) -> str:
        if self.tick is not None:
            return f"tick:{self.tick}:{self.first_pid or ''}"
        return f"age:{math.ceil(self.seconds * CLOCK_TICKS)}"


Reaper = Callable[[Since | None, Sequence[int], Sequence[int]], Awaitable[int]]
"""Kills stray sandbox processes: `(since, spare, kill)`. `since` bounds the age of the victims
(None: whatever their age); `spare` are pids to leave alone and `kill` pids to kill in any case.
Returns how many processes it killed."""

Recover = Callable[[], Awaitable[None]]
"""The last resort when a sandbox's processes cannot be killed: restart the whole sandbox."""

SHELL_LAUNCHER = (
    "if command -v bash >/dev/null 2>&1; then exec bash --noprofile --norc; else exec sh; fi"
)
"""Passed as `sh -c` argv (not on stdin): prefer bash, whose `eval` survives syntax errors."""

CLOCK_TICKS = 100
"""USER_HZ: the unit of start times in /proc/N/stat (100 on every Linux architecture)."""
PIDS_HEADROOM = 4
"""Below this many free pids, the shell could not even decode the next command (it forks a
command substitution and a pipeline), so the sandbox counts as out of processes."""
REAP_TRIES = 3
"""How often to try starting the killer in a full sandbox before restarting it instead."""
DU_TIME_SHARE = 0.05
"""A slow `du` may take at most about this share of the wall time (see "Workspace size")."""
DU_ALWAYS = 0.05
"""A `du` that took at most this many seconds runs after every command."""

# Runs inside the sandbox as the sandbox user. $1: "all", "tick:N:P" (only processes started
# after clock tick N, or in it with a pid of at least P, die; see `Since`) or "age:N" (only
# those at most N ticks old); $2: pids to spare; $3: pids to kill in any case. Builtins only,
# so it works when nothing can fork; see the module docstring for what it spares. A process
# whose stat line cannot be parsed (a command name with a newline) is killed, unless its pid is
# spared: nothing can hide from it by naming itself. Prints how many it killed.
REAP_SCRIPT = r"""
since=$1 spare=" 1 $$ $2 " extra=" $3 "
info() {
  { read -r line < "$1"; } 2>/dev/null || return 1
  pid=${1#/proc/}; pid=${pid%/stat}
  state= ppid= sid= start=
  case $line in *") "*) ;; *) return 0;; esac
  set -f; set -- ${line##*") "}; set +f
  state=$1 ppid=$2 sid=$4 start=${20}
  case $start in ''|*[!0-9]*) start=;; esac
}
init_start= payload= pstart= psid=
info /proc/1/stat && init_start=$start
for st in /proc/[0-9]*/stat; do
  info "$st" || continue
  [ "$pid" != 1 ] && [ "$ppid" = 1 ] && [ -n "$start" ] || continue
  if [ -z "$pstart" ] || [ "$start" -lt "$pstart" ]; then payload=$pid pstart=$start psid=$sid; fi
done
# The payload is init's first child; a process re-parented to init later is no payload.
if [ -z "$init_start" ] || [ -z "$pstart" ] || [ $((pstart - init_start)) -gt 500 ]; then
  payload= psid=
fi
[ "$psid" = 0 ] && psid=
first=
case $since in
  all) since= ;;
  tick:*) since=${since#tick:}; first=${since#*:}; since=${since%%:*} ;;
  age:*)
    read -r up rest < /proc/uptime || exit 3
    since=$(( ${up%.*} * 100 + 1${up#*.} - 100 - ${since#age:} )) ;;
  *) exit 2 ;;
esac
seen=" " total=0 pass=0
while [ $pass -lt 8 ]; do
  pass=$((pass + 1)) victims=
  for st in /proc/[0-9]*/stat; do
    info "$st" || continue
    case $spare in *" $pid "*) continue;; esac
    case $extra in
      *" $pid "*) ;;
      *)
        [ "$pid" = "$payload" ] && continue
        [ -n "$psid" ] && [ "$sid" = "$psid" ] && continue
        [ -n "$payload" ] && [ "$ppid" = "$payload" ] && continue
        case $state in Z|X) continue;; esac
        if [ -n "$since" ] && [ -n "$start" ]; then
          [ "$start" -lt "$since" ] && continue
          [ "$start" = "$since" ] && [ -n "$first" ] && [ "$pid" -lt "$first" ] && continue
        fi
        ;;
    esac
    kill -STOP "$pid" 2>/dev/null || continue
    victims="$victims $pid"
    case $seen in *" $pid "*) ;; *) seen="$seen$pid " total=$((total + 1));; esac
  done
  [ -n "$victims" ] || break
  kill -KILL $victims 2>/dev/null
done
echo "$total"
"""


def _pids_check(var: str, *, events: bool = False) -> str:
    """Shell code (builtins only) reading the sandbox's pids cgroup (v1 or v2 layout).

    It sets `var` to "current/max" when fewer than `PIDS_HEADROOM` pids are left, else to
    nothing; `__ma_busy` to 1 when three quarters or more are in use; `__ma_e` to how many
    forks the limit refused so far (`pids.events`). With `events`, `var` is also set when that
    count grew since the last such check while three quarters are in use: a fork bomb whose
    processes keep exiting and respawning hovers under the limit. Without a readable cgroup
    (bubblewrap mounts no /sys), all stay empty.
    """
    runaway = (
        'elif [ -n "$__ma_busy" ] && [ -n "$__ma_e" ] && '
        f'[ "$__ma_e" != "${{__ma_ev:-$__ma_e}}" ]; then {var}="$__ma_c/$__ma_m"; '
        if events
        else ""
    )
    return (
        f"{var}= __ma_busy= __ma_e=; for __ma_d in /sys/fs/cgroup/pids /sys/fs/cgroup; do "
        'if { read -r __ma_m < "$__ma_d/pids.max" && read -r __ma_c < "$__ma_d/pids.current"; '
        '} 2>/dev/null; then { read -r __ma_k __ma_e < "$__ma_d/pids.events"; } 2>/dev/null; '
        "case $__ma_m:$__ma_c in *[!0-9:]*|:*|*:) ;; *) "
        "[ $((__ma_c * 4)) -ge $((__ma_m * 3)) ] && __ma_busy=1; "
        f'if [ $((__ma_m - __ma_c)) -lt {PIDS_HEADROOM} ]; then {var}="$__ma_c/$__ma_m"; '
        f"{runaway}fi;; esac; " + ("__ma_ev=$__ma_e; " if events else "") + "break; fi; done"
    )


# After the command: the workspace's size in KiB and the uptime before and after `du` (to
# price it). Skipped when forking could hang the shell in bash's fork retries (fatal to it in
# the end): the command started a background job (`$!` moved: it may be a fork bomb getting
# going), a fork failed for the pids limit during the command, or three quarters are in use.
# `|| :` and `${!-}`: the agent may have turned on `set -e` or `set -u` in this shell.
_MEASURE = (
    _pids_check("__ma_low") + '\nif [ -z "$__ma_low$__ma_busy" ] && [ "${!-}" = "$__ma_bg" ] && '
    '[ "$__ma_e" = "${__ma_ev-}" ]; then '
    "read -r __ma_t0 __ma_z < /proc/uptime; "
    f"__ma_du=$(command -p du -skx {WORKSPACE} 2>/dev/null) || :; "
    "read -r __ma_t1 __ma_z < /proc/uptime; "
    '__ma_du="${__ma_du%%[!0-9]*}:$__ma_t0:$__ma_t1"; else __ma_du=-; fi\n'
)


class _OutputBuffer:
    """Keeps the head and a rolling tail of a command's output within a byte budget.

    Everything enters the tail first, so the end marker is always found there; bytes pushed out
    of the tail fill the head until it is full and are counted as dropped after that.
    """

    def __init__(
        self, limit: int, lookbehind: int, start_marker: bytes = b"", end_marker: bytes = b""
    ) -> None:
        self._start_marker = start_marker
        self._end_marker = end_marker
        self._pre: bytearray | None = bytearray() if start_marker else None
        self.start_tick: int | None = None
        """The /proc clock tick at which the command began, from the shell's start line."""
        self.first_pid: int | None = None
        """The pid of the command's first process, from the same line (bash only)."""
        self.started = False
        """The start line arrived."""
        self.limit = limit
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.keep = self.tail_limit + lookbehind
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def feed(self, chunk: bytes) -> None:
        if self._pre is not None:
            # Until the shell's start line has passed, hold the output back to cut it out.
            self._pre += chunk
            idx = self._pre.find(self._start_marker)
            end = self._pre.find(b"\n", idx) if idx >= 0 else -1
            if end >= 0:
                line = bytes(self._pre[idx + len(self._start_marker) : end]).split()
                self.started = True
                self.start_tick = _ticks(line[0]) if line else None
                self.first_pid = int(line[1]) if line[1:] and line[1].isdigit() else None
                del self._pre[idx : end + 1]
            elif len(self._pre) < (64 << 10) and (
                not self._end_marker or self._end_marker not in self._pre
            ):
                return
            chunk, self._pre = bytes(self._pre), None
        self.tail += chunk
        excess = len(self.tail) - self.keep
        if excess > 0:
            room = max(0, self.head_limit - len(self.head))
            self.head += self.tail[: min(room, excess)]
            self.dropped += excess - min(room, excess)
            del self.tail[:excess]

    def text(self, tail: bytes) -> tuple[bytes, int, bytes]:
        """Split the final output into (head, dropped byte count, tail) within the limit."""
        head, dropped = bytes(self.head), self.dropped
        if dropped == 0 and len(head) + len(tail) <= self.limit:
            return head + tail, 0, b""
        if dropped == 0:
            whole = head + tail
            return whole[: self.head_limit], len(whole) - self.limit, whole[-self.tail_limit :]
        extra = max(0, len(tail) - self.tail_limit)
        return head, dropped + extra, tail[extra:]


@dataclass(slots=True)
class _Exchange:
    """One command's round trip: the output, and what the end marker line reported."""

    buffer: _OutputBuffer
    tail: bytes
    """The output's tail, without the marker line."""
    done: bool
    """The marker line arrived (the command finished, or was killed and the shell lived)."""
    timed_out: bool
    exit_code: int | None = None
    pids_full: str | None = None
    """"current/max" when the command did not run because the sandbox was out of processes."""
    started: bool = False
    """The shell's start line arrived: the command itself began to run."""
    workspace_kib: int | None = None
    du_seconds: float = 0.0


class PersistentShell:
    """One long-lived shell in a sandbox; `run` is serialised by an internal lock."""

    def __init__(
        self, open_channel: ChannelOpener, reap: Reaper, recover: Recover | None = None
    ) -> None:
        self._open_channel = open_channel
        self._reap = reap
        self._recover = recover
        self._channel: ByteChannel | None = None
        self._pid: int | None = None
        self._cwd: str | None = None
        self._pending = b""
        self._lost_state = False
        self._exit_status: int | None = None
        self._no_writes = False
        """The running shell has a hard file-size limit of 0 (the workspace is over its limit)."""
        self.last_du_seconds = 0.0
        """How long the last measured `du` took."""
        self._lock = anyio.Lock()

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    async def _start(self, *, no_writes: bool = False) -> None:
        channel = await self._open_channel()
        nonce = secrets.token_hex(8)
        # The marker is assembled by printf so that it never appears verbatim in what we send.
        # Over RLIMIT_FSIZE a write then fails with EFBIG instead of killing the writer (and,
        # for a builtin's redirection, the shell itself).
        init = (
            "unset HISTFILE PROMPT_COMMAND; PS1=; PS2=\n"
            "trap '' XFSZ\n"
            + ("ulimit -f 0\n" if no_writes else "")
            + f"cd {_quote(self._cwd)} 2>/dev/null || cd /workspace 2>/dev/null\n"
            "command -v base64 >/dev/null 2>&1 || echo '__MA_NO_BASE64__'\n"
            f"printf '%s_%s %s\\n' __MA_READY {nonce} $$\n"
        )
        try:
            await channel.send(init.encode())
            marker = f"__MA_READY_{nonce} ".encode()
            buf = b""
            with anyio.fail_after(15):
                while True:
                    buf += await channel.receive()
                    if b"__MA_NO_BASE64__" in buf:
                        msg = "the sandbox image has no `base64` command; the shell cannot run"
                        raise SandboxExecError(msg, op="shell.image")
                    idx = buf.find(marker)
                    if idx >= 0 and b"\n" in buf[idx:]:
                        line = buf[idx + len(marker) :].split(b"\n", 1)[0]
                        self._pid = int(line.strip())
                        self._pending = buf[idx + len(marker) :].split(b"\n", 1)[1]
                        break
        except (TimeoutError, anyio.EndOfStream, ValueError, OSError) as exc:
            with anyio.CancelScope(shield=True):
                await channel.aclose()
            msg = f"the sandbox shell did not start: {exc!r}"
            raise SandboxExecError(msg, op="shell.start") from exc
        except BaseException:
            with anyio.CancelScope(shield=True):
                await channel.aclose()
            raise
        self._channel = channel
        self._no_writes = no_writes

    async def _close_channel(self) -> None:
        channel, self._channel, self._pid, self._pending = self._channel, None, None, b""
        if channel is not None:
            self._lost_state = True
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await channel.aclose()

    async def restart(self) -> None:
        """Kill every sandbox process but init's (the shell included) and start a fresh shell."""
        async with self._lock:
            await self._kill_and_close()
            self._cwd = None
            await self._start(no_writes=self._no_writes)
            self._lost_state = False

    async def _kill_and_close(self, *, since: Since | None = None) -> None:
        """Kill the shell and the processes started `since` (None: all of them), then close.

        Shielded and bounded: it also runs on cancellation and when the sandbox is gone.
        """
        pid = self._pid
        try:
            if pid is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(20):
                    # The shell too: a replaced shell stuck in a builtin loop would spin forever.
                    await self._reap(since, (), (pid,))
        except SandboxError as exc:
            # The sandbox may be gone already; the channel must be closed all the same.
            logger.debug("could not kill the shell's processes: %s", exc)
        finally:
            await self._close_channel()

    async def run(
        self,
        command: str,
        *,
        timeout: float,
        output_limit: int,
        measure: bool = False,
        no_writes: bool = False,
    ) -> ShellResult:
        """Run one command; see `Sandbox.run_shell`.

        Args:
            measure: also report how much /workspace holds afterwards (`du`).
            no_writes: run it in a shell that cannot write files; switching this on or off
                replaces the shell (a hard limit cannot be raised again), stopping every other
                sandbox process.

        Raises:
            SandboxExecError: the channel broke, or the sandbox is out of processes and neither
                killing them nor restarting it helped.
        """
        async with self._lock:
            notices: list[str] = []
            fresh = False
            if self._channel is not None and self._no_writes != no_writes:
                await self._kill_and_close()
                self._lost_state, fresh = False, True
                notices.append(
                    "[sandbox: this command ran in a new shell that cannot write files, because "
                    "/workspace is over its size limit; the sandbox's other processes were "
                    "stopped]"
                    if no_writes
                    else "[sandbox: /workspace is back under its size limit, so this command ran "
                    "in a new shell that can write files again]"
                )
            attempts = 0
            while True:
                if self._channel is None:
                    fresh, self._lost_state = fresh or self._lost_state, False
                    await self._start_freeing(no_writes, notices)
                exchange = await self._exchange(command, timeout, output_limit, measure)
                if exchange.pids_full is not None:
                    usage = exchange.pids_full
                elif not exchange.started and not exchange.done and not exchange.timed_out:
                    # The shell died before the command began: it could not fork to decode it.
                    usage = "all"
                else:
                    break
                attempts += 1
                await self._free_processes(usage, attempts, notices)
            return self._result(exchange, fresh, notices)

    async def _try_reap(self, since: Since | None, spare: Sequence[int]) -> int | None:
        """Kill stray processes, trying `REAP_TRIES` times; None if it never ran.

        Starting even the builtin-only killer can fail while the cgroup is full (the container
        runtime's own helper forks into it); a slot is often free a moment later.
        """
        with anyio.move_on_after(30):
            for _ in range(REAP_TRIES):
                try:
                    return await self._reap(since, spare, ())
                except SandboxError as exc:
                    logger.warning("could not kill stray sandbox processes: %s", exc)
        return None

    async def _restart_sandbox(self, notices: list[str], why: str) -> bool:
        """The last resort: restart the whole sandbox. False when that is not possible."""
        if self._recover is None:
            return False
        await self._close_channel()
        try:
            await self._recover()
        except SandboxError as exc:
            logger.warning("could not restart a sandbox that is out of processes: %s", exc)
            return False
        notices.append(
            f"[sandbox: {why} and they could not be stopped, so the sandbox was restarted: every "
            "process in it ended; /workspace was kept, but /tmp, $HOME and "
            "/mnt/session/outputs are empty again and environment variables were reset]"
        )
        return True

    async def _start_freeing(self, no_writes: bool, notices: list[str]) -> None:
        """Start a shell; if that fails, the sandbox may be out of processes: free it and retry.

        Raises:
            SandboxExecError: no shell could be started even so.
        """
        try:
            await self._start(no_writes=no_writes)
            return
        except SandboxExecError as exc:
            if exc.op != "shell.start":
                raise
            failure = exc
        killed = await self._try_reap(None, ())
        if killed:
            try:
                await self._start(no_writes=no_writes)
            except SandboxExecError:
                pass
            else:
                notices.append(
                    "[sandbox: no shell could start, so every process in the sandbox was killed "
                    f"({killed}, background jobs included); this is a new shell]"
                )
                return
        if await self._restart_sandbox(notices, "no shell could start (out of processes?)"):
            await self._start(no_writes=no_writes)
            return
        raise failure

    async def _free_processes(self, usage: str, attempt: int, notices: list[str]) -> None:
        """The sandbox is out of processes (`usage` "current/max"): kill, then restart it.

        Raises:
            SandboxExecError: neither helped.
        """
        why = f"the sandbox had run out of processes ({usage} in use)"
        if attempt == 1:
            killed = await self._try_reap(None, (self._pid,) if self._pid else ())
            if killed is not None:
                notices.append(
                    f"[sandbox: {why}, so before this command ran every other process in it was "
                    f"killed ({killed}, background jobs included)]"
                )
                return
        if attempt <= 2 and await self._restart_sandbox(notices, why):
            return
        msg = (
            f"the sandbox is out of processes ({usage} in use) and they could not be stopped; "
            "restart the shell (bash with restart: true) to try again, or start a new session"
        )
        raise SandboxExecError(msg, op="shell.run")

    async def _exchange(
        self, command: str, timeout: float, output_limit: int, measure: bool
    ) -> _Exchange:
        assert self._channel is not None
        nonce = secrets.token_hex(12)
        end_marker = f"__MA_END_{nonce}__ ".encode()
        encoded = base64.b64encode(command.encode()).decode()
        # The guard and the measurement run in the agent's shell, so their variables are
        # prefixed; the command only runs when the sandbox has pids left to run it with.
        # The command's text is prefixed, inside the command substitution that decodes it, with
        # a printf of the start line: the /proc clock as the command began and (bash) the pid
        # of that substitution, its first process. It runs first, on the command's stdout.
        script = (
            "__ma_t0=; read -r __ma_t0 __ma_z < /proc/uptime; __ma_bg=${!-}\n"
            f"__ma_sp=\"printf '%s_%s %s %s\\n' __MA_START {nonce}\"\n"
            + _pids_check("__ma_full", events=True)
            + '\nif [ -z "$__ma_full" ]; then\n'
            'eval "$(printf \'%s %s %s\\n\' "$__ma_sp" "$__ma_t0" "${BASHPID:-}"; '
            f"printf '%s' '{encoded}' | base64 -d)\" </dev/null 2>&1\n"
            "__ma_rc=$?\n"
            + (_MEASURE if measure else "__ma_du=-\n")
            + f"else printf '%s_%s - -\\n' __MA_START {nonce}; __ma_rc=0 __ma_du=-; fi\n"
            f"printf '\\n%s_%s__ %s %s %s %s\\n' __MA_END {nonce} "
            '"$__ma_rc" "${__ma_full:--}" "$__ma_du" "$PWD"\n'
        )
        start_marker = f"__MA_START_{nonce} ".encode()
        buffer = _OutputBuffer(output_limit, len(end_marker) + 4200, start_marker, end_marker)
        timed_out = done = False
        self._exit_status = None
        started = time.monotonic()
        try:
            await self._channel.send(script.encode())
            with anyio.move_on_after(timeout) as scope:
                done = await self._read_until(end_marker, buffer)
            if scope.cancelled_caught:
                timed_out = True
                done = await self._stop_running_command(end_marker, buffer, started)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._stop_running_command(end_marker, buffer, started)
            raise
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            await self._close_channel()
            msg = (
                f"lost the connection to the sandbox while the command ran ({exc!r}): the "
                "container stopped or its backend (e.g. the Docker daemon) went away, and "
                "the command may or may not have finished. The shell restarts on the next "
                "call."
            )
            raise SandboxExecError(msg, op="shell.run") from exc
        return self._parse(buffer, end_marker, done, timed_out)

    async def _read_until(self, marker: bytes, buffer: _OutputBuffer) -> bool:
        """Feed output into `buffer` until the end marker line is complete; False on EOF."""
        assert self._channel is not None
        data, self._pending = self._pending, b""
        while True:
            if data:
                buffer.feed(data)
                idx = buffer.tail.find(marker)
                if idx >= 0 and b"\n" in buffer.tail[idx + len(marker) :]:
                    return True
            try:
                data = await self._channel.receive()
            except anyio.EndOfStream:
                # The command ended the shell (e.g. `exit`); the next run starts a new one.
                with anyio.move_on_after(5):
                    self._exit_status = await self._channel.exit_code()
                await self._close_channel()
                return False

    async def _stop_running_command(
        self, marker: bytes, buffer: _OutputBuffer, started: float
    ) -> bool:
        """Kill what the command started and resynchronise; replace the shell if stuck."""
        if self._channel is None or self._pid is None:
            return False
        since = Since(buffer.start_tick, buffer.first_pid, time.monotonic() - started + 1.0)
        await self._try_reap(since, (self._pid,))
        with anyio.move_on_after(5):
            if await self._read_until(marker, buffer):
                return True
        # The shell itself is busy (e.g. a builtin loop, or retrying a fork that re-spawns what
        # was just killed) or gone: replace it, killing what it started meanwhile too.
        await self._kill_and_close(since=since)
        return False

    def _parse(
        self, buffer: _OutputBuffer, marker: bytes, done: bool, timed_out: bool
    ) -> _Exchange:
        tail = bytes(buffer.tail)
        exchange = _Exchange(buffer, tail, done, timed_out, started=buffer.started)
        idx = tail.find(marker) if done else -1
        if idx >= 0:
            status_line = tail[idx + len(marker) :].split(b"\n", 1)[0].decode(errors="replace")
            rc, full, du, cwd = (status_line.split(" ", 3) + ["", "", "", ""])[:4]
            self._cwd = cwd or self._cwd
            # Drop the marker line and the newline our printf put in front of it.
            exchange.tail = tail[:idx].removesuffix(b"\n")
            if full not in ("", "-"):
                exchange.pids_full = full
            kib, _, times = du.partition(":")
            before, _, after = times.partition(":")
            if kib.isdigit():
                exchange.workspace_kib = int(kib)
                try:
                    exchange.du_seconds = max(0.0, float(after) - float(before))
                except ValueError:
                    exchange.du_seconds = 0.0
            if not timed_out:
                try:
                    exchange.exit_code = int(rc)
                except ValueError:
                    exchange.exit_code = None
        elif not done and not timed_out:
            exchange.exit_code = self._exit_status
        return exchange

    def _result(self, exchange: _Exchange, fresh: bool, notices: list[str]) -> ShellResult:
        head, dropped, tail = exchange.buffer.text(exchange.tail)
        text = _clean(head)
        if dropped:
            text += f"\n\n[... {dropped} bytes of output truncated ...]\n\n" + _clean(tail)
        result = ShellResult(
            output=text,
            exit_code=exchange.exit_code,
            truncated_bytes=dropped,
            timed_out=exchange.timed_out,
            shell_exited=not exchange.done and not exchange.timed_out,
            shell_restarted=fresh,
            cwd=self._cwd,
            workspace_bytes=None
            if exchange.workspace_kib is None
            else exchange.workspace_kib << 10,
        )
        self.last_du_seconds = exchange.du_seconds
        return with_notices(result, notices)

    async def aclose(self) -> None:
        """Kill the shell and every sandbox process but init's, and close the channel.

        Idempotent; shielded and bounded.
        """
        with anyio.CancelScope(shield=True):
            await self._kill_and_close()


def _ticks(uptime: bytes) -> int | None:
    """`/proc/uptime`'s first field ("12345.67", centiseconds) as clock ticks."""
    whole, _, frac = uptime.strip().partition(b".")
    if not whole.isdigit() or not frac.isdigit():
        return None
    return int(whole) * CLOCK_TICKS + int(frac[:2].ljust(2, b"0")) * CLOCK_TICKS // 100


def with_notices(result: ShellResult, notices: Sequence[str]) -> ShellResult:
    """`result` with `notices` added after its own, all of them on top of its output."""
    if not notices:
        return result
    every = (*result.notices, *notices)
    output = result.output
    if result.notices:
        output = output.removeprefix("\n".join(result.notices) + "\n")
    return replace(result, output="\n".join(every) + "\n" + output, notices=every)


def _clean(data: bytes) -> str:
    return _ANSI.sub(b"", data).decode("utf-8", errors="replace").replace("\r\n", "\n")


def _quote(value: str | None) -> str:
    if not value:
        return "/workspace"
    return "'" + value.replace("'", "'\"'\"'") + "'"


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.3g} {unit}"
    return f"{n} bytes"


class _WorkspaceQuota:
    """What is known about /workspace's size against its limit (see "Workspace size")."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used: int | None = None
        self.over = False
        self._next_check = 0.0

    def due(self) -> bool:
        """Whether the next command should measure (always while over the limit)."""
        return self.limit is not None and (self.over or time.monotonic() >= self._next_check)

    def record(self, result: ShellResult, du_seconds: float) -> str | None:
        """Take a command's measurement in; return the notice it calls for, if any."""
        if self.limit is None or result.workspace_bytes is None:
            return None
        self.used = result.workspace_bytes
        self.over = self.used > self.limit
        pause = du_seconds / DU_TIME_SHARE if du_seconds > DU_ALWAYS else 0.0
        self._next_check = time.monotonic() + pause
        if not self.over:
            return None
        return (
            f"[sandbox: /workspace holds {_size(self.used)}, over its {_size(self.limit)} "
            "limit. Delete files you do not need (e.g. rm -rf build output, caches or "
            "downloads). Until it is back under the limit, commands run in a shell that cannot "
            "write files, and the write and edit tools refuse to write there]"
        )

    def refuse(self, path: str) -> None:
        """Raise when `path` is in /workspace and the workspace is over its limit.

        Raises:
            SandboxPathError: it is.
        """
        if not self.over or self.limit is None:
            return
        if path == WORKSPACE or path.startswith(WORKSPACE + "/"):
            msg = (
                f"{path}: not written, because /workspace holds {_size(self.used or 0)}, over "
                f"its {_size(self.limit)} limit; delete files with bash (rm) first"
            )
            raise SandboxPathError(msg, op="write_file")


class ShellSandbox(abc.ABC):
    """Sandbox operations every backend builds the same way on its one-shot `exec` and a
    channel to a long-lived `sh` (internal base class; backends provide the two primitives).

    Args:
        workspace_limit: `Limits.workspace_bytes`, to check /workspace against after commands
            (None: no check).
    """

    STREAM_FALLBACK_LIMIT = 4 << 30
    """`exec_stream` without a streaming backend buffers at most this much."""

    def __init__(self, *, workspace_limit: int | None = None) -> None:
        self._shell = PersistentShell(self._open_shell_channel, self._reap, self._recover)
        self._quota = _WorkspaceQuota(workspace_limit)
        self.after_restart: Callable[[], Awaitable[None]] | None = None
        """Called after the sandbox was restarted to free its processes (its tmpfs mounts,
        the uploads among them, are empty then); its owner may put files back."""

    @property
    def workspace_limit(self) -> int | None:
        """How much /workspace may hold (None: not checked)."""
        return self._quota.limit

    @workspace_limit.setter
    def workspace_limit(self, value: int | None) -> None:
        self._quota.limit = value
        self._quota.over = self._quota.over and value is not None

    @abc.abstractmethod
    async def _open_shell_channel(self) -> ByteChannel:
        """A channel to a new `sh -c SHELL_LAUNCHER` running as the sandbox user."""

    @abc.abstractmethod
    async def exec(
        self,
        argv: Sequence[str],
        *,
        user: str | None = None,
        stdin: bytes | None = None,
        timeout: float = 60.0,
        max_output: int = 64 << 20,
    ) -> ExecResult:
        """See `Sandbox.exec`."""

    async def exec_stream(
        self,
        argv: Sequence[str],
        sink: ByteSink,
        *,
        user: str | None = None,
        stdin: bytes | None = None,
        timeout: float = 60.0,
    ) -> ExecResult:
        """See `Sandbox.exec_stream`. This fallback buffers the whole output (up to
        `STREAM_FALLBACK_LIMIT`) and then feeds it on; backends that can stream override it."""
        result = await self.exec(
            argv, user=user, stdin=stdin, timeout=timeout, max_output=self.STREAM_FALLBACK_LIMIT
        )
        data = memoryview(result.stdout)
        for start in range(0, len(data), 1 << 20):
            await sink(bytes(data[start : start + (1 << 20)]))
        return ExecResult(exit_code=result.exit_code, stdout=b"", stderr=result.stderr[: 64 << 10])

    async def _reap(self, since: Since | None, spare: Sequence[int], kill: Sequence[int]) -> int:
        """See `Reaper`; runs `REAP_SCRIPT` as a one-shot exec.

        Raises:
            SandboxExecError: it could not run, or failed.
        """
        limit = "all" if since is None else since.arg()
        argv = ["sh", "-c", REAP_SCRIPT, "sh", limit, " ".join(map(str, spare))]
        result = await self.exec([*argv, " ".join(map(str, kill))], timeout=20)
        last = result.stdout.split()[-1:]
        if result.exit_code != 0 or not last or not last[0].isdigit():
            reason = result.stderr.decode(errors="replace").strip()[-300:]
            msg = f"killing stray processes failed (exit {result.exit_code}): {reason}"
            raise SandboxExecError(msg, op="reap")
        return int(last[0])

    async def _restart_sandbox(self) -> None:
        """Restart the whole sandbox (all its processes end, /workspace stays).

        Raises:
            SandboxExecError: this backend cannot (the default).
        """
        msg = "this sandbox backend cannot restart a sandbox to free its processes"
        raise SandboxExecError(msg, op="restart")

    async def _recover(self) -> None:
        await self._restart_sandbox()
        if self.after_restart is not None:
            await self.after_restart()

    async def run_shell(
        self, command: str, *, timeout: float, output_limit: int = 100 * 1024
    ) -> ShellResult:
        quota = self._quota
        result = await self._shell.run(
            command,
            timeout=timeout,
            output_limit=output_limit,
            measure=quota.due(),
            no_writes=quota.over,
        )
        notice = quota.record(result, self._shell.last_du_seconds)
        return with_notices(result, [notice] if notice else [])

    async def restart_shell(self) -> None:
        await self._shell.restart()

    async def read_file(self, path: str, *, max_bytes: int, roots: Sequence[str] = ()) -> bytes:
        return await file_ops.read_file(self.exec, path, max_bytes=max_bytes, roots=roots)

    async def read_range(
        self, path: str, *, offset: int, length: int, roots: Sequence[str] = ()
    ) -> tuple[bytes, int]:
        return await file_ops.read_range(self.exec, path, offset=offset, length=length, roots=roots)

    async def write_file(
        self, path: str, data: bytes, *, user: str | None = None, mode: int | None = None
    ) -> None:
        self._quota.refuse(path)
        await file_ops.write_file(self.exec, path, data, user=user, mode=mode)

    async def aclose(self) -> None:
        await self._shell.aclose()
