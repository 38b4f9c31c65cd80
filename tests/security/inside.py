"""The escape and reach-out battery, run *inside* a session's sandbox by its bash tool.

This file is not imported by the tests: its source is sent as a tool call
(`python3 - CONFIG <<EOF ... EOF`) and runs as the agent would, with the sandbox's own Python
(the image's for Docker, the host's read-only `/usr` for bubblewrap). Standard library only.

`CONFIG` is base64 JSON: `targets` (host `ip:port` pairs the sandbox must not reach directly),
`curl_direct` (URLs `curl --noproxy '*'` must fail on), `proxy_targets` (absolute URLs or
`CONNECT host:port` lines the egress proxy must refuse), `curl_proxied` (URLs curl must not get
through the proxy), `metadata` (proxy lines for cloud metadata addresses), `host_markers`
(strings in host process command lines that must be invisible), `other_marker` (a name the other
session put in its files and process list) and `other_name` (the other session's container name).

Every route prints one line `MA-ROUTE {"route": ..., "escaped": bool, "evidence": ...}`:
`escaped` is true when the route worked, i.e. the sandbox is broken. Evidence is kept short
(the tool result is capped).
"""

from __future__ import annotations

import base64
import ctypes
import errno
import json
import os
import platform
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

ROUTE_PREFIX = "MA-ROUTE "
PROXY = ("127.0.0.1", 3128)
SKIP_TREES = ("/proc", "/sys")

# Syscall numbers of the calls the battery makes through libc's `syscall()`.
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "mount": 165,
        "unshare": 272,
        "setns": 308,
        "add_key": 248,
        "keyctl": 250,
        "ptrace": 101,
        "init_module": 175,
        "finit_module": 313,
        "delete_module": 176,
        "open_by_handle_at": 304,
        "bpf": 321,
        "userfaultfd": 323,
        "perf_event_open": 298,
        "kexec_load": 246,
        "pidfd_open": 434,
        "pidfd_getfd": 438,
    },
    "aarch64": {
        "mount": 40,
        "unshare": 97,
        "setns": 268,
        "add_key": 217,
        "keyctl": 219,
        "ptrace": 117,
        "init_module": 105,
        "finit_module": 273,
        "delete_module": 106,
        "open_by_handle_at": 265,
        "bpf": 280,
        "userfaultfd": 282,
        "perf_event_open": 241,
        "kexec_load": 104,
        "pidfd_open": 434,
        "pidfd_getfd": 438,
    },
}
NR = SYSCALLS.get(platform.machine(), {})
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
PTRACE_SEIZE = 0x4206
KEY_SPEC_PROCESS_KEYRING = -2
KEYCTL_JOIN_SESSION_KEYRING = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def sys_call(name: str, *args: int | bytes | None) -> tuple[int, str]:
    """(return value, errno name) of a raw syscall; (-1, "unknown-arch") when we lack its nr."""
    if name not in NR:
        return -1, "unknown-arch"
    c_args: list[object] = []
    for arg in args:
        if arg is None:
            c_args.append(ctypes.c_void_p(None))
        elif isinstance(arg, bytes):
            c_args.append(ctypes.c_char_p(arg))
        else:
            c_args.append(ctypes.c_long(arg))
    ctypes.set_errno(0)
    result = int(_libc.syscall(ctypes.c_long(NR[name]), *c_args))
    code = ctypes.get_errno()
    return result, errno.errorcode.get(code, str(code)) if result < 0 else "ok"


def in_child(fn: Callable[[], str], timeout: float = 10) -> str:
    """Run `fn` in a forked child (so a call that *works* cannot change this process); its
    return value, or `child-died`/`fork-failed:...`."""
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        return f"fork-failed:{errno.errorcode.get(exc.errno or 0, exc.errno)}"
    if pid == 0:  # pragma: no cover - child
        os.close(read_end)
        try:
            out = fn()
        except BaseException as exc:
            out = f"raised:{type(exc).__name__}:{exc}"
        os.write(write_end, out.encode(errors="replace")[:2000])
        os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    os.set_blocking(read_end, False)
    while time.monotonic() < deadline:
        try:
            chunk = os.read(read_end, 4096)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    with _suppress():
        os.kill(pid, 9)
    with _suppress():
        os.waitpid(pid, 0)
    return b"".join(chunks).decode(errors="replace") or "child-died"


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def err(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"EAI({exc.errno}: {exc.strerror})"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


def try_open(path: str, flags: int) -> str:
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        return err(exc)
    os.close(fd)
    return "OPENED"


def run(argv: list[str], timeout: float = 10) -> tuple[int | None, str]:
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        return None, "not-installed"
    except subprocess.TimeoutExpired:
        return None, "timeout"
    text = (done.stdout + done.stderr).decode(errors="replace").strip().replace("\n", " | ")
    return done.returncode, text[:200]


def status_fields(pid: str = "self") -> dict[str, str]:
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def pids() -> list[str]:
    return sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int)


def cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def walk(top: str = "/") -> Iterator[tuple[str, os.stat_result]]:
    """Every entry under `top` except /proc and /sys (lstat, symlinks not followed)."""
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            path = entry.path
            if path in SKIP_TREES:
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            yield path, info
            if stat.S_ISDIR(info.st_mode):
                stack.append(path)


class FS:
    """One walk of the sandbox's filesystem, shared by the routes that need it."""

    def __init__(self, marker: str) -> None:
        self.sockets: list[str] = []
        self.setuid: list[str] = []
        self.block_devices: list[str] = []
        self.char_devices: list[str] = []
        self.marker_paths: list[str] = []
        self.docker_named: list[str] = []
        self.entries = 0
        for path, info in walk():
            self.entries += 1
            mode = info.st_mode
            name = os.path.basename(path)
            if stat.S_ISSOCK(mode):
                self.sockets.append(path)
            if stat.S_ISBLK(mode):
                self.block_devices.append(path)
            if stat.S_ISCHR(mode):
                self.char_devices.append(path)
            if stat.S_ISREG(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
                self.setuid.append(path)
            if marker and marker in name:
                self.marker_paths.append(path)
            if ("docker" in name and name.endswith(".sock")) or name == "containerd.sock":
                self.docker_named.append(path)


def http_over(sock: socket.socket, request: bytes, limit: int = 4096) -> bytes:
    sock.settimeout(5)
    sock.sendall(request)
    data = b""
    while len(data) < limit:
        try:
            chunk = sock.recv(4096)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data


def status_line(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode(errors="replace")[:120]


# ----------------------------------------------------------------------------------- routes


def route_docker_socket(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    known = [
        "/var/run/docker.sock",
        "/run/docker.sock",
        "/run/containerd/containerd.sock",
        "/var/run/containerd/containerd.sock",
        "/run/podman/podman.sock",
        "/run/user/0/docker.sock",
        "/run/user/1000/docker.sock",
    ]
    present = [p for p in known if os.path.lexists(p)]
    found = sorted(set(present + fs.docker_named))
    return bool(found), f"known paths present={present}; docker-named sockets={fs.docker_named}"


def _abstract_sockets() -> list[str]:
    names: list[str] = []
    try:
        with open("/proc/net/unix") as handle:
            for line in list(handle)[1:]:
                parts = line.split()
                if len(parts) >= 8 and parts[7].startswith("@"):
                    names.append(parts[7])
    except OSError:
        pass
    return sorted(set(names))


def route_docker_api(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    """Speak the Docker Engine API to every Unix socket we can find (paths and abstract)."""
    tried: list[str] = []
    escaped = False
    request = b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n"
    targets: list[tuple[str, str | bytes]] = [(p, p) for p in fs.sockets]
    targets += [(a, b"\0" + a[1:].encode()) for a in _abstract_sockets()]
    for label, address in targets[:40]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(3)
                sock.connect(address)
                answer = http_over(sock, request)
        except OSError as exc:
            tried.append(f"{label}:{err(exc)}")
            continue
        lowered = answer.lower()
        docker_like = b"api-version" in lowered or b"docker" in lowered
        if docker_like:
            escaped = True
        tried.append(f"{label}:{status_line(answer)!r}{' DOCKER' if docker_like else ''}")
    return escaped, f"sockets={len(targets)}: " + "; ".join(tried)


def route_proc_sys_write(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    paths = [
        "/proc/sys/kernel/core_pattern",
        "/proc/sys/kernel/modprobe",
        "/proc/sys/kernel/hostname",
        "/proc/sys/vm/drop_caches",
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sysrq-trigger",
        "/proc/sys/fs/binfmt_misc/register",
    ]
    results = {p: try_open(p, os.O_WRONLY) for p in paths}
    return "OPENED" in results.values(), json.dumps(results)


def route_sys_write(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    paths = [
        "/sys/kernel/uevent_helper",
        "/sys/kernel/mm/transparent_hugepage/enabled",
        "/sys/class/net/lo/mtu",
        "/sys/power/state",
        "/sys/kernel/profiling",
    ]
    results = {p: try_open(p, os.O_WRONLY) for p in paths}
    try:
        os.mkdir("/sys/ma-probe")
        results["mkdir /sys/ma-probe"] = "CREATED"
    except OSError as exc:
        results["mkdir /sys/ma-probe"] = err(exc)
    escaped = any(v in ("OPENED", "CREATED") for v in results.values())
    return escaped, json.dumps(results)


def route_cgroup_write(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    """Create a cgroup, or write our own limits (raising them would escape the limits)."""
    results: dict[str, str] = {}
    root = "/sys/fs/cgroup"
    try:
        controllers = sorted(os.listdir(root))
    except OSError as exc:
        return False, f"{root}: {err(exc)}"
    for name in controllers[:20]:
        base = os.path.join(root, name)
        try:
            os.mkdir(os.path.join(base, "ma-probe"))
            results[f"mkdir {name}/ma-probe"] = "CREATED"
        except OSError as exc:
            results[f"mkdir {name}/ma-probe"] = err(exc)
        for leaf in (
            "cgroup.procs",
            "tasks",
            "pids.max",
            "memory.limit_in_bytes",
            "memory.max",
            "cpu.cfs_quota_us",
            "cpu.max",
            "notify_on_release",
            "cgroup.subtree_control",
            "devices.allow",
        ):
            path = os.path.join(base, leaf)
            if os.path.exists(path):
                results[f"{name}/{leaf}"] = try_open(path, os.O_WRONLY)
    escaped = any(v in ("OPENED", "CREATED") for v in results.values())
    shown = {k: v for k, v in results.items() if v in ("OPENED", "CREATED")} or dict(
        list(results.items())[:8]
    )
    return escaped, f"{len(results)} attempts; {json.dumps(shown)}"


def route_release_agent(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    """CVE-2022-0492: a writable release_agent, existing or in a freshly mounted cgroup v1."""
    found: list[str] = []
    for path, _ in walk("/sys/fs/cgroup"):
        if path.endswith("/release_agent"):
            found.append(path)
    opened = {p: try_open(p, os.O_WRONLY) for p in found}
    target = "/tmp/ma-probe-cgroup"
    with _suppress():
        os.mkdir(target)

    def mount_cgroup() -> str:
        result, code = sys_call("mount", b"cgroup", target.encode(), b"cgroup", 0, b"rdma")
        return "MOUNTED" if result == 0 else code

    def userns_then_mount() -> str:
        result, code = sys_call("unshare", CLONE_NEWUSER | CLONE_NEWNS)
        if result != 0:
            return f"unshare:{code}"
        result, code = sys_call("mount", b"cgroup", target.encode(), b"cgroup", 0, b"rdma")
        return "MOUNTED" if result == 0 else f"mount:{code}"

    mounted = in_child(mount_cgroup)
    via_userns = in_child(userns_then_mount)
    escaped = "OPENED" in opened.values() or "MOUNTED" in (mounted, via_userns)
    return escaped, (
        f"release_agent files={len(found)} {json.dumps(opened)[:300]}; "
        f"mount cgroup={mounted}; unshare+mount={via_userns}"
    )


def _root_id(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def route_proc1_root(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    """/proc/N/root of every visible process must be our own root (none leads to the host's)."""
    own = _root_id("/")
    different: list[str] = []
    denied = 0
    for pid in pids():
        root = _root_id(f"/proc/{pid}/root/")
        if root is None:
            denied += 1
        elif root != own:
            different.append(pid)
    try:
        listing = sorted(os.listdir("/proc/1/root/"))[:12]
    except OSError as exc:
        listing = [err(exc)]
    return bool(different), (
        f"processes whose root differs from ours={different}; unreadable={denied}; "
        f"/proc/1/root lists {listing}"
    )


def route_host_pids(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    markers = [str(m) for m in cfg.get("host_markers", []) or []]  # type: ignore[union-attr]
    visible = pids()
    lines = {pid: cmdline(pid) for pid in visible}
    seen = sorted({m for m in markers for text in lines.values() if m and m in text})
    init = lines.get("1", "")
    escaped = bool(seen) or len(visible) > 64
    return escaped, (
        f"{len(visible)} pids visible; pid 1 = {init[:80]!r}; host markers seen={seen}; "
        f"host-looking pid 1={'process_api' in init or 'systemd' in init}"
    )


def route_host_network(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    interfaces: set[str] = set()
    with open("/proc/net/dev") as handle:
        for line in list(handle)[2:]:
            interfaces.add(line.split(":")[0].strip())
    with _suppress():
        interfaces |= set(os.listdir("/sys/class/net"))
    routes = []
    with _suppress(), open("/proc/net/route") as handle:
        routes = [line.split()[0] for line in list(handle)[1:] if line.strip()]
    others = sorted(interfaces - {"lo"})
    return bool(others or routes), f"interfaces={sorted(interfaces)}; ipv4 routes via={routes}"


def _connect(host: str, port: int, timeout: float = 3) -> str:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect((host, port))
    except OSError as exc:
        return err(exc)
    except Exception as exc:
        return type(exc).__name__
    return "CONNECTED"


def _split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def route_host_ports_direct(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    """TCP straight to the host's services: this server's HTTP port, the model API, a canary
    bound to 0.0.0.0 on every host address (bypassing any proxy)."""
    targets = [str(t) for t in cfg.get("targets", []) or []]  # type: ignore[union-attr]
    results = {t: _connect(*_split_target(t)) for t in targets}
    curls = {}
    for url in [str(u) for u in cfg.get("curl_direct", []) or []]:  # type: ignore[union-attr]
        code, out = run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]
            + ["--noproxy", "*", url]
        )
        curls[url] = f"rc={code} {out[:80]}"
    escaped = "CONNECTED" in results.values() or any(v.startswith("rc=0 ") for v in curls.values())
    return escaped, f"connect: {json.dumps(results)}; curl --noproxy: {json.dumps(curls)}"


def _proxy_request(line: str) -> str:
    """Ask the egress forwarder (if any) for `line`: an absolute URL (GET) or `CONNECT h:p`."""
    if line.startswith("CONNECT "):
        authority = line.split(" ", 1)[1]
        request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    else:
        host = line.split("/")[2]
        request = f"GET {line} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    try:
        with socket.create_connection(PROXY, timeout=5) as sock:
            answer = http_over(sock, request)
    except OSError as exc:
        return f"no-proxy:{err(exc)}"
    return status_line(answer)


def _refused(answer: str) -> bool:
    """The proxy refused by policy (403), or there is no proxy at all (nothing can pass)."""
    return answer.startswith("no-proxy:") or answer.split(" ")[1:2] == ["403"]


def route_host_ports_via_proxy(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    lines = [str(t) for t in cfg.get("proxy_targets", []) or []]  # type: ignore[union-attr]
    results = {line: _proxy_request(line) for line in lines}
    curls = {}
    for url in [str(u) for u in cfg.get("curl_proxied", []) or []]:  # type: ignore[union-attr]
        code, out = run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]
            + ["--proxy", "http://127.0.0.1:3128", url]
        )
        curls[url] = f"rc={code} {out[:100]}"
    escaped = not all(_refused(v) for v in results.values()) or any(
        v.startswith("rc=0 ") and not v.startswith("rc=0 403") for v in curls.values()
    )
    return escaped, f"proxy: {json.dumps(results)}; curl --proxy: {json.dumps(curls)}"


def route_cloud_metadata(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    direct = {
        a: _connect(*_split_target(a))
        for a in ("169.254.169.254:80", "[fd00:ec2::254]:80", "100.100.100.200:80")
    }
    code, out = run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]
        + ["--noproxy", "*", "http://169.254.169.254/latest/meta-data/"]
    )
    lines = [str(t) for t in cfg.get("metadata", []) or []]  # type: ignore[union-attr]
    proxied = {line: _proxy_request(line) for line in lines}
    escaped = (
        "CONNECTED" in direct.values()
        or code == 0
        or not all(_refused(v) for v in proxied.values())
    )
    return escaped, (
        f"direct: {json.dumps(direct)}; curl --noproxy rc={code} {out[:60]}; "
        f"proxy: {json.dumps(proxied)}"
    )


def route_mount(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    target = "/tmp/ma-probe-mnt"
    with _suppress():
        os.mkdir(target)

    def tmpfs() -> str:
        result, code = sys_call("mount", b"none", target.encode(), b"tmpfs", 0, None)
        return "MOUNTED" if result == 0 else code

    def bind_root() -> str:
        result, code = sys_call("mount", b"/", target.encode(), None, MS_BIND, None)
        return "MOUNTED" if result == 0 else code

    def proc() -> str:
        result, code = sys_call("mount", b"proc", target.encode(), b"proc", 0, None)
        return "MOUNTED" if result == 0 else code

    results = {"tmpfs": in_child(tmpfs), "bind /": in_child(bind_root), "proc": in_child(proc)}
    rc, out = run(["mount", "-t", "tmpfs", "none", target])
    results["setuid mount(8)"] = f"rc={rc} {out[:120]}"
    rc2, out2 = run(["mount", "-o", "remount,rw", "/"])
    results["remount / rw"] = f"rc={rc2} {out2[:80]}"
    escaped = "MOUNTED" in results.values() or rc == 0 or rc2 == 0
    return escaped, json.dumps(results)


def route_unshare(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    """New namespaces: a user namespace gives root-in-namespace and a huge kernel surface."""

    def flags(value: int) -> Callable[[], str]:
        def call() -> str:
            result, code = sys_call("unshare", value)
            return "UNSHARED" if result == 0 else code

        return call

    results = {
        "unshare(NEWUSER)": in_child(flags(CLONE_NEWUSER)),
        "unshare(NEWNS)": in_child(flags(CLONE_NEWNS)),
        "unshare(NEWNET)": in_child(flags(CLONE_NEWNET)),
    }
    rc, out = run(["unshare", "-Ur", "id", "-u"])
    results["unshare -Ur id -u"] = f"rc={rc} {out[:120]}"
    escaped = "UNSHARED" in results.values() or rc == 0
    return escaped, json.dumps(results)


def route_keyctl(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    def add_key() -> str:
        result, code = sys_call(
            "add_key", b"user", b"ma-probe", b"secret", 6, KEY_SPEC_PROCESS_KEYRING
        )
        return "ADDED" if result >= 0 else code

    def join_keyring() -> str:
        result, code = sys_call("keyctl", KEYCTL_JOIN_SESSION_KEYRING, None)
        return "JOINED" if result >= 0 else code

    results = {"add_key": in_child(add_key), "keyctl(JOIN_SESSION)": in_child(join_keyring)}
    escaped = "ADDED" in results.values() or "JOINED" in results.values()
    return escaped, json.dumps(results)


def route_raw_sockets(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    attempts = {
        "AF_INET/SOCK_RAW/ICMP": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
        "AF_INET/SOCK_RAW/RAW": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
        "AF_INET6/SOCK_RAW/ICMPV6": (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6),
        "AF_PACKET/SOCK_RAW": (getattr(socket, "AF_PACKET", 17), socket.SOCK_RAW, 0x0300),
    }
    results: dict[str, str] = {}
    for name, (family, kind, proto) in attempts.items():
        try:
            socket.socket(family, kind, proto).close()
            results[name] = "CREATED"
        except OSError as exc:
            results[name] = err(exc)
    return "CREATED" in results.values(), json.dumps(results)


def route_ptrace(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    """PTRACE_SEIZE pid 1 and every other visible process: tracing must never reach a process
    outside the sandbox or one with more privilege than the agent (another uid, any capability).
    """
    me = os.getuid()
    results: dict[str, str] = {}
    escaped = False
    for pid in pids()[:60]:
        if int(pid) == os.getpid():
            continue
        try:
            fields = status_fields(pid)
        except OSError:
            continue
        uid = int(fields.get("Uid", "0").split()[0])
        privileged = uid != me or int(fields.get("CapEff", "0"), 16) != 0

        def seize(target: int = int(pid)) -> str:
            result, code = sys_call("ptrace", PTRACE_SEIZE, target, 0, 0)
            return "TRACED" if result == 0 else code

        outcome = in_child(seize)
        label = f"{pid}(uid={uid},{cmdline(pid)[:24]!r})"
        results[label] = outcome
        if outcome == "TRACED" and privileged:
            escaped = True
    init = status_fields("1") if os.path.exists("/proc/1/status") else {}
    return escaped, (
        f"pid 1 uid={init.get('Uid', '?').split()[0]} CapEff={init.get('CapEff')}; "
        + json.dumps(results)[:900]
    )


def route_nsenter(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    results: dict[str, str] = {}
    for ns in ("mnt", "net", "pid", "user", "cgroup"):

        def enter(kind: str = ns) -> str:
            try:
                fd = os.open(f"/proc/1/ns/{kind}", os.O_RDONLY)
            except OSError as exc:
                return f"open:{err(exc)}"
            result, code = sys_call("setns", fd, 0)
            return "ENTERED" if result == 0 else code

        results[f"setns(/proc/1/ns/{ns})"] = in_child(enter)
    rc, out = run(["nsenter", "-t", "1", "-m", "-u", "-i", "-n", "-p", "id", "-u"])
    results["nsenter -t 1 -a"] = f"rc={rc} {out[:100]}"
    escaped = "ENTERED" in results.values() or rc == 0
    return escaped, json.dumps(results)


def route_kernel_module(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    def finit() -> str:
        fd = os.open("/dev/null", os.O_RDONLY)
        result, code = sys_call("finit_module", fd, b"", 0)
        return "LOADED" if result == 0 else code

    def init() -> str:
        result, code = sys_call("init_module", b"\0" * 64, 64, b"")
        return "LOADED" if result == 0 else code

    def delete() -> str:
        result, code = sys_call("delete_module", b"ma_probe_none", 0o4000)
        # ENOENT would mean the permission check passed (no such module).
        return "CHECK-PASSED" if result == 0 or code == "ENOENT" else code

    results = {"finit_module": in_child(finit), "init_module": in_child(init)}
    results["delete_module"] = in_child(delete)
    results["/proc/sys/kernel/modprobe"] = try_open("/proc/sys/kernel/modprobe", os.O_WRONLY)
    escaped = any(v in ("LOADED", "CHECK-PASSED", "OPENED") for v in results.values())
    return escaped, json.dumps(results)


def route_device_nodes(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    results: dict[str, str] = {}
    for path in ("/dev/mem", "/dev/kmem", "/dev/port", "/proc/kcore"):
        results[f"read {path}"] = try_open(path, os.O_RDONLY)
    for path in ("/dev/kmsg", "/dev/mem", "/dev/console", "/dev/tty0"):
        results[f"write {path}"] = try_open(path, os.O_WRONLY)
    for path in fs.block_devices[:10]:
        results[f"block {path}"] = try_open(path, os.O_RDONLY)
    for where in ("/tmp", "/dev/shm", "/workspace"):
        target = os.path.join(where, "ma-probe-blk")
        try:
            os.mknod(target, stat.S_IFBLK | 0o600, os.makedev(8, 0))
            results[f"mknod {target}"] = "CREATED"
            os.unlink(target)
        except OSError as exc:
            results[f"mknod {target}"] = err(exc)
    others = [
        d
        for d in fs.char_devices
        if d.startswith("/dev/")
        and os.path.basename(d)
        not in {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "console"}
        and not d.startswith(("/dev/pts/", "/dev/shm/"))
    ]
    escaped = bool(fs.block_devices) or any(v in ("OPENED", "CREATED") for v in results.values())
    return escaped, f"block devices={fs.block_devices[:5]}; other char devices={others[:10]}; " + (
        json.dumps(results)
    )


CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapAmb")


def route_capabilities(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    """No capability in any usable set, NoNewPrivs on, not uid 0 (this shell and pid 1)."""
    report: dict[str, str] = {}
    escaped = False
    for pid in ("self", "1"):
        try:
            fields = status_fields(pid)
        except OSError as exc:
            report[pid] = err(exc)
            continue
        caps = {k: fields.get(k, "?") for k in CAP_FIELDS}
        uids = fields.get("Uid", "?").split()
        report[pid] = f"uid={uids} {caps} NoNewPrivs={fields.get('NoNewPrivs')}"
        if any(int(v, 16) for v in caps.values() if v != "?") or "0" in uids:
            escaped = True
        if pid == "self" and fields.get("NoNewPrivs") != "1":
            escaped = True
    return escaped, json.dumps(report)


def route_bounding_set_and_seccomp(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    """Defence in depth: an empty bounding set and a seccomp filter that denies the kernel
    surface container escapes use (bpf, userfaultfd, perf_event_open, kexec_load...)."""
    fields = status_fields()
    bounding = fields.get("CapBnd", "?")
    seccomp = fields.get("Seccomp", "?")

    def call(name: str, *args: int | bytes | None) -> Callable[[], str]:
        def attempt() -> str:
            result, code = sys_call(name, *args)
            return "ALLOWED" if result >= 0 else code

        return attempt

    attr = (ctypes.c_char * 128)()
    ctypes.memset(attr, 0, 128)
    # BPF_MAP_CREATE of a 4-entry array map: harmless if it works, but it should not.
    map_attr = bytes([2, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0]) + b"\0" * 112
    syscalls = {
        "bpf(MAP_CREATE)": in_child(call("bpf", 0, map_attr, 128)),
        "userfaultfd": in_child(call("userfaultfd", 0)),
        "perf_event_open(sw clock)": in_child(
            call(
                "perf_event_open",
                bytes([1, 0, 0, 0, 128, 0, 0, 0]) + b"\0" * 120,
                0,
                -1,
                -1,
                0,
            )
        ),
        "kexec_load(nothing)": in_child(call("kexec_load", 0, 0, None, 0)),
    }
    escaped = (
        int(bounding, 16) != 0 if bounding != "?" else True
    ) or seccomp != "2"  # 2 = filter mode
    allowed = [k for k, v in syscalls.items() if v == "ALLOWED"]
    return escaped or bool(allowed), (
        f"CapBnd={bounding} Seccomp={seccomp}; syscalls {json.dumps(syscalls)}"
    )


def route_open_by_handle(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    """The 'shocker' escape: open_by_handle_at needs CAP_DAC_READ_SEARCH."""

    def attempt() -> str:
        fd = os.open("/", os.O_RDONLY)
        # struct file_handle { u32 handle_bytes = 8; int handle_type = 1; u64 inode 2 (root) }
        handle = (8).to_bytes(4, "little") + (1).to_bytes(4, "little") + (2).to_bytes(8, "little")
        result, code = sys_call("open_by_handle_at", fd, handle, os.O_RDONLY)
        return "OPENED" if result >= 0 else code

    result = in_child(attempt)
    return result == "OPENED", f"open_by_handle_at={result}"


def route_setuid(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    """Setuid binaries exist in the image; none may lift the agent to uid 0."""
    results: dict[str, str] = {}
    for argv in (
        ["su", "-c", "id -u", "root"],
        ["su", "root", "-s", "/bin/sh", "-c", "id -u"],
        ["sudo", "-n", "id", "-u"],
        ["newgrp", "root"],
        ["chsh", "-s", "/bin/sh", "root"],
    ):
        rc, out = run(argv, timeout=8)
        results[" ".join(argv)] = f"rc={rc} {out[:90]}"
    rc, out = run(["setpriv", "--reuid=0", "id", "-u"])
    results["setpriv --reuid=0"] = f"rc={rc} {out[:90]}"
    escaped = any(
        v.startswith("rc=0 ") and v.split(" ", 1)[1].startswith("0") for v in results.values()
    )
    mounts: list[str] = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            parts = line.split()
            options = parts[5].split(",")
            if "rw" in options and "nosuid" not in options:
                mounts.append(parts[4])
    return escaped, (
        f"setuid/setgid files={[os.path.basename(p) for p in fs.setuid]}; "
        f"NoNewPrivs={status_fields().get('NoNewPrivs')}; writable mounts without nosuid={mounts}; "
        + json.dumps(results)
    )


def _grab_and_write(pid: int, fd: int) -> str:
    """Take a copy of process `pid`'s descriptor `fd` (pidfd_getfd: same uid suffices) and write
    one line through it: the file is outside the sandbox, so this proves a host write."""
    pidfd, code = sys_call("pidfd_open", pid, 0)
    if pidfd < 0:
        return f"pidfd_open:{code}"
    got, code = sys_call("pidfd_getfd", pidfd, fd, 0)
    if got < 0:
        return f"pidfd_getfd:{code}"
    try:
        os.write(got, b"ma-probe: this line was written from inside the sandbox\n")
    except OSError as exc:
        return f"grabbed, write {err(exc)}"
    return "WRITTEN"


def route_leaked_fds(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    """CVE-2024-21626 class: a descriptor (or cwd/root) of any visible process that points at a
    file outside the sandbox: following the magic link must give the same file as the path it
    names inside the sandbox. An outside descriptor is then grabbed and written through."""
    outside: list[str] = []
    checked = 0
    for pid in pids():
        links: list[str] = [f"/proc/{pid}/cwd", f"/proc/{pid}/root"]
        with _suppress():
            links += [f"/proc/{pid}/fd/{n}" for n in os.listdir(f"/proc/{pid}/fd")]
        for link in links:
            try:
                target = os.readlink(link)
                through = os.stat(link)
            except OSError:
                continue
            if not target.startswith("/") or target.startswith("/dev/pts"):
                continue  # pipes, sockets, anon inodes
            checked += 1
            if target.endswith(" (deleted)"):
                continue
            try:
                named = os.stat(target)
                problem = (
                    ""
                    if (named.st_dev, named.st_ino) == (through.st_dev, through.st_ino)
                    else "another file"
                )
            except OSError as exc:
                problem = err(exc)
            if not problem:
                continue
            fd = link.rsplit("/", 1)[1]
            grabbed = (
                in_child(lambda p=int(pid), n=int(fd): _grab_and_write(p, n))
                if fd.isdigit()
                else "-"
            )
            outside.append(f"{link}->{target} ({problem}; {grabbed})")
    return bool(outside), f"{checked} path descriptors checked; outside={outside[:10]}"


def route_rootfs_write(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    results: dict[str, str] = {}
    for path in ("/ma-probe", "/etc/ma-probe", "/usr/bin/ma-probe", "/var/ma-probe"):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
            os.unlink(path)
            results[path] = "CREATED"
        except OSError as exc:
            results[path] = err(exc)
    results["/etc/shadow"] = try_open("/etc/shadow", os.O_RDONLY)
    results["/proc/1/exe (write)"] = try_open("/proc/1/exe", os.O_WRONLY)
    results["/proc/self/exe (write)"] = try_open("/proc/self/exe", os.O_WRONLY)
    escaped = any(v in ("CREATED", "OPENED") for v in results.values())
    return escaped, json.dumps(results)


def route_other_session(cfg: dict[str, object], fs: FS) -> tuple[bool, str]:
    """The other session's files (workspace, /tmp, home, outputs), processes and name."""
    marker = str(cfg.get("other_marker") or "")
    name = str(cfg.get("other_name") or "")
    processes = [pid for pid in pids() if marker and marker in cmdline(pid)]
    try:
        resolved = sorted({i[4][0] for i in socket.getaddrinfo(name, 80)}) if name else []
    except OSError as exc:
        resolved = [f"unresolved:{err(exc)}"]
    reached = _connect(name, 80) if name else "-"
    escaped = bool(fs.marker_paths or processes) or reached == "CONNECTED"
    return escaped, (
        f"files named like the marker={fs.marker_paths[:5]}; processes={processes}; "
        f"{name} resolves to {resolved}; connect={reached}; fs entries walked={fs.entries}"
    )


ROUTES: dict[str, Callable[[dict[str, object], FS], tuple[bool, str]]] = {
    "docker_socket": route_docker_socket,
    "docker_api_over_unix_sockets": route_docker_api,
    "proc_sys_write": route_proc_sys_write,
    "sys_write": route_sys_write,
    "cgroup_write": route_cgroup_write,
    "release_agent": route_release_agent,
    "proc1_root": route_proc1_root,
    "host_pid_visibility": route_host_pids,
    "host_network_namespace": route_host_network,
    "host_ports_direct": route_host_ports_direct,
    "host_ports_via_proxy": route_host_ports_via_proxy,
    "cloud_metadata": route_cloud_metadata,
    "mount": route_mount,
    "unshare_namespaces": route_unshare,
    "keyctl": route_keyctl,
    "raw_sockets": route_raw_sockets,
    "ptrace": route_ptrace,
    "nsenter": route_nsenter,
    "kernel_module": route_kernel_module,
    "device_nodes": route_device_nodes,
    "capabilities": route_capabilities,
    "bounding_set_and_seccomp": route_bounding_set_and_seccomp,
    "open_by_handle_at": route_open_by_handle,
    "setuid_escalation": route_setuid,
    "leaked_fds": route_leaked_fds,
    "rootfs_and_host_files": route_rootfs_write,
    "other_session": route_other_session,
}


def main() -> None:
    cfg = json.loads(base64.b64decode(sys.argv[1])) if len(sys.argv) > 1 else {}
    started = time.monotonic()
    fs = FS(str(cfg.get("other_marker") or ""))
    for name, route in ROUTES.items():
        try:
            escaped, evidence = route(cfg, fs)
        except Exception as exc:
            evidence = f"probe-error {type(exc).__name__}: {exc}"
            line = {"route": name, "escaped": False, "evidence": evidence, "error": True}
        else:
            line = {"route": name, "escaped": escaped, "evidence": evidence[:1500]}
        print(ROUTE_PREFIX + json.dumps(line), flush=True)
    print(f"MA-DONE {time.monotonic() - started:.1f}s", flush=True)


if __name__ == "__main__":
    main()
