"""The sandbox conformance suite: what every `SandboxBackend` must do, as plain async checks.

Each check takes a `Harness` (the backend under test plus how to make specs for it), creates its
own sandboxes with unique names and removes them before returning, pass or fail. Run them all
with `CONFORMANCE_CHECKS`, e.g.::

    for check in CONFORMANCE_CHECKS:
        await check(Harness(backend=MyBackend(), image=IMAGE, labels={...}))
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from sandbox.base import Limits, Sandbox, SandboxBackend, SandboxSpec
from sandbox.errors import SandboxExecError, SandboxNotFound, SandboxPathError

_counter = itertools.count()


@dataclass
class Harness:
    """Everything a check needs to know about the backend under test."""

    backend: SandboxBackend
    image: str
    labels: Mapping[str, str]
    """Put on every sandbox a check creates, so the caller can look for leaks."""
    host_dirs: Sequence[str] = ()
    """Host directories whose entries must not be visible at the same path in a sandbox."""
    limits: Limits = field(default_factory=lambda: Limits(memory_bytes=512 << 20, pids=128))
    env: Mapping[str, str] = field(default_factory=lambda: {"MA_CONFORMANCE": "yes it is"})

    def spec(self, **overrides: Any) -> SandboxSpec:
        """A spec with a fresh unique name, this harness's labels, limits and env."""
        name = f"ma-conf-{secrets.token_hex(4)}-{next(_counter)}"
        spec = SandboxSpec(
            image=self.image, name=name, labels=dict(self.labels), env=self.env, limits=self.limits
        )
        return replace(spec, **overrides)

    @contextlib.asynccontextmanager
    async def sandbox(self, **overrides: Any) -> AsyncIterator[Sandbox]:
        """A new sandbox, closed and removed on exit (shielded and bounded)."""
        spec = self.spec(**overrides)
        with anyio.fail_after(60):
            created = await self.backend.create(spec)
        try:
            yield created
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(60):
                await created.aclose()
                await self.backend.remove(spec.name)


Check = Callable[[Harness], Awaitable[None]]


async def _shell(sandbox: Sandbox, command: str, timeout: float = 20) -> str:
    with anyio.fail_after(timeout + 30):
        result = await sandbox.run_shell(command, timeout=timeout)
    assert result.exit_code == 0, result
    return result.output


def _status_fields(text: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines()) if v}


async def _count(sandbox: Sandbox, pattern: str) -> int:
    """How many processes of the sandbox have args starting with `pattern`."""
    probe = ["sh", "-c", f"ps -eo args | grep -c '^{pattern}' || true"]
    return int((await sandbox.exec(probe, timeout=10)).stdout)


async def _wait_for_processes(sandbox: Sandbox, pattern: str, count: int) -> None:
    """Return once `count` processes whose args start with `pattern` run (bounded)."""
    probe = ["sh", "-c", f"ps -eo args | grep -c '^{pattern}' || true"]
    with anyio.fail_after(20):
        while int((await sandbox.exec(probe, timeout=10)).stdout) < count:
            pass


# ------------------------------------------------------------------------------- the shell


async def check_backend_answers(h: Harness) -> None:
    """`ping` describes the backend and the harness's image is usable."""
    with anyio.fail_after(30):
        description = await h.backend.ping()
        assert description.strip()
        assert await h.backend.image_present(h.image)


async def check_create_gives_a_ready_shell(h: Harness) -> None:
    spec = h.spec()
    with anyio.fail_after(60):
        sandbox = await h.backend.create(spec)
    try:
        assert isinstance(sandbox, Sandbox)
        assert sandbox.id == spec.name
        with anyio.fail_after(5):
            result = await sandbox.run_shell("echo ready", timeout=5)
        assert result.output == "ready\n"
        assert result.exit_code == 0
        assert result.cwd == "/workspace"
        assert not result.shell_restarted
    finally:
        with anyio.CancelScope(shield=True):
            await sandbox.aclose()
            await h.backend.remove(spec.name)


async def check_environment_is_the_documented_one(h: Harness) -> None:
    async with h.sandbox() as sb:
        out = await _shell(
            sb,
            'printf "%s|" "$HOME" "$PATH" "$LANG" "$TERM" "$PAGER" "$GIT_PAGER" '
            '"$PYTHONUNBUFFERED" "$MA_CONFORMANCE"',
        )
    assert out.split("|")[:-1] == [
        "/home/agent",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "C.UTF-8",
        "dumb",
        "cat",
        "cat",
        "1",
        "yes it is",
    ]


async def check_cwd_and_environment_persist(h: Harness) -> None:
    async with h.sandbox() as sb:
        await _shell(sb, "mkdir -p proj && cd proj && export GREETING=hello")
        result = await sb.run_shell('pwd; echo "$GREETING"', timeout=10)
        assert result.output == "/workspace/proj\nhello\n"
        assert result.cwd == "/workspace/proj"


async def check_exit_codes_stderr_and_syntax_errors(h: Harness) -> None:
    async with h.sandbox() as sb:
        failed = await sb.run_shell("echo out; echo err >&2; false", timeout=10)
        assert failed.exit_code == 1
        assert failed.output == "out\nerr\n"
        broken = await sb.run_shell("echo 'unterminated", timeout=10)
        assert broken.exit_code == 2
        after = await sb.run_shell("echo still here", timeout=10)
        assert after.output == "still here\n"
        assert not after.shell_restarted
        ended = await sb.run_shell("cd /tmp; exit 7", timeout=10)
        assert (ended.exit_code, ended.shell_exited) == (7, True)
        fresh = await sb.run_shell("pwd", timeout=10)
        assert (fresh.output, fresh.shell_restarted) == ("/workspace\n", True)


async def check_long_output_keeps_head_and_tail(h: Harness) -> None:
    async with h.sandbox() as sb:
        result = await sb.run_shell("seq 1 200000", timeout=30, output_limit=1000)
    assert result.output.startswith("1\n2\n3\n")
    assert result.output.rstrip().endswith("199999\n200000")
    assert "bytes of output truncated" in result.output
    assert result.truncated_bytes > 1_000_000


async def check_timeout_kills_the_command_but_keeps_the_shell(h: Harness) -> None:
    async with h.sandbox() as sb:
        await _shell(sb, "cd /tmp && export KEEP=1")
        with anyio.fail_after(30):
            result = await sb.run_shell("sleep 60", timeout=1)
        assert result.timed_out
        assert result.exit_code is None
        after = await sb.run_shell(
            "pwd; echo \"$KEEP\"; ps -eo args | grep -c '^sleep 60' || true", timeout=10
        )
        assert after.output.splitlines() == ["/tmp", "1", "0"]
        assert not after.shell_restarted


async def check_cancelling_a_command_kills_its_process_tree(h: Harness) -> None:
    async with h.sandbox() as sb:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(
                    sb.run_shell, "bash -c 'sleep 120 & sleep 121; wait'", timeout=300
                )
            )
            await _wait_for_processes(sb, "sleep 12[01]", 2)
            tg.cancel_scope.cancel()
        with anyio.fail_after(15):
            result = await sb.run_shell("ps -eo args | grep -c '^sleep 12' || true", timeout=10)
        assert result.output.strip() == "0"
        assert not result.shell_restarted


async def check_busy_builtin_loop_is_replaced_by_a_new_shell(h: Harness) -> None:
    """A shell stuck in a builtin loop is replaced in the same cwd, and the old one is gone."""
    async with h.sandbox() as sb:
        await _shell(sb, "cd /tmp")
        with anyio.fail_after(60):
            stuck = await sb.run_shell("while :; do :; done", timeout=1)
        assert stuck.timed_out
        after = await sb.run_shell("pwd; ps -eo args | grep -c '^bash --noprofile'", timeout=10)
        assert after.shell_restarted
        assert after.output == "/tmp\n1\n", "the stuck shell must not keep spinning"


async def check_background_jobs_outlive_their_command(h: Harness) -> None:
    """A job started with `&` (or detached) keeps running after its command ended normally."""
    async with h.sandbox() as sb:
        await _shell(sb, "sleep 901 & (setsid sleep 902 &); echo started")
        await _shell(sb, "echo next")
        assert await _count(sb, "sleep 90[12]") == 2


async def check_timeout_kills_what_the_command_started_even_detached(h: Harness) -> None:
    """A timed-out command's processes die, those that left its tree (setsid, double fork)
    too; a background job of an earlier command lives on."""
    async with h.sandbox() as sb:
        await _shell(sb, "sleep 911 &")
        with anyio.fail_after(40):
            result = await sb.run_shell(
                "(setsid sleep 912 &); (sleep 913 &); sleep 914 & sleep 60", timeout=2
            )
        assert result.timed_out
        assert await _count(sb, "sleep 91[234]") == 0
        assert await _count(sb, "sleep 911") == 1
        assert not (await sb.run_shell("echo same shell", timeout=10)).shell_restarted


async def check_restart_kills_every_process_but_the_sandbox_itself(h: Harness) -> None:
    async with h.sandbox() as sb:
        await _shell(sb, "sleep 921 & (setsid sleep 922 &); cd /tmp")
        with anyio.fail_after(30):
            await sb.restart_shell()
        assert await _count(sb, "sleep 92[12]") == 0
        assert await _shell(sb, "pwd; echo alive > /workspace/f; cat /workspace/f") == (
            "/workspace\nalive\n"
        )


_BOMB = "bomb() { bomb | bomb & }; bomb"
_PROCESS_COUNT = "n=0; for p in /proc/[0-9]*; do n=$((n + 1)); done; echo $n"
# Builtins only, so that it runs in a full sandbox: the process count and how many forks the
# pids limit refused (0 without a readable pids cgroup).
_BOMB_PROBE = (
    _PROCESS_COUNT.replace("echo $n", "e=0; ")
    + "for f in /sys/fs/cgroup/pids/pids.events /sys/fs/cgroup/pids.events; do "
    + '{ read -r k e < "$f"; } 2>/dev/null && break; done; echo "$n ${e:-0}"'
)


async def check_running_out_of_processes_is_cleared_before_the_next_command(h: Harness) -> None:
    """A fork bomb that outlived its command (it backgrounds itself) is killed before the next
    command runs, background jobs with it, and the output says so."""
    async with h.sandbox() as sb:
        await _shell(sb, "sleep 931 &")
        await _shell(sb, _BOMB)
        with anyio.fail_after(30):
            while True:
                probe = await sb.exec(["sh", "-c", _BOMB_PROBE], timeout=10)
                if probe.exit_code != 0:
                    continue  # even starting the probe can fail in a full sandbox
                count, refused = map(int, probe.stdout.split())
                if count >= h.limits.pids - 8 and refused > 0:
                    break
        with anyio.fail_after(60):
            result = await sb.run_shell("echo ok", timeout=30)
        assert result.exit_code == 0
        # Before it: what the killed processes printed last (bash's job reports, say).
        assert "ok" in result.output.splitlines()
        assert len(result.notices) == 1
        assert "run out of processes" in result.notices[0]
        assert result.output.startswith(result.notices[0])
        after = await sb.run_shell(_PROCESS_COUNT + "; pgrep -c -f 'sleep 931' || true", timeout=10)
        # Before them, bash may report the background job it lost.
        count, sleepers = after.output.split()[-2:]
        assert int(count) < 12
        assert sleepers == "0"
        assert after.notices == ()


async def check_workspace_over_its_limit_turns_writes_off(h: Harness) -> None:
    """Over `workspace_bytes`, the next command cannot write files (deleting works) and
    `write_file` refuses the workspace, until enough is deleted."""
    limits = replace(h.limits, workspace_bytes=32 << 20, uploads_bytes=16 << 20)
    async with h.sandbox(limits=limits) as sb:
        filled = await sb.run_shell(
            "for i in 1 2 3; do head -c 12M /dev/zero > /workspace/f$i; done; echo filled",
            timeout=30,
        )
        assert filled.output.endswith("filled\n")
        assert filled.workspace_bytes is not None
        assert filled.workspace_bytes > 32 << 20
        assert "over its 32 MiB limit" in filled.notices[0]
        refused = await sb.run_shell("echo more > /workspace/g || echo refused", timeout=10)
        assert refused.output.endswith("refused\n")
        assert refused.shell_restarted
        with pytest.raises(SandboxPathError, match="over its 32 MiB limit"):
            await sb.write_file("/workspace/h", b"x")
        await sb.write_file("/tmp/elsewhere", b"outside the workspace is fine")
        cleaned = await sb.run_shell("rm /workspace/f1 /workspace/f2; echo gone", timeout=10)
        assert cleaned.output.endswith("gone\n")
        assert cleaned.workspace_bytes is not None
        assert cleaned.workspace_bytes < 32 << 20
        again = await sb.run_shell("echo more > /workspace/g && cat /workspace/g", timeout=10)
        assert again.output.endswith("more\n")
        assert "back under" in again.notices[0]
        await sb.write_file("/workspace/h", b"x")


async def check_a_file_cannot_outgrow_the_workspace_limit(h: Harness) -> None:
    limits = replace(h.limits, workspace_bytes=32 << 20, uploads_bytes=16 << 20)
    async with h.sandbox(limits=limits) as sb:
        result = await sb.run_shell(
            "fallocate -l 40M /workspace/big; head -c 40M /dev/zero > /workspace/big2; "
            "stat -c %s /workspace/big2",
            timeout=30,
        )
        assert result.output.count("File too large") == 2, result.output
        assert result.output.endswith(f"{32 << 20}\n")


# ------------------------------------------------------------------------ one-shot and files


async def check_exec_runs_one_shot_commands_with_stdin(h: Harness) -> None:
    async with h.sandbox() as sb:
        data = b"payload\x00\xff" * 1000
        echoed = await sb.exec(["cat"], stdin=data)
        assert (echoed.exit_code, echoed.stdout, echoed.stderr) == (0, data, b"")
        split = await sb.exec(["sh", "-c", "pwd; echo oops >&2; exit 3"])
        assert (split.exit_code, split.stdout, split.stderr) == (3, b"/workspace\n", b"oops\n")
        await _shell(sb, "cd /tmp && export ONLY_IN_SHELL=1")
        apart = await sb.exec(["sh", "-c", 'pwd; echo "${ONLY_IN_SHELL:-unset}"'])
        assert apart.stdout == b"/workspace\nunset\n"
        missing = await sb.exec(["no-such-command-here"])
        assert missing.exit_code == 127
        with pytest.raises(SandboxExecError, match="did not finish"):
            await sb.exec(["sleep", "30"], timeout=1)


async def check_exec_stream_hands_stdout_over_in_chunks(h: Harness) -> None:
    async with h.sandbox() as sb:
        chunks: list[int] = []

        async def sink(chunk: bytes) -> None:
            assert set(chunk) == {ord("y")}
            chunks.append(len(chunk))

        result = await sb.exec_stream(
            ["sh", "-c", "head -c 5000000 /dev/zero | tr '\\0' y; echo oops >&2; exit 4"], sink
        )
        assert (result.exit_code, result.stdout, result.stderr) == (4, b"", b"oops\n")
        assert sum(chunks) == 5_000_000
        assert len(chunks) > 1


async def check_files_round_trip_binary_safe(h: Harness) -> None:
    async with h.sandbox() as sb:
        data = bytes(range(256)) * 10
        await sb.write_file("/workspace/deep/dir/blob.bin", data)
        assert await sb.read_file("/workspace/deep/dir/blob.bin", max_bytes=len(data)) == data
        listing = await _shell(sb, "stat -c '%u %s' /workspace/deep/dir/blob.bin")
        assert listing == f"1000 {len(data)}\n"
        with pytest.raises(SandboxPathError, match="over the 10-byte limit"):
            await sb.read_file("/workspace/deep/dir/blob.bin", max_bytes=10)
        with pytest.raises(SandboxPathError, match="no such file"):
            await sb.read_file("/workspace/missing", max_bytes=10)
        with pytest.raises(SandboxPathError, match="not a regular file"):
            await sb.read_file("/workspace/deep", max_bytes=10)
        await sb.write_file("/workspace/deep/dir/blob.bin", b"replaced")
        assert await sb.read_file("/workspace/deep/dir/blob.bin", max_bytes=100) == b"replaced"


async def check_symlinks_cannot_lead_reads_out_of_the_roots(h: Harness) -> None:
    async with h.sandbox() as sb:
        await _shell(
            sb, "ln -s /etc/passwd /workspace/passwd-link; echo in > a; ln -s /workspace/a b"
        )
        with pytest.raises(SandboxPathError, match="outside the allowed"):
            await sb.read_file("/workspace/passwd-link", max_bytes=100_000, roots=["/workspace"])
        assert await sb.read_file("/workspace/b", max_bytes=10, roots=["/workspace"]) == b"in\n"
        # Without roots, the same link is followed.
        assert b"root:" in await sb.read_file("/workspace/passwd-link", max_bytes=100_000)


async def check_uploads_written_as_root_are_read_only_to_the_agent(h: Harness) -> None:
    async with h.sandbox() as sb:
        await sb.write_file("/mnt/session/uploads/data.csv", b"a,b\n", user="0", mode=0o444)
        result = await sb.run_shell(
            "cat /mnt/session/uploads/data.csv; echo x >> /mnt/session/uploads/data.csv; "
            "rm -f /mnt/session/uploads/data.csv; touch /mnt/session/uploads/new; "
            "cat /mnt/session/uploads/data.csv; echo out > /mnt/session/outputs/report.txt",
            timeout=10,
        )
        assert result.output.count("a,b") == 2
        assert result.output.count("Permission denied") == 3
        assert result.exit_code == 0  # outputs/ is writable
        assert await sb.read_file("/mnt/session/outputs/report.txt", max_bytes=10) == b"out\n"


# -------------------------------------------------------------------------------- isolation


async def check_processes_are_unprivileged(h: Harness) -> None:
    async with h.sandbox() as sb:
        probe = "grep -E '^(Uid|Gid|Groups|CapPrm|CapEff|CapAmb|NoNewPrivs):' /proc/self/status"
        for text in (
            await _shell(sb, probe),
            (await sb.exec(["sh", "-c", probe])).stdout.decode(),
        ):
            fields = _status_fields(text)
            assert fields["Uid"].split() == ["1000"] * 4
            assert fields["Gid"].split() == ["1000"] * 4
            assert "0" not in fields["Groups"].split()
            assert fields["CapPrm"] == fields["CapEff"] == fields["CapAmb"] == "0" * 16
            assert fields["NoNewPrivs"] == "1"


async def check_there_is_no_network(h: Harness) -> None:
    async with h.sandbox() as sb:
        out = await _shell(sb, "cat /proc/net/dev")
    interfaces = {line.split(":")[0].strip() for line in out.splitlines()[2:] if ":" in line}
    assert interfaces == {"lo"}


def _host_init() -> str:
    return Path("/proc/1/cmdline").read_bytes().replace(b"\0", b" ").strip().decode()


async def check_host_processes_are_invisible(h: Harness) -> None:
    host_init = _host_init()
    async with h.sandbox() as sb:
        out = await _shell(
            sb, "ls /proc | grep -c '^[0-9]'; tr '\\0' ' ' < /proc/1/cmdline; echo; hostname"
        )
    count, init, hostname = out.splitlines()[:3]
    assert int(count) < 25
    assert init.strip() != host_init
    assert hostname == "sandbox"


async def check_host_filesystem_is_read_only_or_absent(h: Harness) -> None:
    async with h.sandbox() as sb:
        result = await sb.run_shell(
            "for f in /usr/bin/ma-x /etc/ma-x /ma-x; do touch $f; done 2>&1", timeout=10
        )
        assert result.output.count("Read-only file system") == 3, result.output
        for directory in h.host_dirs:
            host_entries = set(os.listdir(directory))
            inside = await sb.exec(["sh", "-c", 'ls -A -- "$1" 2>/dev/null', "sh", directory])
            visible = set(inside.stdout.decode().split()) & host_entries
            assert not visible, f"{directory} of the host is visible: {sorted(visible)[:5]}"


# ----------------------------------------------------------------------------------- limits

_FORK_BOMB = """
import os, signal
children, error = [], None
for _ in range(LIMIT * 3):
    try:
        pid = os.fork()
    except OSError as exc:
        error = exc
        break
    if pid == 0:
        signal.pause()
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, signal.SIGKILL)
for pid in children:
    os.waitpid(pid, 0)
print(len(children), error.errno if error else None)
"""


async def check_fork_bomb_hits_the_pids_limit(h: Harness) -> None:
    async with h.sandbox() as sb:
        bomb = _FORK_BOMB.replace("LIMIT", str(h.limits.pids))
        with anyio.fail_after(120):
            out = await _shell(sb, f"python3 -c '{bomb}'", timeout=60)
        forked, errno = out.split()
        assert int(forked) < h.limits.pids
        assert errno == "11"  # EAGAIN
        assert await _shell(sb, "echo alive; sh -c 'echo forks again'") == "alive\nforks again\n"


async def check_memory_hog_is_killed_or_refused(h: Harness) -> None:
    async with h.sandbox() as sb:
        size = h.limits.memory_bytes * 2
        with anyio.fail_after(120):
            hog = await sb.run_shell(
                # Built at run time: bash's "Killed" notice quotes the command line.
                f'python3 -c \'b = bytearray(b"x") * {size}; print("sur" + "vived", len(b))\'',
                timeout=60,
            )
        assert "survived" not in hog.output
        assert hog.exit_code not in (0, None)
        assert await _shell(sb, "echo alive") == "alive\n"


# -------------------------------------------------------------------------------- lifecycle


async def check_stop_then_attach_keeps_the_workspace(h: Harness) -> None:
    label = {"ma-conformance-role": secrets.token_hex(4)}
    async with h.sandbox(labels={**h.labels, **label}) as sb:
        await _shell(sb, "echo kept > /workspace/kept.txt")
        await sb.aclose()
        with anyio.fail_after(60):
            await h.backend.stop(sb.id)
        assert [(i.name, i.running) for i in await h.backend.list(label)] == [(sb.id, False)]
        stopped = await h.backend.inspect(sb.id)
        assert stopped is not None
        assert (stopped.id, stopped.running, stopped.labels.get("ma-conformance-role")) == (
            sb.id,
            False,
            label["ma-conformance-role"],
        )
        with anyio.fail_after(60):
            again = await h.backend.attach(sb.id)
        try:
            assert again.id == sb.id
            assert await _shell(again, "cat /workspace/kept.txt; id -u") == "kept\n1000\n"
            assert [(i.name, i.running) for i in await h.backend.list(label)] == [(sb.id, True)]
            running = await h.backend.inspect(sb.id)
            assert running is not None
            assert running.running
        finally:
            await again.aclose()
        await h.backend.stop(f"{sb.id}-never-existed")  # missing sandboxes are ignored


async def check_remove_is_final_and_idempotent(h: Harness) -> None:
    label = {"ma-conformance-role": secrets.token_hex(4)}
    spec = h.spec(labels={**h.labels, **label})
    with anyio.fail_after(60):
        sandbox = await h.backend.create(spec)
    try:
        await _shell(sandbox, "echo data > /workspace/file")
    finally:
        with anyio.CancelScope(shield=True):
            await sandbox.aclose()
            await h.backend.remove(spec.name)
    assert await h.backend.list(label) == []
    assert await h.backend.inspect(spec.name) is None
    with pytest.raises(SandboxNotFound):
        await h.backend.attach(spec.name)
    await h.backend.remove(spec.name)
    await h.backend.stop(spec.name)


async def check_list_finds_sandboxes_by_labels(h: Harness) -> None:
    token = secrets.token_hex(4)
    async with (
        h.sandbox(labels={**h.labels, "ma-conformance-role": token, "kind": "a"}) as first,
        h.sandbox(labels={**h.labels, "ma-conformance-role": token, "kind": "b"}) as second,
    ):
        both = await h.backend.list({"ma-conformance-role": token})
        assert sorted(i.id for i in both) == sorted([first.id, second.id])
        assert all(i.running for i in both)
        only = await h.backend.list({"ma-conformance-role": token, "kind": "b"})
        assert [(i.id, i.name, i.labels.get("kind")) for i in only] == [(second.id, second.id, "b")]
        assert await h.backend.list({"ma-conformance-role": token, "kind": "c"}) == []


async def check_rename_keeps_the_sandbox_running_under_a_new_name(h: Harness) -> None:
    """A renamed sandbox keeps its processes and files; removing it by the new name is enough."""
    label = {"ma-conformance-role": secrets.token_hex(4)}
    spec = h.spec(labels={**h.labels, **label})
    renamed, current = f"{spec.name}-renamed", spec.name
    with anyio.fail_after(60):
        sandbox = await h.backend.create(spec)
    try:
        await _shell(sandbox, "cd /tmp && export KEPT=1 && echo data > /workspace/file")
        same = await h.backend.rename(sandbox, renamed)
        current = renamed
        assert same.id == renamed
        assert await _shell(same, 'pwd; echo "$KEPT"; cat /workspace/file') == "/tmp\n1\ndata\n"
        assert [i.name for i in await h.backend.list(label)] == [renamed]
        with pytest.raises(SandboxNotFound):
            await h.backend.attach(spec.name)
        again = await h.backend.attach(renamed)
        try:
            assert await _shell(again, "cat /workspace/file") == "data\n"
        finally:
            await again.aclose()
    finally:
        with anyio.CancelScope(shield=True):
            await sandbox.aclose()
            await h.backend.remove(current)
    assert await h.backend.list(label) == []


CONFORMANCE_CHECKS: list[Check] = [
    check_backend_answers,
    check_create_gives_a_ready_shell,
    check_environment_is_the_documented_one,
    check_cwd_and_environment_persist,
    check_exit_codes_stderr_and_syntax_errors,
    check_long_output_keeps_head_and_tail,
    check_timeout_kills_the_command_but_keeps_the_shell,
    check_cancelling_a_command_kills_its_process_tree,
    check_busy_builtin_loop_is_replaced_by_a_new_shell,
    check_background_jobs_outlive_their_command,
    check_timeout_kills_what_the_command_started_even_detached,
    check_restart_kills_every_process_but_the_sandbox_itself,
    check_running_out_of_processes_is_cleared_before_the_next_command,
    check_workspace_over_its_limit_turns_writes_off,
    check_a_file_cannot_outgrow_the_workspace_limit,
    check_exec_runs_one_shot_commands_with_stdin,
    check_exec_stream_hands_stdout_over_in_chunks,
    check_files_round_trip_binary_safe,
    check_symlinks_cannot_lead_reads_out_of_the_roots,
    check_uploads_written_as_root_are_read_only_to_the_agent,
    check_processes_are_unprivileged,
    check_there_is_no_network,
    check_host_processes_are_invisible,
    check_host_filesystem_is_read_only_or_absent,
    check_fork_bomb_hits_the_pids_limit,
    check_memory_hog_is_killed_or_refused,
    check_stop_then_attach_keeps_the_workspace,
    check_remove_is_final_and_idempotent,
    check_list_finds_sandboxes_by_labels,
    check_rename_keeps_the_sandbox_running_under_a_new_name,
]
"""Every check, in a sensible order for a first run."""
