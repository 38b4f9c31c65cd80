"""Egress control: per-session HTTP(S) proxies on Unix sockets that enforce a networking policy."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import logging
import os
import re
import socket
import stat
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Connector = Callable[[IPAddress, int], Awaitable[anyio.abc.ByteStream]]
"""Opens the upstream TCP connection to an already-checked address (injectable for tests)."""

PROXY_PORT = 3128
"""Port of the in-container forwarder on 127.0.0.1."""
SOCKET_NAME = "proxy.sock"
CONTAINER_SOCKET_DIR = "/run/managed-agents/egress"
"""Where a session's socket directory is bind-mounted inside its container."""
CONTAINER_SOCKET_PATH = f"{CONTAINER_SOCKET_DIR}/{SOCKET_NAME}"
DEFAULT_PORTS: frozenset[int] = frozenset({80, 443})

PACKAGE_MANAGER_HOSTS: tuple[str, ...] = (
    # Python
    "pypi.org",
    "files.pythonhosted.org",
    # JavaScript
    "registry.npmjs.org",
    "registry.yarnpkg.com",
    # Debian / Ubuntu / Alpine system packages
    "deb.debian.org",
    "security.debian.org",
    "archive.ubuntu.com",
    "security.ubuntu.com",
    "dl-cdn.alpinelinux.org",
    # Rust
    "crates.io",
    "static.crates.io",
    "index.crates.io",
    # Ruby
    "rubygems.org",
    "index.rubygems.org",
    # Go
    "proxy.golang.org",
    "sum.golang.org",
    # Java
    "repo.maven.apache.org",
    "repo1.maven.org",
)
"""Hosts a limited policy adds when `allow_package_managers` is true (exact names only)."""

AddressKind = Literal[
    "public",
    "private",
    "loopback",
    "link-local",
    "metadata",
    "unspecified",
    "multicast",
    "reserved",
]

_RFC1918_CGNAT = tuple(
    ipaddress.IPv4Network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)
_ULA_SITE_LOCAL = tuple(ipaddress.IPv6Network(n) for n in ("fc00::/7", "fec0::/10"))
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_CLASS_E = ipaddress.IPv4Network("240.0.0.0/4")
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_LEGACY_V4 = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}", re.IGNORECASE)
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SESSION_DIR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
        b"host",
    }
)
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_SUN_PATH_MAX = 107


def proxy_env(port: int = PROXY_PORT) -> dict[str, str]:
    """Environment that points a container's HTTP clients at its forwarder (upper and lower
    case: tools disagree on which they read)."""
    url = f"http://127.0.0.1:{port}"
    env: dict[str, str] = dict.fromkeys(
        ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"), url
    )
    env["ALL_PROXY"] = env["all_proxy"] = url
    env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1"
    return env


def classify_address(ip: IPAddress) -> AddressKind:
    """What kind of address `ip` is; IPv6 forms that embed an IPv4 address are judged by it.

    `private` covers RFC 1918, CGNAT (100.64/10), ULA (fc00::/7), site-local and the other
    non-global unicast ranges (documentation, benchmarking...); `metadata` is a cloud instance
    metadata address (169.254.169.254 and friends); `reserved` is 0/8, 240/4 (incl. broadcast),
    Teredo and IPv4-compatible IPv6.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ip if ip.scope_id is None else ipaddress.IPv6Address(ip.compressed.split("%")[0])
        if ip.ipv4_mapped is not None:
            return classify_address(ip.ipv4_mapped)
        if ip in _NAT64:
            return classify_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None:
            embedded = classify_address(ip.sixtofour)
            if embedded != "public":
                return embedded
        if ip.teredo is not None:
            return "reserved"
    if ip in _METADATA:
        return "metadata"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address):
        if ip in _THIS_NETWORK or ip in _CLASS_E:
            return "reserved"
        if any(ip in net for net in _RFC1918_CGNAT):
            return "private"
    else:
        if ip in _V4_COMPATIBLE:
            return "reserved"
        if any(ip in net for net in _ULA_SITE_LOCAL):
            return "private"
    return "public" if ip.is_global else "private"


def own_address_problem(ip: IPAddress) -> str | None:
    """Why `ip` must be refused as one of this host's own addresses, or None.

    Asks the kernel: binding to an address only succeeds when it is local (this covers every
    interface, Docker bridge gateways included). With `net.ipv4.ip_nonlocal_bind=1` every address
    looks local, and egress fails closed.
    """
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        probe = socket.socket(family, socket.SOCK_DGRAM)
    except OSError:
        return None  # no such address family here, so not ours either
    with probe:
        try:
            probe.bind((str(ip), 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return None
            return f"cannot tell whether {ip} is this host's own address ({exc.strerror})"
    return "one of the server host's own addresses"


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address `host` denotes if it is an IP literal (also `[v6]` and inet_aton forms such as
    `2130706433` or `127.1`, which clients pass on as-is), else None."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if _LEGACY_V4.fullmatch(text):
        with contextlib.suppress(OSError):
            return ipaddress.IPv4Address(socket.inet_aton(text))
    return None


def normalize_host(host: str) -> str:
    """Lower-case `host` and drop one trailing dot; raise ValueError unless it is a DNS name."""
    name = host.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253 or not name.isascii():
        msg = f"{host[:80]!r} is not a valid host name"
        raise ValueError(msg)
    if not all(_LABEL.fullmatch(label) for label in name.split(".")):
        msg = f"{host[:80]!r} is not a valid host name"
        raise ValueError(msg)
    return name


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """Which destinations a session may reach through its egress proxy.

    `unrestricted`: any host name or IP, as long as every address it resolves to is public
    (never loopback, private/CGNAT/ULA, link-local or metadata, multicast, unspecified, reserved,
    nor one of the server host's own addresses).

    `limited` (deny by default): the requested name must equal an `allowed_hosts` entry
    (case-insensitive, trailing dot ignored) or fall under a `*.domain` entry (subdomains only,
    not the apex); `allow_package_managers` adds `PACKAGE_MANAGER_HOSTS`, `allow_mcp_servers`
    adds `mcp_server_hosts`. Raw IP literals are refused unless that exact IP is listed. An
    allowed name may resolve to a private (RFC 1918, CGNAT, ULA) address, so LAN services can be
    listed, but never to loopback, link-local/metadata, unspecified, multicast, reserved or the
    server host's own addresses.

    Both: only `allowed_ports` (default 80 and 443; None means any port).
    """

    mode: Literal["unrestricted", "limited"] = "limited"
    allowed_hosts: tuple[str, ...] = ()
    allow_package_managers: bool = False
    allow_mcp_servers: bool = False
    mcp_server_hosts: tuple[str, ...] = ()
    allowed_ports: frozenset[int] | None = DEFAULT_PORTS
    _names: frozenset[str] = field(init=False, repr=False, compare=False)
    _suffixes: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _ips: frozenset[IPAddress] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in ("unrestricted", "limited"):
            msg = f"unknown egress mode {self.mode!r}"
            raise ValueError(msg)
        if self.allowed_ports is not None:
            ports = frozenset(self.allowed_ports)
            if any(not 0 < p < 65536 for p in ports):
                msg = f"allowed_ports must lie in 1..65535, got {sorted(ports)}"
                raise ValueError(msg)
            object.__setattr__(self, "allowed_ports", ports)
        object.__setattr__(self, "allowed_hosts", tuple(self.allowed_hosts))
        object.__setattr__(self, "mcp_server_hosts", tuple(self.mcp_server_hosts))
        entries = list(self.allowed_hosts)
        if self.allow_package_managers:
            entries += PACKAGE_MANAGER_HOSTS
        if self.allow_mcp_servers:
            entries += self.mcp_server_hosts
        names: set[str] = set()
        suffixes: list[str] = []
        ips: set[IPAddress] = set()
        for entry in entries:
            if entry.startswith("*."):
                suffixes.append("." + normalize_host(entry[2:]))
            elif (ip := parse_ip_literal(entry)) is not None:
                ips.add(ip)
            else:
                names.add(normalize_host(entry))
        object.__setattr__(self, "_names", frozenset(names))
        object.__setattr__(self, "_suffixes", tuple(suffixes))
        object.__setattr__(self, "_ips", frozenset(ips))

    @classmethod
    def unrestricted(cls, *, allowed_ports: Iterable[int] | None = DEFAULT_PORTS) -> EgressPolicy:
        ports = None if allowed_ports is None else frozenset(allowed_ports)
        return cls(mode="unrestricted", allowed_ports=ports)

    @classmethod
    def limited(
        cls,
        allowed_hosts: Iterable[str] = (),
        *,
        allow_package_managers: bool = False,
        allow_mcp_servers: bool = False,
        mcp_server_hosts: Iterable[str] = (),
        allowed_ports: Iterable[int] | None = DEFAULT_PORTS,
    ) -> EgressPolicy:
        return cls(
            mode="limited",
            allowed_hosts=tuple(allowed_hosts),
            allow_package_managers=allow_package_managers,
            allow_mcp_servers=allow_mcp_servers,
            mcp_server_hosts=tuple(mcp_server_hosts),
            allowed_ports=None if allowed_ports is None else frozenset(allowed_ports),
        )

    @classmethod
    def from_networking(
        cls,
        networking: Mapping[str, object],
        *,
        mcp_server_hosts: Iterable[str] = (),
        allowed_ports: Iterable[int] | None = DEFAULT_PORTS,
    ) -> EgressPolicy:
        """Build the policy from an environment's `config.networking` dict (missing type:
        unrestricted, the API's default). Raises ValueError on anything else malformed."""
        kind = networking.get("type", "unrestricted")
        if kind == "unrestricted":
            return cls.unrestricted(allowed_ports=allowed_ports)
        if kind != "limited":
            msg = f"unknown networking type {kind!r}"
            raise ValueError(msg)
        hosts = networking.get("allowed_hosts") or []
        if not isinstance(hosts, list | tuple) or not all(isinstance(h, str) for h in hosts):
            msg = "networking.allowed_hosts must be a list of host names"
            raise ValueError(msg)
        return cls.limited(
            [str(h) for h in hosts],
            allow_package_managers=bool(networking.get("allow_package_managers", False)),
            allow_mcp_servers=bool(networking.get("allow_mcp_servers", False)),
            mcp_server_hosts=mcp_server_hosts,
            allowed_ports=allowed_ports,
        )

    def destination_refusal(self, host: str, port: int) -> str | None:
        """Why a request for `host:port` is refused before any resolution, or None.

        `host` is as the client sent it (`[v6]` brackets, any case, trailing dot allowed)."""
        if self.allowed_ports is not None and port not in self.allowed_ports:
            allowed = ", ".join(str(p) for p in sorted(self.allowed_ports)) or "none"
            return f"port {port} is not allowed (allowed ports: {allowed})"
        if not 0 < port < 65536:
            return f"port {port} is out of range"
        ip = parse_ip_literal(host)
        if ip is not None:
            if self.mode == "limited" and ip not in self._ips:
                return (
                    f"{ip} is a raw IP address; only the host names in this environment's "
                    "allowed_hosts are reachable"
                )
            return None
        try:
            name = normalize_host(host)
        except ValueError as exc:
            return str(exc)
        if self.mode == "limited" and not self._name_allowed(name):
            return f"{name} is not in this environment's allowed_hosts (networking: limited)"
        return None

    def _name_allowed(self, name: str) -> bool:
        if name in self._names:
            return True
        return any(name.endswith(s) and len(name) > len(s) for s in self._suffixes)

    def address_refusal(self, ip: IPAddress) -> str | None:
        """Why connecting to the resolved address `ip` is refused by its kind, or None.

        Does not check the host's own addresses (`own_address_problem` does, with a syscall)."""
        kind = classify_address(ip)
        if kind == "public":
            return None
        if kind == "private" and self.mode == "limited":
            return None
        if kind == "private":
            return f"{ip} is a private address (unrestricted networking only reaches public ones)"
        if kind == "metadata":
            return f"{ip} is a cloud metadata address"
        return f"{ip} is a {kind} address"

    def allows(self, host: str, port: int) -> bool:
        """Whether the name rules let `host:port` through (resolved addresses still checked)."""
        return self.destination_refusal(host, port) is None


class Resolver(Protocol):
    """Resolves a host name to the addresses to try, in order."""

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Raise OSError when the name does not resolve."""
        ...


class SystemResolver:
    """The server host's resolver (`getaddrinfo` in a worker thread)."""

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        found: list[IPAddress] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            ip = ipaddress.ip_address(sockaddr[0])
            if ip not in found:
                found.append(ip)
        return found


class StaticResolver:
    """A fixed name → addresses map (case-insensitive); unknown names do not resolve."""

    def __init__(self, mapping: Mapping[str, str | Sequence[str]]) -> None:
        self._map: dict[str, list[IPAddress]] = {}
        for name, addresses in mapping.items():
            items = [addresses] if isinstance(addresses, str) else list(addresses)
            self._map[normalize_host(name)] = [ipaddress.ip_address(a) for a in items]

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        try:
            return list(self._map[normalize_host(host)])
        except (KeyError, ValueError):
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: unknown host") from None


class OverrideResolver:
    """Fixed names first (like an /etc/hosts for the proxy), then the system resolver."""

    def __init__(self, overrides: Mapping[str, str | Sequence[str]]) -> None:
        self._static = StaticResolver(overrides)
        self._names = {normalize_host(n) for n in overrides}
        self._system = SystemResolver()

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        if normalize_host(host) in self._names:
            return await self._static.resolve(host, port)
        return await self._system.resolve(host, port)


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    """Bounds on what one proxy socket accepts."""

    max_connections: int = 256
    """Connections handled at once; more are answered `503` and closed."""
    backlog: int = 1024
    """Listen backlog: a burst beyond it fails to connect (the forwarder answers `502`)."""
    max_header_bytes: int = 32 << 10
    header_timeout: float = 30.0
    """Seconds a client has to send its whole request head."""
    resolve_timeout: float = 10.0
    connect_timeout: float = 10.0
    """Seconds per upstream address attempt."""
    max_addresses: int = 4
    """Resolved addresses tried per request."""
    idle_timeout: float = 300.0
    """A connection with no bytes in either direction for this long is closed."""
    max_decisions: int = 512
    """Size of the `recent_decisions()` ring."""


@dataclass(frozen=True, slots=True)
class EgressDecision:
    """One request's outcome: `allowed` (connected), `refused` (policy or malformed request) or
    `failed` (allowed, but the name did not resolve or no address answered)."""

    time: float
    session_id: str
    method: str
    host: str
    port: int
    outcome: Literal["allowed", "refused", "failed"]
    reason: str
    address: str | None = None

    @property
    def allowed(self) -> bool:
        return self.outcome == "allowed"


class _Reject(Exception):
    """Ends a request with an HTTP error answer."""

    def __init__(self, status: int, phrase: str, message: str, *, recorded: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.phrase = phrase
        self.message = message
        self.recorded = recorded  # the decision is already in the log


class _UnixConnection(anyio.abc.ByteStream):
    """A client connection on the proxy socket, driven with `anyio.wait_readable/writable`.

    (anyio's own UNIX stream can log `InvalidStateError` when a receive is cancelled just as
    data arrives, which the relay does all the time.) Close it only once no task uses it."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        while True:
            try:
                data = self._sock.recv(max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._sock)
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError from exc
            if not data:
                raise anyio.EndOfStream
            return data

    async def send(self, item: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        view = memoryview(item)
        while view:
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                await anyio.wait_writable(self._sock)
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError from exc
            view = view[sent:]

    async def send_eof(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    async def aclose(self) -> None:
        self._sock.close()


async def _tcp_connector(ip: IPAddress, port: int) -> anyio.abc.ByteStream:
    return await anyio.connect_tcp(str(ip), port)


def _bind_unix_socket(path: Path, backlog: int) -> tuple[socket.socket, int]:
    """Bind a listening Unix socket at `path` with mode 0666, replacing a stale socket file;
    return it and the socket file's inode.

    Runs in a worker thread (filesystem calls). Paths longer than sun_path are bound through
    /proc/self/fd of their directory."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            msg = f"{path} exists and is not a socket"
            raise FileExistsError(msg)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with probe:
            probe.settimeout(1)
            try:
                _unix_call(probe.connect, path)
            except OSError:
                path.unlink(missing_ok=True)  # stale: nobody answers
            else:
                msg = f"another process already serves {path}"
                raise FileExistsError(msg)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _unix_call(sock.bind, path)
        path.chmod(0o666)
        sock.listen(backlog)
        inode = path.lstat().st_ino
    except BaseException:
        sock.close()
        raise
    return sock, inode


def _unix_call(fn: Callable[[str], object], path: Path) -> None:
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        fn(str(path))
        return
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        fn(f"/proc/self/fd/{dir_fd}/{path.name}")
    finally:
        os.close(dir_fd)


def _unlink_if_same(path: Path, inode: int) -> None:
    with contextlib.suppress(OSError):
        if path.lstat().st_ino == inode:
            path.unlink()


async def _aclose_quietly(*streams: anyio.abc.AsyncResource) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(2):
        for stream in streams:
            with contextlib.suppress(Exception):
                await stream.aclose()


async def _send_final(client: anyio.abc.ByteStream, answer: bytes) -> None:
    """Send a last answer, then drain (bounded) what the client still sends: closing a Unix
    socket with unread data resets it, and the client would lose the answer."""
    with anyio.move_on_after(3), contextlib.suppress(Exception):
        await client.send(answer)
        await client.send_eof()
        with anyio.move_on_after(1):
            drained = 0
            while drained < (1 << 20):
                drained += len(await client.receive(65536))


async def _read_head(stream: anyio.abc.ByteStream, limit: int) -> tuple[bytes, bytes]:
    """Read up to the blank line ending an HTTP head; return (head, bytes after it)."""
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if 0 <= end <= limit - 4:
            return bytes(buf[: end + 4]), bytes(buf[end + 4 :])
        if end >= 0 or len(buf) >= limit:
            raise _Reject(431, "Request Header Fields Too Large", "request head too large")
        buf += await stream.receive(65536)


def _parse_headers(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise _Reject(400, "Bad Request", "malformed header line")
        headers.append((name, value.strip(b" \t")))
    return headers


def _split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """Split `host[:port]` / `[v6][:port]`; raise _Reject on nonsense."""
    if authority.startswith("["):
        close = authority.find("]")
        host, rest = authority[: close + 1], authority[close + 1 :]
        if close < 0 or (rest and not rest.startswith(":")):
            raise _Reject(400, "Bad Request", f"malformed authority {authority[:80]!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep:
            host, port_text = authority, ""
    if not port_text:
        if default_port is None:
            raise _Reject(400, "Bad Request", "CONNECT needs host:port")
        return host, default_port
    if not port_text.isdigit() or len(port_text) > 5:
        raise _Reject(400, "Bad Request", f"malformed port in {authority[:80]!r}")
    if not host:
        raise _Reject(400, "Bad Request", "empty host")
    port = int(port_text)
    if not 0 < port < 65536:
        raise _Reject(400, "Bad Request", f"port {port} is out of range")
    return host, port


def _describe(exc: BaseException) -> str:
    # anyio wraps connect errors in a generic "All connection attempts failed".
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    return str(cause) or ("timed out" if isinstance(cause, TimeoutError) else type(cause).__name__)


def _printable(text: str, limit: int = 200) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])


def _answer(status: int, phrase: str, text: str) -> bytes:
    body = text.encode("utf-8", "replace")
    return (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1", "replace") + body


class EgressProxy:
    """Serves one session's egress policy on one Unix socket.

    How a session container gets out (the backend wires it: `proxy_env`, `CONTAINER_SOCKET_DIR`,
    `sandbox.forwarder`): the container runs with `network_mode="none"`; its session's socket
    directory is bind-mounted into it; a forwarder inside listens on `127.0.0.1:3128` and relays
    every TCP connection to the socket; `HTTP_PROXY` and friends point at the forwarder. This
    proxy is therefore the container's only way out, and it checks every destination twice: the
    policy's name rules before resolving (a limited policy never resolves a name it does not
    allow, so no DNS exfiltration beyond the allowed domains), then every resolved address
    (loopback, link-local/metadata, private ranges, the server host's own addresses...). It
    connects to exactly the address it checked, so DNS rebinding cannot swap in another one.

    Not enforced: TLS inside CONNECT is never inspected, so within an allowed host:port anything
    goes (paths, methods, other virtual hosts behind the same address); other protocols get out
    only if the client tunnels them through CONNECT to an allowed host and port; `*.domain`
    entries let the sandbox make DNS queries for any name under that domain (seen by its name
    servers); a public address that hairpins back to this host through NAT is not recognised as
    the host's own.

    Understands `CONNECT host:port` (a blind tunnel) and absolute-URI
    `http://` requests (forwarded as HTTP/1.1 with `Connection: close`, one request per client
    connection, response streamed). Refusals answer `403 Forbidden` with a one-paragraph text
    body naming the host and the reason, then close. Every decision is logged on `sandbox.egress`
    (INFO allowed, WARNING refused or failed) and kept in `recent_decisions()`.

    Run `serve()` in a task group you own; `aclose()` stops it and removes the socket file.
    """

    def __init__(
        self,
        socket_path: Path,
        policy: EgressPolicy,
        *,
        session_id: str,
        resolver: Resolver | None = None,
        connector: Connector | None = None,
        limits: ProxyLimits | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.session_id = session_id
        self._policy = policy
        self._resolver: Resolver = resolver or SystemResolver()
        self._connect: Connector = connector or _tcp_connector
        self.limits = limits or ProxyLimits()
        self._decisions: deque[EgressDecision] = deque(maxlen=self.limits.max_decisions)
        self._scope = anyio.CancelScope()
        self._stopped = anyio.Event()
        self._started = False
        self._serving = False
        self._closed = False
        self._active = 0
        self._rejecting = 0

    @property
    def policy(self) -> EgressPolicy:
        return self._policy

    @property
    def started(self) -> bool:
        """True once `serve()` has bound the socket and reported it."""
        return self._serving

    def update_policy(self, policy: EgressPolicy) -> None:
        """Apply `policy` to requests from now on; open tunnels are left alone."""
        self._policy = policy

    def recent_decisions(self) -> list[EgressDecision]:
        """The latest decisions, oldest first (bounded by `limits.max_decisions`)."""
        return list(self._decisions)

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[Path] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind the socket, report its path through `task_status`, serve until `aclose()` or
        cancellation, then remove the socket file. Can run once."""
        if self._started or self._closed:
            msg = "an EgressProxy serves only once"
            raise RuntimeError(msg)
        self._started = True
        try:
            listener, inode = await anyio.to_thread.run_sync(
                _bind_unix_socket, self.socket_path, self.limits.backlog
            )
        except BaseException:
            self._stopped.set()
            raise
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    self._serving = True
                    task_status.started(self.socket_path)
                    logger.debug("egress proxy for %s on %s", self.session_id, self.socket_path)
                    await self._accept_loop(listener, tg)
        finally:
            listener.close()
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await anyio.to_thread.run_sync(_unlink_if_same, self.socket_path, inode)
            self._stopped.set()

    async def aclose(self, timeout: float = 10.0) -> None:
        """Stop serving (open connections are cut) and wait, bounded, for the socket's removal."""
        self._closed = True
        self._scope.cancel()
        if self._started:
            with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
                await self._stopped.wait()

    async def _accept_loop(self, listener: socket.socket, tg: anyio.abc.TaskGroup) -> None:
        limit = self.limits.max_connections
        listener.setblocking(False)
        while True:
            await anyio.lowlevel.checkpoint()
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                await anyio.wait_readable(listener)
                continue
            except OSError as exc:
                # Out of descriptors and the like: back off instead of spinning.
                logger.warning("egress proxy %s: accept failed: %s", self.session_id, exc)
                await anyio.sleep(0.1)
                continue
            client = _UnixConnection(sock)
            if self._active < limit:
                self._active += 1
                tg.start_soon(self._serve_client, client)
            elif self._rejecting < limit:
                self._rejecting += 1
                tg.start_soon(self._reject_busy, client)
            else:
                await _aclose_quietly(client)

    async def _reject_busy(self, client: _UnixConnection) -> None:
        try:
            text = f"Egress proxy: more than {self.limits.max_connections} open connections.\n"
            await _send_final(client, _answer(503, "Service Unavailable", text))
        finally:
            self._rejecting -= 1
            await _aclose_quietly(client)

    async def _serve_client(self, client: _UnixConnection) -> None:
        try:
            await self._handle(client)
        except Exception:
            logger.exception("egress proxy %s: connection failed", self.session_id)
        finally:
            self._active -= 1
            await _aclose_quietly(client)

    async def _handle(self, client: _UnixConnection) -> None:
        limits = self.limits
        method, host, port = "-", "", 0
        try:
            try:
                with anyio.fail_after(limits.header_timeout):
                    head, rest = await _read_head(client, limits.max_header_bytes)
            except TimeoutError:
                raise _Reject(408, "Request Timeout", "no complete request head in time") from None
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return
            lines = head[:-4].split(b"\r\n")
            if any(_CONTROL.search(line) for line in lines):
                raise _Reject(400, "Bad Request", "control characters in the request head")
            parts = lines[0].split(b" ")
            if (
                len(parts) != 3
                or not _TOKEN.fullmatch(parts[0])
                or not parts[2].startswith(b"HTTP/1.")
            ):
                raise _Reject(400, "Bad Request", "malformed request line")
            try:
                method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
            except UnicodeDecodeError:
                raise _Reject(400, "Bad Request", "non-ASCII request target") from None
            headers = _parse_headers(lines[1:])
            if method == "CONNECT":
                host, port = _split_authority(target, None)
                upstream = await self._open_upstream(method, host, port)
                try:
                    await client.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    if rest:
                        await upstream.send(rest)
                    await self._relay(client, upstream, http=False)
                finally:
                    await _aclose_quietly(upstream)
                return
            scheme, sep, after = target.partition("://")
            if not sep:
                raise _Reject(
                    400,
                    "Bad Request",
                    "this is a forward proxy: send absolute-URI requests (http://host/...) or "
                    "CONNECT host:port",
                )
            if scheme.lower() != "http":
                raise _Reject(
                    400, "Bad Request", f"{scheme}:// is not proxied here; use CONNECT for TLS"
                )
            authority, slash, path = after.partition("/")
            authority, _, query = authority.partition("?")
            path = "/" + path if slash else ("/?" + query if query else "/")
            authority = authority.rpartition("@")[2]  # credentials in the URL are dropped
            host, port = _split_authority(authority, 80)
            upstream = await self._open_upstream(method, host, port)
            try:
                await upstream.send(self._request_head(method, path, authority, headers) + rest)
                await self._relay(client, upstream, http=True)
            finally:
                await _aclose_quietly(upstream)
        except _Reject as reject:
            if not reject.recorded:
                self._record(method, host, port, "refused", reject.message)
            text = f"Egress proxy: {reject.message}.\n"
            await _send_final(client, _answer(reject.status, reject.phrase, text))

    @staticmethod
    def _request_head(
        method: str, path: str, authority: str, headers: list[tuple[bytes, bytes]]
    ) -> bytes:
        listed = {
            token.strip().lower()
            for name, value in headers
            if name.lower() in (b"connection", b"proxy-connection")
            for token in value.split(b",")
        }
        out = [f"{method} {path} HTTP/1.1".encode("ascii"), b"Host: " + authority.encode("ascii")]
        out += [
            name + b": " + value
            for name, value in headers
            if name.lower() not in _HOP_BY_HOP and name.lower() not in listed
        ]
        out.append(b"Connection: close")
        return b"\r\n".join(out) + b"\r\n\r\n"

    async def _open_upstream(self, method: str, host: str, port: int) -> anyio.abc.ByteStream:
        """Check `host:port` against the policy, resolve it and connect to the first address
        that passes; record the decision. Raises _Reject (403 refused, 502 failed)."""
        policy = self._policy
        refusal = policy.destination_refusal(host, port)
        if refusal is not None:
            with contextlib.suppress(ValueError):
                host = normalize_host(host)
            self._refuse(method, host, port, refusal)
        literal = parse_ip_literal(host)
        name = str(literal) if literal is not None else normalize_host(host)
        if literal is not None:
            candidates: list[IPAddress] = [literal]
        else:
            try:
                with anyio.fail_after(self.limits.resolve_timeout):
                    candidates = await self._resolver.resolve(name, port)
            except (OSError, TimeoutError) as exc:
                reason = f"cannot resolve {name} ({_describe(exc)})"
                self._record(method, name, port, "failed", reason)
                raise _Reject(502, "Bad Gateway", reason, recorded=True) from None
        problems: list[str] = []
        failures: list[str] = []
        for ip in candidates[: self.limits.max_addresses]:
            problem = policy.address_refusal(ip) or own_address_problem(ip)
            if problem is not None:
                problems.append(problem)
                continue
            try:
                with anyio.fail_after(self.limits.connect_timeout):
                    upstream = await self._connect(ip, port)
            except (OSError, TimeoutError) as exc:
                failures.append(f"{ip}: {_describe(exc)}")
                continue
            note = f" (skipped: {'; '.join(problems)})" if problems else ""
            self._record(method, name, port, "allowed", "allowed" + note, ip)
            return upstream
        if failures:
            reason = f"cannot connect to {name}:{port} ({'; '.join(failures)})"
            self._record(method, name, port, "failed", reason)
            raise _Reject(502, "Bad Gateway", reason, recorded=True)
        if not problems:
            problems.append("it resolves to no address")
        resolved = (
            "" if literal is not None else f"{name} resolves to an address it may not reach: "
        )
        self._refuse(method, name, port, resolved + "; ".join(problems))
        raise AssertionError("unreachable")  # _refuse raises

    def _refuse(self, method: str, host: str, port: int, reason: str) -> None:
        self._record(method, host, port, "refused", reason)
        # The reason phrase carries the host too: clients that hide the body of a refused
        # CONNECT (pip, requests: "Tunnel connection failed: 403 ...") still show it.
        phrase = _printable(f"Forbidden (egress policy refused {host}:{port})")
        message = f"request to {host}:{port} refused: {reason}"
        raise _Reject(403, phrase, message, recorded=True)

    def _record(
        self,
        method: str,
        host: str,
        port: int,
        outcome: Literal["allowed", "refused", "failed"],
        reason: str,
        address: IPAddress | None = None,
    ) -> None:
        decision = EgressDecision(
            time=time.time(),
            session_id=self.session_id,
            method=method,
            host=host,
            port=port,
            outcome=outcome,
            reason=reason,
            address=None if address is None else str(address),
        )
        self._decisions.append(decision)
        level = logging.INFO if outcome == "allowed" else logging.WARNING
        logger.log(
            level,
            "egress %s: session=%s %s %s:%s ip=%s reason=%s",
            outcome,
            self.session_id,
            method,
            host,
            port,
            decision.address or "-",
            reason,
        )

    async def _relay(
        self, client: anyio.abc.ByteStream, upstream: anyio.abc.ByteStream, *, http: bool
    ) -> None:
        """Copy both ways until both sides are done (`http`: until the response ends), closing
        after `limits.idle_timeout` without traffic. End-of-stream is passed on as a half-close."""
        idle = self.limits.idle_timeout
        with anyio.CancelScope(deadline=anyio.current_time() + idle) as scope:

            async def pump(
                src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream, response: bool
            ) -> None:
                try:
                    if response and http:
                        head, rest = await _read_head(src, self.limits.max_header_bytes)
                        scope.deadline = anyio.current_time() + idle
                        await dst.send(_force_close(head) + rest)
                    while True:
                        data = await src.receive(65536)
                        scope.deadline = anyio.current_time() + idle
                        await dst.send(data)
                except anyio.EndOfStream:
                    if response and http:
                        scope.cancel()  # one request per connection: the response is complete
                        return
                    with contextlib.suppress(Exception):
                        await dst.send_eof()
                except (_Reject, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(pump, client, upstream, False)
                tg.start_soon(pump, upstream, client, True)


def _force_close(head: bytes) -> bytes:
    """A response head with its connection headers replaced by `Connection: close`."""
    lines = head[:-4].split(b"\r\n")
    kept = [
        line
        for line in lines[1:]
        if line.partition(b":")[0].strip().lower()
        not in (b"connection", b"keep-alive", b"proxy-connection")
    ]
    return b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n"


def session_dir_name(session_id: str) -> str:
    """The directory name for a session: the id itself when it is tame, else a hash of it."""
    if _SESSION_DIR.fullmatch(session_id) and session_id not in (".", ".."):
        return session_id
    return "s-" + hashlib.sha256(session_id.encode()).hexdigest()[:24]


def _prepare_root(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)


def _prepare_session_dir(path: Path) -> None:
    path.mkdir(exist_ok=True)
    path.chmod(0o755)


def _remove_session_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        (path / SOCKET_NAME).unlink(missing_ok=True)
        path.rmdir()


class EgressManager:
    """Runs one `EgressProxy` per session under `root`, in its own task group.

    Layout: `root/` (mode 0700) holds one directory per session (0755) holding `proxy.sock`
    (0666). Bind-mount the session's directory, not the socket file, at `CONTAINER_SOCKET_DIR`:
    a re-created socket (server restart) then shows up in a still-running container. On the host
    only root and the server's user can reach the sockets (through the 0700 root); inside a
    container, whatever uid it runs as can connect. Each container sees only its own session's
    directory. Leaving the manager removes the sockets but keeps the directories (running
    containers still mount them); `close()` removes a session's directory.

    Usage::

        async with EgressManager(home / "egress") as egress:
            sock = await egress.open("sesn_1", EgressPolicy.from_networking(networking))
            ... mount sock.parent at CONTAINER_SOCKET_DIR ...
            await egress.close("sesn_1")
    """

    def __init__(
        self,
        root: Path,
        *,
        resolver: Resolver | None = None,
        connector: Connector | None = None,
        limits: ProxyLimits | None = None,
    ) -> None:
        self.root = Path(root)
        self._resolver = resolver
        self._connector = connector
        self._limits = limits
        self._proxies: dict[str, EgressProxy] = {}
        self._lock = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None
        self._exit = contextlib.AsyncExitStack()

    async def __aenter__(self) -> EgressManager:
        await anyio.to_thread.run_sync(_prepare_root, self.root)
        async with contextlib.AsyncExitStack() as stack:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            # Proxies stop (and remove their sockets) when the manager is left.
            stack.callback(self._tg.cancel_scope.cancel)
            self._exit = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._tg = None
        self._proxies.clear()
        return await self._exit.__aexit__(exc_type, exc, tb)

    def socket_path(self, session_id: str) -> Path:
        """Where `open(session_id, ...)` puts the session's socket."""
        return self.root / session_dir_name(session_id) / SOCKET_NAME

    def proxy(self, session_id: str) -> EgressProxy | None:
        return self._proxies.get(session_id)

    async def open(self, session_id: str, policy: EgressPolicy) -> Path:
        """Serve `policy` for `session_id` and return its socket path (bind-mount its parent).

        Opening a session that is already open only replaces its policy."""
        if self._tg is None:
            msg = "EgressManager.open() outside `async with`"
            raise RuntimeError(msg)
        async with self._lock:
            proxy = self._proxies.get(session_id)
            if proxy is not None:
                proxy.update_policy(policy)
                return proxy.socket_path
            path = self.socket_path(session_id)
            await anyio.to_thread.run_sync(_prepare_session_dir, path.parent)
            proxy = EgressProxy(
                path,
                policy,
                session_id=session_id,
                resolver=self._resolver,
                connector=self._connector,
                limits=self._limits,
            )
            await self._tg.start(self._run, proxy)
            self._proxies[session_id] = proxy
            return path

    async def close(self, session_id: str) -> None:
        """Stop the session's proxy and remove its directory; unknown sessions are ignored."""
        async with self._lock:
            proxy = self._proxies.pop(session_id, None)
        if proxy is not None:
            await proxy.aclose()
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            path = self.socket_path(session_id).parent
            await anyio.to_thread.run_sync(_remove_session_dir, path)

    async def _run(
        self,
        proxy: EgressProxy,
        *,
        task_status: anyio.abc.TaskStatus[Path] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await proxy.serve(task_status=task_status)
        except Exception:
            if not proxy.started:
                raise
            # One broken proxy must not take the others (and the manager) down.
            logger.exception("egress proxy for %s stopped", proxy.session_id)
            if self._proxies.get(proxy.session_id) is proxy:
                del self._proxies[proxy.session_id]
