"""A persistent POSIX shell driven over a byte channel, with framed, injection-proof command runs.

Each command is sent base64-encoded and `eval`ed by the shell itself, so quoting mistakes or
syntax errors in the command cannot desynchronise the channel; a per-command random marker
carries the exit status and working directory back.
"""

from __future__ import annotations

import abc
import base64
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import anyio

from . import file_ops
from .base import ExecResult, ShellResult
from .errors import SandboxError, SandboxExecError

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

KillTree = Callable[[int, bool], Awaitable[None]]
"""Kills every descendant of the given in-sandbox pid, and the pid itself when told to."""

SHELL_LAUNCHER = (
    "if command -v bash >/dev/null 2>&1; then exec bash --noprofile --norc; else exec sh; fi"
)
"""Passed as `sh -c` argv (not on stdin): prefer bash, whose `eval` survives syntax errors."""

# Runs inside the sandbox as the sandbox user ($1 the shell's pid, $2 "1" to kill it too):
# SIGSTOP the whole subtree first so nothing can fork away while it is being collected, then
# SIGKILL it. Uses /proc/N/status rather than /proc/N/stat
# because a command name with spaces would shift the stat fields.
KILL_TREE_SCRIPT = r"""
root=$1
kids() {
  for st in /proc/[0-9]*/status; do
    pp=
    while read -r k v; do
      if [ "$k" = "PPid:" ]; then pp=$v; break; fi
    done < "$st" 2>/dev/null
    if [ "$pp" = "$1" ]; then p=${st#/proc/}; echo "${p%/status}"; fi
  done
}
tree() { for c in $(kids "$1"); do echo "$c"; tree "$c"; done; }
for pass in 1 2; do
  pids=$(tree "$root")
  [ -n "$pids" ] || break
  kill -STOP $pids 2>/dev/null
  kill -KILL $pids 2>/dev/null
done
if [ "$2" = 1 ]; then kill -KILL "$root" 2>/dev/null; fi
exit 0
"""


class _OutputBuffer:
    """Keeps the head and a rolling tail of a command's output within a byte budget.

    Everything enters the tail first, so the end marker is always found there; bytes pushed out
    of the tail fill the head until it is full and are counted as dropped after that.
    """

    def __init__(self, limit: int, lookbehind: int) -> None:
        self.limit = limit
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.keep = self.tail_limit + lookbehind
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def feed(self, chunk: bytes) -> None:
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


class PersistentShell:
    """One long-lived shell in a sandbox; `run` is serialised by an internal lock."""

    def __init__(self, open_channel: ChannelOpener, kill_tree: KillTree) -> None:
        self._open_channel = open_channel
        self._kill_tree = kill_tree
        self._channel: ByteChannel | None = None
        self._pid: int | None = None
        self._cwd: str | None = None
        self._pending = b""
        self._lost_state = False
        self._exit_status: int | None = None
        self._lock = anyio.Lock()

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    async def _start(self) -> None:
        channel = await self._open_channel()
        nonce = secrets.token_hex(8)
        # The marker is assembled by printf so that it never appears verbatim in what we send.
        init = (
            "unset HISTFILE PROMPT_COMMAND; PS1=; PS2=\n"
            f"cd {_quote(self._cwd)} 2>/dev/null || cd /workspace 2>/dev/null\n"
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
                        raise SandboxExecError(msg, op="shell.start")
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

    async def _close_channel(self) -> None:
        channel, self._channel, self._pid, self._pending = self._channel, None, None, b""
        if channel is not None:
            self._lost_state = True
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await channel.aclose()

    async def restart(self) -> None:
        """Kill the current shell (and everything it started) and start a fresh one."""
        async with self._lock:
            await self._kill_and_close()
            self._cwd = None
            await self._start()
            self._lost_state = False

    async def _kill_and_close(self) -> None:
        pid = self._pid
        try:
            if pid is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    # The shell too: a replaced shell stuck in a builtin loop would spin forever.
                    await self._kill_tree(pid, True)
        except SandboxError as exc:
            # The sandbox may be gone already; the channel must be closed all the same.
            logger.debug("could not kill the shell's processes: %s", exc)
        finally:
            await self._close_channel()

    async def run(self, command: str, *, timeout: float, output_limit: int) -> ShellResult:
        """Run one command; see `Sandbox.run_shell`."""
        async with self._lock:
            fresh = False
            if self._channel is None:
                fresh, self._lost_state = self._lost_state, False
                await self._start()
            assert self._channel is not None
            nonce = secrets.token_hex(12)
            end_marker = f"__MA_END_{nonce}__ ".encode()
            encoded = base64.b64encode(command.encode()).decode()
            script = (
                f"eval \"$(printf '%s' '{encoded}' | base64 -d)\" </dev/null 2>&1\n"
                f'printf \'\\n%s_%s__ %s %s\\n\' __MA_END {nonce} "$?" "$PWD"\n'
            )
            buffer = _OutputBuffer(output_limit, lookbehind=len(end_marker) + 4200)
            timed_out = done = False
            self._exit_status = None
            try:
                await self._channel.send(script.encode())
                with anyio.move_on_after(timeout) as scope:
                    done = await self._read_until(end_marker, buffer)
                if scope.cancelled_caught:
                    timed_out = True
                    done = await self._stop_running_command(end_marker, buffer)
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    await self._stop_running_command(end_marker, buffer)
                raise
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                await self._close_channel()
                msg = f"the sandbox shell channel broke: {exc!r}"
                raise SandboxExecError(msg, op="shell.run") from exc
            return self._result(buffer, end_marker, done, timed_out, fresh)

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

    async def _stop_running_command(self, marker: bytes, buffer: _OutputBuffer) -> bool:
        """Kill the running command's processes and resynchronise; restart the shell if stuck."""
        if self._channel is None or self._pid is None:
            return False
        with anyio.move_on_after(10):
            await self._kill_tree(self._pid, False)
        with anyio.move_on_after(5):
            if await self._read_until(marker, buffer):
                return True
        # The shell itself is busy (e.g. a builtin loop) or gone: replace it.
        await self._kill_and_close()
        return False

    def _result(
        self, buffer: _OutputBuffer, marker: bytes, done: bool, timed_out: bool, fresh: bool
    ) -> ShellResult:
        exit_code: int | None = None
        tail = bytes(buffer.tail)
        idx = tail.find(marker) if done else -1
        if idx >= 0:
            status_line = tail[idx + len(marker) :].split(b"\n", 1)[0].decode(errors="replace")
            rc, _, cwd = status_line.partition(" ")
            self._cwd = cwd or self._cwd
            # Drop the marker line and the newline our printf put in front of it.
            tail = tail[:idx].removesuffix(b"\n")
            if not timed_out:
                try:
                    exit_code = int(rc)
                except ValueError:
                    exit_code = None
        elif not done and not timed_out:
            exit_code = self._exit_status
        head, dropped, tail = buffer.text(tail)
        text = _clean(head)
        if dropped:
            text += f"\n\n[... {dropped} bytes of output truncated ...]\n\n" + _clean(tail)
        return ShellResult(
            output=text,
            exit_code=exit_code,
            truncated_bytes=dropped,
            timed_out=timed_out,
            shell_exited=not done and not timed_out,
            shell_restarted=fresh,
            cwd=self._cwd,
        )

    async def aclose(self) -> None:
        """Kill the shell and close its channel. Idempotent; shielded and bounded."""
        with anyio.CancelScope(shield=True):
            await self._kill_and_close()


def _clean(data: bytes) -> str:
    return _ANSI.sub(b"", data).decode("utf-8", errors="replace").replace("\r\n", "\n")


def _quote(value: str | None) -> str:
    if not value:
        return "/workspace"
    return "'" + value.replace("'", "'\"'\"'") + "'"


class ShellSandbox(abc.ABC):
    """Sandbox operations every backend builds the same way on its one-shot `exec` and a
    channel to a long-lived `sh` (internal base class; backends provide the two primitives)."""

    def __init__(self) -> None:
        self._shell = PersistentShell(self._open_shell_channel, self._kill_tree)

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

    async def _kill_tree(self, pid: int, include_self: bool = False) -> None:
        flag = "1" if include_self else "0"
        await self.exec(["sh", "-c", KILL_TREE_SCRIPT, "sh", str(pid), flag], timeout=15)

    async def run_shell(
        self, command: str, *, timeout: float, output_limit: int = 100 * 1024
    ) -> ShellResult:
        return await self._shell.run(command, timeout=timeout, output_limit=output_limit)

    async def restart_shell(self) -> None:
        await self._shell.restart()

    async def read_file(self, path: str, *, max_bytes: int, roots: Sequence[str] = ()) -> bytes:
        return await file_ops.read_file(self.exec, path, max_bytes=max_bytes, roots=roots)

    async def write_file(
        self, path: str, data: bytes, *, user: str | None = None, mode: int | None = None
    ) -> None:
        await file_ops.write_file(self.exec, path, data, user=user, mode=mode)

    async def aclose(self) -> None:
        await self._shell.aclose()
