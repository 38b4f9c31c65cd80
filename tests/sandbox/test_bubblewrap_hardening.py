"""The bubblewrap backend's hardening: its seccomp program (evaluated here, for both
architectures) and, in real sandboxes, capabilities, the filter, descriptors and egress."""

from __future__ import annotations

import json
import platform
import re
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import anyio
import pytest
import pytest_asyncio

from sandbox import seccomp
from sandbox.base import SandboxSpec
from sandbox.bubblewrap import BubblewrapBackend, BubblewrapSandbox
from sandbox.egress import SOCKET_NAME
from sandbox.errors import SandboxExecError

EPERM = seccomp.SECCOMP_RET_ERRNO | seccomp.EPERM
ENOSYS = seccomp.SECCOMP_RET_ERRNO | seccomp.ENOSYS
ALLOW = seccomp.SECCOMP_RET_ALLOW
KILL = seccomp.SECCOMP_RET_KILL_PROCESS
SIGCHLD = 17
THREAD_FLAGS = 0x003D0F00  # what glibc's pthread_create passes to clone
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_ARM = 0x40000028


# ------------------------------------------------------------------------ the BPF program


def run_filter(nr: int, args: Sequence[int] = (), *, arch: str = "x86_64") -> int:
    """What `seccomp.FILTER` answers for one call: a small classic-BPF interpreter covering the
    instructions the program uses, over a packed `struct seccomp_data`."""
    return run_program(seccomp.FILTER, nr & 0xFFFFFFFF, seccomp.ARCHES[arch], args)


def run_program(program: bytes, nr: int, audit_arch: int, args: Sequence[int]) -> int:
    padded = [*args, 0, 0, 0, 0, 0, 0][:6]
    data = struct.pack("=IIQ6Q", nr, audit_arch, 0, *(a & (2**64 - 1) for a in padded))
    insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    pc = acc = 0
    for _ in range(len(insns)):
        code, jt, jf, k = insns[pc]
        if code == 0x20:  # ld [k]
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code in (0x15, 0x35, 0x45):  # jeq, jge, jset
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += 1 + (jt if taken else jf)
        elif code == 0x06:  # ret k
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x} at {pc}")
    raise AssertionError("the program ran past its length")


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_listed_calls_fail_with_eperm(arch: str) -> None:
    table = seccomp.SYSCALLS[arch]
    for name in seccomp.DENIED:
        if name in table:
            assert run_filter(table[name], arch=arch) == EPERM, name


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_ordinary_calls_and_flags_are_allowed(arch: str) -> None:
    table = seccomp.SYSCALLS[arch]
    assert run_filter(0, arch=arch) == ALLOW
    assert run_filter(table["clone"], [SIGCHLD], arch=arch) == ALLOW
    assert run_filter(table["clone"], [THREAD_FLAGS], arch=arch) == ALLOW
    assert run_filter(table["unshare"], [0x400], arch=arch) == ALLOW  # CLONE_FILES
    assert run_filter(table["ioctl"], [1, 0x5401], arch=arch) == ALLOW  # TCGETS
    for persona in seccomp.PERSONALITY_ALLOWED:
        assert run_filter(table["personality"], [persona], arch=arch) == ALLOW


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_namespaces_terminal_injection_and_odd_personalities_are_refused(arch: str) -> None:
    table = seccomp.SYSCALLS[arch]
    for flag in (seccomp.CLONE_NEWUSER, seccomp.CLONE_NEWNS, seccomp.CLONE_NEWNET):
        assert run_filter(table["clone"], [flag | SIGCHLD], arch=arch) == EPERM
        # High bits beyond the low word do not hide the flag.
        assert run_filter(table["unshare"], [flag | 1 << 40], arch=arch) == EPERM
    assert run_filter(table["unshare"], [seccomp.CLONE_NEWTIME], arch=arch) == EPERM
    assert run_filter(table["clone3"], [0, 88], arch=arch) == ENOSYS
    assert run_filter(table["ioctl"], [0, seccomp.TIOCSTI], arch=arch) == EPERM
    assert run_filter(table["ioctl"], [0, 1 << 32 | seccomp.TIOCSTI], arch=arch) == EPERM
    assert run_filter(table["ioctl"], [0, seccomp.TIOCLINUX], arch=arch) == EPERM
    assert run_filter(table["personality"], [0x0040000], arch=arch) == EPERM  # no ASLR


def test_other_abis_are_killed() -> None:
    x86 = seccomp.SYSCALLS["x86_64"]
    assert run_program(seccomp.FILTER, 39, AUDIT_ARCH_I386, []) == KILL
    assert run_program(seccomp.FILTER, 39, AUDIT_ARCH_ARM, []) == KILL
    assert run_filter(seccomp.X32_SYSCALL_BIT | 39) == KILL
    assert run_filter(seccomp.X32_SYSCALL_BIT | x86["keyctl"]) == KILL
    # -1 is what a tracer's skipped call looks like; the kernel answers it with ENOSYS.
    assert run_filter(-1) == ALLOW


def test_program_fits_the_kernel_limit() -> None:
    assert len(seccomp.FILTER) % 8 == 0
    assert len(seccomp.FILTER) // 8 <= 4096  # BPF_MAXINSNS


HEADERS = {
    "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "aarch64": Path("/usr/include/asm-generic/unistd.h"),
}


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_call_numbers_match_the_kernel_headers(arch: str) -> None:
    header = HEADERS[arch]
    if not header.exists():
        pytest.skip(f"{header} is not installed (linux-libc-dev)")
    found = dict(re.findall(r"#define __NR(?:3264)?_(\w+)\s+(\d+)", header.read_text()))
    for name, number in seccomp.SYSCALLS[arch].items():
        assert int(found[name]) == number, name
    # Calls left out of a table really do not exist on that architecture.
    missing = [n for n in seccomp.DENIED if n not in seccomp.SYSCALLS[arch] and n in found]
    assert missing == []


# ------------------------------------------------------------------------- real sandboxes


@pytest.fixture
def state_root() -> Iterator[Path]:
    parent = Path(tempfile.mkdtemp(prefix="ma-bwrap-hardening-"))
    parent.chmod(0o711)  # bwrap runs as the sandbox uid and must reach the bind sources
    try:
        yield parent / "state"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest_asyncio.fixture
async def sandbox(state_root: Path) -> AsyncIterator[BubblewrapSandbox]:
    backend = BubblewrapBackend(state_root)
    sb = await backend.create(SandboxSpec(image="host", name="hardening"))
    try:
        yield sb
    finally:
        await sb.aclose()
        await backend.remove(sb.id)


STATUS = r"""
import json, os
found = {}
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    try:
        lines = open(f"/proc/{pid}/status").read().splitlines()
        args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].decode()
    except OSError:
        continue
    fields = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    keep = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
    found[f"{pid} {args}"] = {k: fields.get(k, "?").strip() for k in keep}
print(json.dumps(found))
"""


def _assert_confined(processes: dict[str, dict[str, str]]) -> None:
    assert len(processes) >= 3, processes  # bwrap's pid 1, the payload, this process at least
    for name, fields in processes.items():
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(fields[cap], 16) == 0, (name, fields)
        assert fields["NoNewPrivs"] == "1", (name, fields)
        assert fields["Seccomp"] == "2", (name, fields)


@pytest.mark.bubblewrap
@pytest.mark.asyncio
async def test_every_process_runs_without_capabilities_and_under_the_filter(
    sandbox: BubblewrapSandbox,
) -> None:
    """bwrap's pid 1, the payload, the persistent shell and its children, and exec'd commands
    -- as the agent and as root -- all have every capability set (bounding included) empty,
    no_new_privs and the seccomp filter."""
    shell = await sandbox.run_shell(f"python3 - <<'EOF'\n{STATUS}\nEOF", timeout=30)
    assert shell.exit_code == 0, shell.output
    processes = json.loads(shell.output)
    assert any(name.startswith("1 ") and "bwrap" in name for name in processes), processes
    assert any("bash" in name for name in processes), processes
    _assert_confined(processes)
    for user in (None, "0"):
        result = await sandbox.exec(["python3", "-c", STATUS], user=user)
        assert result.exit_code == 0, result.stderr
        _assert_confined(json.loads(result.stdout))


CALLS = r"""
import ctypes, errno, json, platform
NR = {
    "x86_64": {"keyctl": 250, "add_key": 248, "bpf": 321, "unshare": 272, "ptrace": 101,
               "pidfd_getfd": 438, "mount": 165, "setns": 308, "clone3": 435,
               "perf_event_open": 298, "userfaultfd": 323},
    "aarch64": {"keyctl": 219, "add_key": 217, "bpf": 280, "unshare": 97, "ptrace": 117,
                "pidfd_getfd": 438, "mount": 40, "setns": 268, "clone3": 435,
                "perf_event_open": 241, "userfaultfd": 282},
}[platform.machine()]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(name, *args):
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(NR[name]), *[ctypes.c_long(a) for a in args])
    return "ok" if result >= 0 else errno.errorcode[ctypes.get_errno()]
print(json.dumps({
    "keyctl": call("keyctl", 1, 0),
    "add_key": call("add_key", 0, 0, 0, 0, -2),
    "bpf": call("bpf", 0, 0, 0),
    "unshare(NEWUSER)": call("unshare", 0x10000000),
    "unshare(NEWNS)": call("unshare", 0x00020000),
    "ptrace(TRACEME)": call("ptrace", 0, 0, 0, 0),
    "pidfd_getfd": call("pidfd_getfd", 0, 0, 0),
    "mount": call("mount", 0, 0, 0, 0, 0),
    "setns": call("setns", 0, 0),
    "perf_event_open": call("perf_event_open", 0, 0, -1, -1, 0),
    "userfaultfd": call("userfaultfd", 0),
    "clone3": call("clone3", 0, 0),
}))
"""
EXPECTED_CALLS = {
    "keyctl": "EPERM",
    "add_key": "EPERM",
    "bpf": "EPERM",
    "unshare(NEWUSER)": "EPERM",
    "unshare(NEWNS)": "EPERM",
    "ptrace(TRACEME)": "EPERM",
    "pidfd_getfd": "EPERM",
    "mount": "EPERM",
    "setns": "EPERM",
    "perf_event_open": "EPERM",
    "userfaultfd": "EPERM",
    "clone3": "ENOSYS",
}

ORDINARY_WORK = r"""
set -e
cd /tmp
python3 - <<'EOF'
import multiprocessing, subprocess, threading
out = []
thread = threading.Thread(target=out.append, args=("thread",))
thread.start()
thread.join()
out.append(subprocess.run(["echo", "child"], capture_output=True, text=True).stdout.strip())
with multiprocessing.Pool(2) as pool:
    out.append(str(sum(pool.map(abs, [-1, -2]))))
print(" ".join(out))
EOF
python3 -m venv --without-pip venv && venv/bin/python -c 'print("venv")'
git init -q repo && git -C repo -c user.name=a -c user.email=a@b commit -q --allow-empty -m x
echo "commits=$(git -C repo rev-list --count HEAD)"
sleep 300 &
victim=$!
ps -eo pid,args | grep -q "^ *$victim sleep 300"
kill "$victim"
wait "$victim" || echo "killed=$?"
"""


@pytest.mark.bubblewrap
@pytest.mark.asyncio
async def test_dangerous_calls_fail_and_ordinary_work_still_runs(
    sandbox: BubblewrapSandbox,
) -> None:
    for run in (
        await sandbox.exec(["python3", "-c", CALLS]),
        await sandbox.exec(["python3", "-c", CALLS], user="0"),
    ):
        assert run.exit_code == 0, run.stderr
        assert json.loads(run.stdout) == EXPECTED_CALLS
    shell = await sandbox.run_shell(f"python3 - <<'EOF'\n{CALLS}\nEOF", timeout=30)
    assert json.loads(shell.output) == EXPECTED_CALLS
    work = await sandbox.run_shell(ORDINARY_WORK, timeout=120)
    assert work.exit_code == 0, work.output
    assert work.output.splitlines() == ["thread child 3", "venv", "commits=1", "killed=143"]


@pytest.mark.bubblewrap
@pytest.mark.asyncio
async def test_a_call_made_with_another_abi_kills_the_process(sandbox: BubblewrapSandbox) -> None:
    if platform.machine() != "x86_64":
        pytest.skip("the x32 ABI exists on x86_64 only")
    x32_getpid = (
        "import ctypes; libc = ctypes.CDLL(None); libc.syscall(ctypes.c_long(0x40000027)); "
        "print('survived')"
    )
    run = await sandbox.exec(["python3", "-c", x32_getpid])
    assert (run.exit_code, run.stdout) == (128 + 31, b"")  # SIGSYS
    shell = await sandbox.run_shell(f'python3 -c "{x32_getpid}"; echo "status=$?"', timeout=30)
    assert shell.output.endswith("status=159\n"), shell.output


FDS = r"""
import json, os
outside = []
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        continue
    for fd in fds:
        link = f"/proc/{pid}/fd/{fd}"
        try:
            target, through = os.readlink(link), os.stat(link)
        except OSError:
            continue
        if not target.startswith("/") or target.endswith(" (deleted)"):
            continue
        try:
            named = os.stat(target)
            same = (named.st_dev, named.st_ino) == (through.st_dev, through.st_ino)
        except OSError:
            same = False
        if not same:
            outside.append(f"{link} -> {target}")
print(json.dumps(outside))
"""


@pytest.mark.bubblewrap
@pytest.mark.asyncio
async def test_no_process_inside_holds_a_host_file(
    sandbox: BubblewrapSandbox, state_root: Path
) -> None:
    """Every path descriptor of every process inside (bwrap's pid 1 included) names the same
    file inside the sandbox; the state directory has no log bwrap could keep open."""
    run = await sandbox.exec(["python3", "-c", FDS])
    assert run.exit_code == 0, run.stderr
    assert json.loads(run.stdout) == []
    assert sorted(p.name for p in (state_root / sandbox.id).iterdir()) == [
        "etc",
        "home",
        "outputs",
        "state.json",
        "tmp",
        "uploads",
        "workspace",
    ]


@pytest.mark.bubblewrap
@pytest.mark.asyncio
async def test_a_failed_start_quotes_bwrap(state_root: Path) -> None:
    backend = BubblewrapBackend(state_root, extra_ro_paths=["/nonexistent-ma-hardening"])
    with pytest.raises(SandboxExecError) as caught:
        await backend.create(SandboxSpec(image="host", name="broken"))
    assert "nonexistent-ma-hardening" in str(caught.value)
    assert not (state_root / "broken").exists()


class _UnixEcho:
    """Answers `echo:<what it received>` on a Unix socket in a root-only directory."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ma-bwrap-egress-"))
        self.root.chmod(0o700)
        self.dir = self.root / "session"
        self.dir.mkdir(mode=0o755)
        self.dir.chmod(0o755)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.dir / SOCKET_NAME))
        (self.dir / SOCKET_NAME).chmod(0o666)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"echo:" + conn.recv(100))

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)
        shutil.rmtree(self.root, ignore_errors=True)


THROUGH_FORWARDER = r"""
import socket, time
deadline = time.monotonic() + 20
while True:  # the payload starts the forwarder in the background
    try:
        conn = socket.create_connection(("127.0.0.1", 3128), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
conn.sendall(b"hello")
print(conn.recv(100).decode())
"""


@pytest.mark.bubblewrap
@pytest.mark.asyncio
async def test_egress_reaches_a_socket_directory_private_to_root(state_root: Path) -> None:
    """The session's socket directory sits under a 0700 root, as EgressManager keeps it; the
    sandbox still reaches it through the forwarder, and no mount of it shows on the host."""
    echo = _UnixEcho()
    backend = BubblewrapBackend(state_root)
    try:
        spec = SandboxSpec(image="host", name="egress", egress_socket_dir=str(echo.dir))
        sb = await backend.create(spec)
        try:
            with anyio.fail_after(60):
                run = await sb.exec(["python3", "-c", THROUGH_FORWARDER], timeout=50)
            assert run.exit_code == 0, run.stderr
            assert run.stdout.decode().strip() == "echo:hello"
            fds = await sb.exec(["python3", "-c", FDS])
            assert json.loads(fds.stdout) == []
            mounts = await anyio.Path("/proc/self/mountinfo").read_text()
            assert str(echo.dir) not in mounts
            assert str(state_root) not in mounts
        finally:
            await sb.aclose()
            await backend.remove(sb.id)
        assert (await anyio.Path(echo.root).stat()).st_mode & 0o777 == 0o700
    finally:
        echo.close()
