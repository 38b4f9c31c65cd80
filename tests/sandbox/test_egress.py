"""Egress control: policy rules, address classes, the proxy on loopback, and Docker end to end."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import secrets
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import pytest

from sandbox.egress import (
    CONTAINER_SOCKET_DIR,
    CONTAINER_SOCKET_PATH,
    PACKAGE_MANAGER_HOSTS,
    EgressDecision,
    EgressManager,
    EgressPolicy,
    EgressProxy,
    IPAddress,
    ProxyLimits,
    StaticResolver,
    SystemResolver,
    classify_address,
    own_address_problem,
    parse_ip_literal,
    proxy_env,
    session_dir_name,
)
from sandbox.forwarder import (
    CONTAINER_FORWARDER_PATH,
    FORWARDER_PATH,
    container_command,
    forwarder_command,
)
from tests.conftest import IMAGE

# Fake *public* addresses for the loopback tests: the test connector routes them to servers on
# 127.0.0.1 and refuses everything else, so no packet ever leaves the machine.
ALLOWED_IP = "1.2.3.4"
FORBIDDEN_IP = "1.2.3.5"
NAMES = {
    "allowed.test": ALLOWED_IP,
    "forbidden.test": FORBIDDEN_IP,
    "loopback.test": "127.0.0.1",
    "metadata.test": "169.254.169.254",
    "lan.test": "10.1.2.3",
    "mixed.test": ["127.0.0.1", ALLOWED_IP],
}


# --- policy rules -----------------------------------------------------------------------------

LIMITED = EgressPolicy.limited(["allowed.test", "*.example.com", "10.0.0.5"])


@pytest.mark.parametrize(
    ("policy", "host", "port", "allowed"),
    [
        (LIMITED, "allowed.test", 80, True),
        (LIMITED, "allowed.test", 443, True),
        (LIMITED, "ALLOWED.Test", 443, True),
        (LIMITED, "allowed.test.", 443, True),
        (LIMITED, "sub.allowed.test", 443, False),
        (LIMITED, "allowed.test.evil", 443, False),
        (LIMITED, "notallowed.test", 443, False),
        (LIMITED, "a.example.com", 443, True),
        (LIMITED, "a.b.EXAMPLE.com.", 443, True),
        (LIMITED, "example.com", 443, False),
        (LIMITED, "badexample.com", 443, False),
        (LIMITED, "10.0.0.5", 80, True),
        (LIMITED, "167772165", 80, True),  # 10.0.0.5 in inet_aton's decimal form
        (LIMITED, "10.0.0.6", 80, False),
        (LIMITED, "010.0.0.5", 80, False),  # octal: 8.0.0.5
        (LIMITED, "[::1]", 443, False),
        (LIMITED, "allowed.test", 22, False),
        (LIMITED, "allowed.test", 8080, False),
        (LIMITED, "bad host", 443, False),
        (LIMITED, "", 443, False),
        (LIMITED, "exa..mple.com", 443, False),
        (LIMITED, "ällowed.test", 443, False),
        (EgressPolicy.limited([]), "allowed.test", 443, False),
        (EgressPolicy.limited([]), "pypi.org", 443, False),
        (EgressPolicy.limited([], allow_package_managers=True), "pypi.org", 443, True),
        (
            EgressPolicy.limited([], allow_package_managers=True),
            "files.pythonhosted.org",
            443,
            True,
        ),
        (EgressPolicy.limited([], allow_package_managers=True), "registry.npmjs.org", 443, True),
        (EgressPolicy.limited([], allow_package_managers=True), "evil.pypi.org", 443, False),
        (EgressPolicy.limited([], allow_package_managers=True), "github.com", 443, False),
        (
            EgressPolicy.limited([], mcp_server_hosts=["mcp.example.net"]),
            "mcp.example.net",
            443,
            False,
        ),
        (
            EgressPolicy.limited([], allow_mcp_servers=True, mcp_server_hosts=["mcp.example.net"]),
            "MCP.example.net",
            443,
            True,
        ),
        (EgressPolicy.limited(["allowed.test"], allowed_ports=None), "allowed.test", 8080, True),
        (EgressPolicy.limited(["allowed.test"], allowed_ports=[8443]), "allowed.test", 8443, True),
        (EgressPolicy.limited(["allowed.test"], allowed_ports=[8443]), "allowed.test", 443, False),
        (EgressPolicy.unrestricted(), "anything.example", 443, True),
        (EgressPolicy.unrestricted(), "8.8.8.8", 443, True),
        (EgressPolicy.unrestricted(), "anything.example", 22, False),
        (EgressPolicy.unrestricted(allowed_ports=None), "anything.example", 22, True),
    ],
)
def test_destination_rules(policy: EgressPolicy, host: str, port: int, allowed: bool) -> None:
    assert policy.allows(host, port) is allowed


def test_refusal_reasons_name_the_rule() -> None:
    assert "not in this environment's allowed_hosts" in (
        LIMITED.destination_refusal("nope.test", 443) or ""
    )
    assert "raw IP address" in (LIMITED.destination_refusal("10.9.9.9", 443) or "")
    assert (
        LIMITED.destination_refusal("allowed.test", 22)
        == "port 22 is not allowed (allowed ports: 80, 443)"
    )


def test_from_networking() -> None:
    assert EgressPolicy.from_networking({"type": "unrestricted"}).mode == "unrestricted"
    assert EgressPolicy.from_networking({}).mode == "unrestricted"
    policy = EgressPolicy.from_networking(
        {
            "type": "limited",
            "allowed_hosts": ["API.example.com", "*.corp.test"],
            "allow_package_managers": True,
            "allow_mcp_servers": True,
        },
        mcp_server_hosts=["mcp.example.net"],
    )
    assert policy.mode == "limited"
    assert policy.allows("api.example.com", 443)
    assert policy.allows("git.corp.test", 443)
    assert policy.allows("crates.io", 443)
    assert policy.allows("mcp.example.net", 443)
    assert not policy.allows("corp.test", 443)
    assert not EgressPolicy.from_networking({"type": "limited", "allowed_hosts": []}).allows(
        "pypi.org", 443
    )
    assert EgressPolicy.from_networking({"type": "limited"}) == EgressPolicy.limited([])
    with pytest.raises(ValueError, match="unknown networking type"):
        EgressPolicy.from_networking({"type": "cloud"})
    with pytest.raises(ValueError, match="allowed_hosts"):
        EgressPolicy.from_networking({"type": "limited", "allowed_hosts": "a.test"})
    with pytest.raises(ValueError, match="not a valid host name"):
        EgressPolicy.limited(["bad host"])


def test_package_manager_list_is_plain_names() -> None:
    for host in ("pypi.org", "files.pythonhosted.org", "registry.npmjs.org", "deb.debian.org"):
        assert host in PACKAGE_MANAGER_HOSTS
    for host in ("security.debian.org", "crates.io", "static.crates.io", "index.crates.io"):
        assert host in PACKAGE_MANAGER_HOSTS
    for host in ("rubygems.org", "proxy.golang.org", "sum.golang.org"):
        assert host in PACKAGE_MANAGER_HOSTS
    assert all("*" not in h and h == h.lower() for h in PACKAGE_MANAGER_HOSTS)


# --- address classes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("8.8.8.8", "public"),
        ("2606:4700:4700::1111", "public"),
        ("172.32.0.1", "public"),
        ("127.0.0.1", "loopback"),
        ("127.255.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),  # CGNAT
        ("fd00::1", "private"),  # ULA
        ("fec0::1", "private"),  # site-local
        ("192.0.2.1", "private"),  # documentation: not global
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%2", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "reserved"),
        ("240.0.0.1", "reserved"),
        ("0.1.2.3", "reserved"),
        ("::ffff:127.0.0.1", "loopback"),  # v4-mapped
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "metadata"),
        ("::ffff:8.8.8.8", "public"),
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("64:ff9b::808:808", "public"),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("::7f00:1", "reserved"),  # IPv4-compatible
        ("2001::1", "reserved"),  # Teredo
    ],
)
def test_classify_address(address: str, kind: str) -> None:
    assert classify_address(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize(
    ("address", "unrestricted", "limited"),
    [
        ("8.8.8.8", True, True),
        ("10.1.2.3", False, True),
        ("fd00::1", False, True),
        ("100.64.0.1", False, True),
        ("127.0.0.1", False, False),
        ("::ffff:127.0.0.1", False, False),
        ("169.254.169.254", False, False),
        ("fe80::1", False, False),
        ("0.0.0.0", False, False),
        ("224.0.0.1", False, False),
    ],
)
def test_address_verdicts(address: str, unrestricted: bool, limited: bool) -> None:
    ip = ipaddress.ip_address(address)
    assert (EgressPolicy.unrestricted().address_refusal(ip) is None) is unrestricted
    assert (LIMITED.address_refusal(ip) is None) is limited


def test_own_addresses_are_detected() -> None:
    assert own_address_problem(ipaddress.ip_address("127.0.0.1")) is not None
    assert own_address_problem(ipaddress.ip_address("198.51.100.7")) is None


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("10.0.0.5", "10.0.0.5"),
        ("[::1]", "::1"),
        ("2130706433", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("allowed.test", None),
        ("1.2.3.4.5", None),
        ("1.2.3.4 x", None),
    ],
)
def test_parse_ip_literal(text: str, address: str | None) -> None:
    parsed = parse_ip_literal(text)
    assert (None if parsed is None else str(parsed)) == address


@pytest.mark.asyncio
async def test_resolvers() -> None:
    static = StaticResolver(NAMES)
    assert [str(a) for a in await static.resolve("MIXED.test.", 80)] == ["127.0.0.1", ALLOWED_IP]
    with pytest.raises(OSError, match="unknown host"):
        await static.resolve("other.test", 80)
    with anyio.fail_after(10):
        found = await SystemResolver().resolve("localhost", 80)
    assert ipaddress.ip_address("127.0.0.1") in found or ipaddress.ip_address("::1") in found


# --- the proxy on loopback --------------------------------------------------------------------


@dataclass
class World:
    """A proxy on a temp socket whose upstreams are loopback servers behind fake public IPs."""

    proxy: EgressProxy
    seen: list[bytes]
    """Request heads the upstream servers received."""
    connects: list[tuple[str, int]] = field(default_factory=list)

    async def exchange(self, request: bytes, *, eof: bool = False) -> bytes:
        """Send `request` on a fresh connection and read the whole answer."""
        with anyio.fail_after(10):
            async with await anyio.connect_unix(self.proxy.socket_path) as stream:
                await stream.send(request)
                if eof:
                    await stream.send_eof()
                return await read_all(stream)

    async def tunnel(self, target: str) -> tuple[anyio.abc.SocketStream, bytes]:
        """CONNECT to `target`; return the stream and the proxy's answer head."""
        stream = await anyio.connect_unix(self.proxy.socket_path)
        await stream.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = b""
        with anyio.fail_after(10):
            while b"\r\n\r\n" not in head:
                head += await stream.receive()
        return stream, head


async def read_all(stream: anyio.abc.ByteStream) -> bytes:
    data = b""
    with contextlib.suppress(anyio.EndOfStream):
        while True:
            data += await stream.receive()
    return data


async def _http_upstream(name: str, seen: list[bytes], stream: anyio.abc.SocketStream) -> None:
    """Answer one request with its own head as the body (or `/eof`: read to EOF first)."""
    async with stream:
        data = b""
        with contextlib.suppress(anyio.EndOfStream):
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
            head = data.split(b"\r\n\r\n")[0]
            seen.append(head)
            if b" /eof " in head.split(b"\r\n")[0]:
                while True:
                    data += await stream.receive()
        body = b"from " + name.encode() + b"\n" + data
        await stream.send(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: keep-alive\r\n"
            b"Keep-Alive: timeout=5\r\n\r\n%s" % (len(body), body)
        )


@contextlib.asynccontextmanager
async def proxy_world(
    tmp_path: Path, policy: EgressPolicy, *, limits: ProxyLimits | None = None
) -> AsyncIterator[World]:
    seen: list[bytes] = []
    routes: dict[tuple[str, int], int] = {}
    listeners: list[anyio.abc.Listener[anyio.abc.SocketStream]] = []
    async with anyio.create_task_group() as tg:
        for name, ip in (("allowed", ALLOWED_IP), ("forbidden", FORBIDDEN_IP)):
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            listeners.append(listener)
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            routes[(ip, 80)] = routes[(ip, 443)] = port

            async def handle(stream: anyio.abc.SocketStream, name: str = name) -> None:
                await _http_upstream(name, seen, stream)

            tg.start_soon(listener.serve, handle)
        world: World

        async def connector(ip: IPAddress, port: int) -> anyio.abc.ByteStream:
            world.connects.append((str(ip), port))
            target = routes.get((str(ip), port))
            if target is None:
                raise ConnectionRefusedError(f"test connector: no route to {ip}:{port}")
            return await anyio.connect_tcp("127.0.0.1", target)

        proxy = EgressProxy(
            tmp_path / "egress.sock",
            policy,
            session_id="sesn_test",
            resolver=StaticResolver(NAMES),
            connector=connector,
            limits=limits,
        )
        world = World(proxy=proxy, seen=seen)
        await tg.start(proxy.serve)
        try:
            yield world
        finally:
            await proxy.aclose()
            tg.cancel_scope.cancel()
    for listener in listeners:
        await listener.aclose()
    assert not (tmp_path / "egress.sock").exists()


@pytest.mark.asyncio
async def test_plain_http_allowed_is_forwarded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sandbox.egress")
    async with proxy_world(tmp_path, EgressPolicy.limited(["allowed.test"])) as world:
        answer = await world.exchange(
            b"GET http://allowed.test/path?q=1 HTTP/1.1\r\nHost: forbidden.test\r\n"
            b"Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\n"
            b"Connection: X-Secret\r\nX-Secret: 1\r\nAccept: */*\r\n\r\n"
        )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    # Whatever the upstream says, the client is told the connection ends with this response.
    assert b"\r\nConnection: close" in head
    assert b"keep-alive" not in head.lower()
    assert body.startswith(b"from allowed\n")
    upstream_head = world.seen[0].decode()
    assert upstream_head.splitlines() == [
        "GET /path?q=1 HTTP/1.1",
        "Host: allowed.test",
        "Accept: */*",
        "Connection: close",
    ]
    assert world.connects == [(ALLOWED_IP, 80)]
    [decision] = world.proxy.recent_decisions()
    assert decision.allowed
    assert (decision.method, decision.host, decision.port, decision.address) == (
        "GET",
        "allowed.test",
        80,
        ALLOWED_IP,
    )
    assert decision.session_id == "sesn_test"
    [record] = [r for r in caplog.records if r.name == "sandbox.egress"]
    assert record.levelno == logging.INFO
    assert "session=sesn_test" in record.getMessage()
    assert f"ip={ALLOWED_IP}" in record.getMessage()


@pytest.mark.asyncio
async def test_plain_http_refused_gets_a_readable_403(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with proxy_world(tmp_path, EgressPolicy.limited(["allowed.test"])) as world:
        answer = await world.exchange(
            b"POST http://forbidden.test/upload HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789"
        )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden (egress policy refused forbidden.test:80)")
    assert b"Connection: close" in head
    assert body.decode() == (
        "Egress proxy: request to forbidden.test:80 refused: forbidden.test is not in this "
        "environment's allowed_hosts (networking: limited).\n"
    )
    assert world.connects == []  # refused before resolving, let alone connecting
    [decision] = world.proxy.recent_decisions()
    assert (decision.outcome, decision.method, decision.host) == (
        "refused",
        "POST",
        "forbidden.test",
    )
    [record] = [r for r in caplog.records if r.name == "sandbox.egress"]
    assert record.levelno == logging.WARNING
    assert "forbidden.test:80" in record.getMessage()


@pytest.mark.asyncio
async def test_connect_allowed_tunnels_with_half_close(tmp_path: Path) -> None:
    async with proxy_world(tmp_path, EgressPolicy.limited(["allowed.test"])) as world:
        stream, head = await world.tunnel("allowed.test:443")
        async with stream:
            assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
            # /eof makes the upstream read until our half-close before it answers.
            await stream.send(b"GET /eof HTTP/1.1\r\nHost: allowed.test\r\n\r\nbody-bytes")
            await stream.send_eof()
            with anyio.fail_after(10):
                answer = await read_all(stream)
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert answer.endswith(b"body-bytes")
    assert world.connects == [(ALLOWED_IP, 443)]
    assert world.proxy.recent_decisions()[0].method == "CONNECT"


@pytest.mark.asyncio
async def test_connect_refused(tmp_path: Path) -> None:
    async with proxy_world(tmp_path, EgressPolicy.limited(["allowed.test"])) as world:
        answer = await world.exchange(b"CONNECT forbidden.test:443 HTTP/1.1\r\n\r\n")
        port_answer = await world.exchange(b"CONNECT allowed.test:22 HTTP/1.1\r\n\r\n")
        ip_answer = await world.exchange(f"CONNECT {ALLOWED_IP}:443 HTTP/1.1\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 403 Forbidden (egress policy refused forbidden.test:443)")
    assert b"forbidden.test is not in this environment's allowed_hosts" in answer
    assert b"port 22 is not allowed" in port_answer
    assert b"1.2.3.4 is a raw IP address" in ip_answer
    assert world.connects == []
    assert [d.outcome for d in world.proxy.recent_decisions()] == ["refused"] * 3


@pytest.mark.asyncio
async def test_resolved_addresses_are_checked(tmp_path: Path) -> None:
    policy = EgressPolicy.limited(["loopback.test", "metadata.test", "lan.test", "mixed.test"])
    async with proxy_world(tmp_path, policy) as world:
        loopback = await world.exchange(b"GET http://loopback.test/ HTTP/1.1\r\n\r\n")
        metadata = await world.exchange(b"CONNECT metadata.test:80 HTTP/1.1\r\n\r\n")
        mixed = await world.exchange(b"GET http://mixed.test/ HTTP/1.1\r\n\r\n")
        lan = await world.exchange(b"GET http://lan.test/ HTTP/1.1\r\n\r\n")
    assert loopback.startswith(b"HTTP/1.1 403")
    assert b"loopback.test resolves to an address it may not reach: 127.0.0.1 is a loopback" in (
        loopback
    )
    assert b"169.254.169.254 is a cloud metadata address" in metadata
    # One bad address is skipped, the good one is used (and only it is ever connected to).
    assert mixed.startswith(b"HTTP/1.1 200 OK")
    # A private address is fine for a listed name; here nothing answers there.
    assert lan.startswith(b"HTTP/1.1 502 Bad Gateway")
    assert world.connects == [(ALLOWED_IP, 80), ("10.1.2.3", 80)]
    decisions = world.proxy.recent_decisions()
    assert [d.outcome for d in decisions] == ["refused", "refused", "allowed", "failed"]
    assert "skipped: 127.0.0.1 is a loopback address" in decisions[2].reason


@pytest.mark.asyncio
async def test_unrestricted_refuses_private_and_loopback(tmp_path: Path) -> None:
    async with proxy_world(tmp_path, EgressPolicy.unrestricted()) as world:
        public = await world.exchange(b"GET http://forbidden.test/ HTTP/1.1\r\n\r\n")
        stream, raw_public = await world.tunnel(f"{ALLOWED_IP}:443")
        await stream.aclose()
        lan = await world.exchange(b"GET http://lan.test/ HTTP/1.1\r\n\r\n")
        loopback = await world.exchange(b"GET http://127.0.0.1/ HTTP/1.1\r\n\r\n")
        decimal = await world.exchange(b"GET http://2130706433/ HTTP/1.1\r\n\r\n")
        mapped = await world.exchange(b"CONNECT [::ffff:127.0.0.1]:443 HTTP/1.1\r\n\r\n")
        metadata = await world.exchange(b"GET http://169.254.169.254/latest HTTP/1.1\r\n\r\n")
        unknown = await world.exchange(b"GET http://nowhere.test/ HTTP/1.1\r\n\r\n")
    assert public.startswith(b"HTTP/1.1 200 OK")
    assert b"from forbidden" in public
    assert raw_public.startswith(b"HTTP/1.1 200 Connection established")
    assert b"10.1.2.3 is a private address" in lan
    assert b"127.0.0.1 is a loopback address" in loopback
    assert b"127.0.0.1 is a loopback address" in decimal
    assert b"loopback address" in mapped
    assert b"cloud metadata address" in metadata
    assert unknown.startswith(b"HTTP/1.1 502 Bad Gateway")
    assert b"cannot resolve nowhere.test" in unknown
    assert world.connects == [(FORBIDDEN_IP, 80), (ALLOWED_IP, 443)]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n", b"400"),  # not a proxy request
        (b"GET https://allowed.test/ HTTP/1.1\r\n\r\n", b"400"),
        (b"GET ftp://allowed.test/ HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT allowed.test HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT allowed.test:99999 HTTP/1.1\r\n\r\n", b"400"),
        (b"GET http://allowed.test/ HTTP/2\r\n\r\n", b"400"),
        (b"GET http://allowed.test/a\rb HTTP/1.1\r\n\r\n", b"400"),
        (b"GET http://allowed.test/ HTTP/1.1\r\n folded\r\n\r\n", b"400"),
        (b"GET http://allowed.test/ HTTP/1.1\r\nX: " + b"a" * 40000 + b"\r\n\r\n", b"431"),
    ],
)
async def test_malformed_requests(tmp_path: Path, request_bytes: bytes, status: bytes) -> None:
    async with proxy_world(tmp_path, EgressPolicy.limited(["allowed.test"])) as world:
        answer = await world.exchange(request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert world.connects == []
    assert [d.outcome for d in world.proxy.recent_decisions()] == ["refused"]


@pytest.mark.asyncio
async def test_update_policy_applies_to_new_requests(tmp_path: Path) -> None:
    async with proxy_world(tmp_path, EgressPolicy.limited([])) as world:
        before = await world.exchange(b"GET http://allowed.test/ HTTP/1.1\r\n\r\n")
        world.proxy.update_policy(EgressPolicy.limited(["allowed.test"]))
        after = await world.exchange(b"GET http://allowed.test/ HTTP/1.1\r\n\r\n")
    assert before.startswith(b"HTTP/1.1 403")
    assert after.startswith(b"HTTP/1.1 200")


@pytest.mark.asyncio
async def test_header_timeout(tmp_path: Path) -> None:
    limits = ProxyLimits(header_timeout=0.2)
    policy = EgressPolicy.limited(["allowed.test"])
    async with proxy_world(tmp_path, policy, limits=limits) as world:
        slow = await world.exchange(b"GET http://allowed.test/ HTTP/1.1\r\n")  # never finishes
    assert slow.startswith(b"HTTP/1.1 408")


@pytest.mark.asyncio
async def test_connection_limit(tmp_path: Path) -> None:
    limits = ProxyLimits(max_connections=1)
    policy = EgressPolicy.limited(["allowed.test"])
    async with proxy_world(tmp_path, policy, limits=limits) as world:
        stream, head = await world.tunnel("allowed.test:443")
        async with stream:
            assert b" 200 " in head
            busy = await world.exchange(b"GET http://allowed.test/ HTTP/1.1\r\n\r\n")
        assert busy.startswith(b"HTTP/1.1 503")
        assert b"more than 1 open connections" in busy
        # Once the tunnel is gone (its handler finishes a moment after our close), a new
        # request goes through.
        with anyio.fail_after(5):
            while world.proxy.recent_decisions()[-1].method != "GET":
                await world.exchange(b"GET http://allowed.test/ HTTP/1.1\r\n\r\n")


@pytest.mark.asyncio
async def test_idle_tunnels_are_cut(tmp_path: Path) -> None:
    limits = ProxyLimits(idle_timeout=0.2)
    policy = EgressPolicy.limited(["allowed.test"])
    async with proxy_world(tmp_path, policy, limits=limits) as world:
        stream, head = await world.tunnel("allowed.test:443")
        async with stream:
            assert b" 200 " in head
            with anyio.fail_after(5):
                assert await read_all(stream) == b""


@pytest.mark.asyncio
async def test_decision_ring_is_bounded(tmp_path: Path) -> None:
    limits = ProxyLimits(max_decisions=3)
    async with proxy_world(tmp_path, EgressPolicy.limited([]), limits=limits) as world:
        for i in range(5):
            await world.exchange(f"CONNECT host{i}.test:443 HTTP/1.1\r\n\r\n".encode())
    assert [d.host for d in world.proxy.recent_decisions()] == [f"host{i}.test" for i in (2, 3, 4)]
    assert all(isinstance(d, EgressDecision) for d in world.proxy.recent_decisions())


@pytest.mark.asyncio
async def test_socket_file_modes_and_long_paths(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    path = deep / "proxy.sock"
    assert len(os.fsencode(path)) > 108
    proxy = EgressProxy(path, EgressPolicy.limited([]), session_id="s")
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o666
        client = socket.socket(socket.AF_UNIX)
        dir_fd = os.open(deep, os.O_PATH | os.O_DIRECTORY)
        try:
            await anyio.to_thread.run_sync(client.connect, f"/proc/self/fd/{dir_fd}/proxy.sock")
            stream = await anyio.abc.SocketStream.from_socket(client)
        finally:
            os.close(dir_fd)
        async with stream:
            await stream.send(b"CONNECT a.test:443 HTTP/1.1\r\n\r\n")
            with anyio.fail_after(5):
                assert (await read_all(stream)).startswith(b"HTTP/1.1 403")
        await proxy.aclose()
    assert not path.exists()


@pytest.mark.asyncio
async def test_stale_socket_is_replaced_but_a_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "proxy.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # leaves the file, nobody listening
    first = EgressProxy(path, EgressPolicy.limited([]), session_id="a")
    second = EgressProxy(path, EgressPolicy.limited([]), session_id="b")
    async with anyio.create_task_group() as tg:
        await tg.start(first.serve)
        with pytest.raises(FileExistsError, match="another process already serves"):
            await second.serve()
        await first.aclose()
    assert not path.exists()


@pytest.mark.asyncio
async def test_manager_layout_and_lifecycle(tmp_path: Path) -> None:
    root = tmp_path / "egress"
    async with EgressManager(root, resolver=StaticResolver(NAMES)) as manager:
        one = await manager.open("sesn_one", EgressPolicy.limited([]))
        two = await manager.open("weird/../id", EgressPolicy.unrestricted())
        assert one == root / "sesn_one" / "proxy.sock"
        assert two.parent.name == session_dir_name("weird/../id")
        assert two.parent.name.startswith("s-")
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert stat.S_IMODE(one.parent.stat().st_mode) == 0o755
        assert stat.S_IMODE(one.stat().st_mode) == 0o666
        # Re-opening swaps the policy on the same socket.
        again = await manager.open("sesn_one", EgressPolicy.limited(["allowed.test"]))
        assert again == one
        proxy = manager.proxy("sesn_one")
        assert proxy is not None
        assert proxy.policy.allows("allowed.test", 443)
        async with await anyio.connect_unix(one) as stream:
            await stream.send(b"CONNECT forbidden.test:443 HTTP/1.1\r\n\r\n")
            with anyio.fail_after(5):
                assert b"forbidden.test is not in" in await read_all(stream)
        await manager.close("weird/../id")
        assert not two.parent.exists()
        await manager.close("never-opened")
    # Leaving removes sockets, keeps directories (a running container still mounts them).
    assert one.parent.is_dir()
    assert not one.exists()


# --- the forwarder on loopback ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def forwarder_process(socket_path: Path) -> AsyncIterator[int]:
    """Run the forwarder script on the host; yield the TCP port it listens on."""
    process = await anyio.open_process(
        [sys.executable, "-I", "-S", str(FORWARDER_PATH), str(socket_path), "127.0.0.1:0"]
    )
    try:
        assert process.stderr is not None
        line = b""
        with anyio.fail_after(10):
            while b"\n" not in line:
                line += await process.stderr.receive()
        match = re.search(rb"127\.0\.0\.1:(\d+) -> ", line)
        assert match, line
        yield int(match.group(1))
    finally:
        with anyio.CancelScope(shield=True):
            process.terminate()
            with anyio.move_on_after(5):
                await process.wait()
            await process.aclose()


@pytest.mark.asyncio
async def test_forwarder_relays_to_the_proxy(tmp_path: Path) -> None:
    async with (
        proxy_world(tmp_path, EgressPolicy.limited(["allowed.test"])) as world,
        forwarder_process(world.proxy.socket_path) as port,
    ):
        with anyio.fail_after(10):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"GET http://allowed.test/x HTTP/1.1\r\n\r\n")
                allowed = await read_all(stream)
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"GET http://forbidden.test/x HTTP/1.1\r\n\r\n")
                refused = await read_all(stream)
            # Half-close travels through both hops: upstream answers only after our EOF.
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                payload = secrets.token_bytes(1 << 20)
                await stream.send(b"CONNECT allowed.test:443 HTTP/1.1\r\n\r\n")
                await stream.send(b"GET /eof HTTP/1.1\r\n\r\n" + payload)
                await stream.send_eof()
                tunnelled = await read_all(stream)
    assert allowed.startswith(b"HTTP/1.1 200 OK")
    assert refused.startswith(b"HTTP/1.1 403")
    assert b"forbidden.test is not in" in refused
    assert tunnelled.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 OK")
    assert tunnelled.endswith(payload)


@pytest.mark.asyncio
async def test_forwarder_without_proxy_answers_502(tmp_path: Path) -> None:
    async with forwarder_process(tmp_path / "missing.sock") as port:
        with anyio.fail_after(10):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"GET http://allowed.test/ HTTP/1.1\r\n\r\n")
                answer = await read_all(stream)
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway")
    assert b"Egress proxy unavailable" in answer


def test_wiring_helpers() -> None:
    env = proxy_env()
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        assert env[key] == "http://127.0.0.1:3128"
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1"
    assert forwarder_command(CONTAINER_SOCKET_PATH) == [
        "python3",
        "-I",
        "-S",
        CONTAINER_FORWARDER_PATH,
        CONTAINER_SOCKET_PATH,
        "127.0.0.1:3128",
    ]
    command = container_command(CONTAINER_SOCKET_PATH)
    assert command[:2] == ["sh", "-c"]
    assert command[4:] == forwarder_command(CONTAINER_SOCKET_PATH)
    assert FORWARDER_PATH.is_file()
    source = FORWARDER_PATH.read_text()
    assert "from sandbox" not in source
    assert "import sandbox" not in source


# --- end to end in Docker ---------------------------------------------------------------------

SESSION = "sesn_e2e"


@dataclass
class Lab:
    """An internal network with two web servers, and a network-less sandbox wired to egress."""

    client: Any
    sandbox: Any
    root: Path
    allowed_ip: str
    forbidden_ip: str
    gateway_ip: str
    big_sha256: str

    def resolver(self) -> StaticResolver:
        return StaticResolver(
            {
                "allowed.test": self.allowed_ip,
                "forbidden.test": self.forbidden_ip,
                "loopback.test": "127.0.0.1",
                "metadata.test": "169.254.169.254",
                "gateway.test": self.gateway_ip,
            }
        )

    async def sh(self, script: str, *, user: str = "1000:1000") -> tuple[int, str]:
        """Run `script` with bash in the sandbox; return (exit code, merged output)."""

        def run() -> tuple[int, str]:
            code, output = self.sandbox.exec_run(["bash", "-c", script], user=user)
            return int(code), output.decode(errors="replace")

        with anyio.fail_after(60):
            return await anyio.to_thread.run_sync(run)


def _wait_for_port(host: str, port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def lab(docker_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    import docker
    import docker.errors
    from docker.types import Mount

    client = docker.from_env(timeout=60)
    run = secrets.token_hex(4)
    labels = {"managed-agents-mcp.test": "egress", "managed-agents-mcp.test.run": run}
    selector: dict[str, str | list[str] | bool] = {"label": f"managed-agents-mcp.test.run={run}"}
    root = tmp_path_factory.mktemp("egress-e2e") / "egress"
    root.mkdir(mode=0o700)
    session_dir = root / session_dir_name(SESSION)
    session_dir.mkdir()
    session_dir.chmod(0o755)
    try:
        network = client.networks.create(
            f"ma-egress-{run}", driver="bridge", internal=True, labels=labels
        )
        servers = {}
        for name in ("allowed", "forbidden"):
            script = (
                f"mkdir -p /srv && echo 'hello from {name}' > /srv/index.html && "
                "head -c 3000000 /dev/urandom > /srv/big && cd /srv && "
                "exec python3 -m http.server 80"
            )
            servers[name] = client.containers.run(
                IMAGE,
                ["sh", "-c", script],
                name=f"ma-egress-{name}-{run}",
                user="0",
                network=network.name,
                labels=labels,
                detach=True,
            )
        sandbox = client.containers.run(
            IMAGE,
            container_command(CONTAINER_SOCKET_PATH),
            name=f"ma-egress-sandbox-{run}",
            user="1000:1000",
            network_mode="none",
            read_only=True,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            init=True,
            environment=proxy_env(),
            mounts=[
                Mount(CONTAINER_SOCKET_DIR, str(session_dir), type="bind", read_only=True),
                Mount(CONTAINER_FORWARDER_PATH, str(FORWARDER_PATH), type="bind", read_only=True),
            ],
            tmpfs={"/tmp": "rw,nosuid,nodev,size=64m,mode=1777"},
            labels=labels,
            detach=True,
        )
        ips = {}
        for name, container in servers.items():
            container.reload()
            ips[name] = container.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"]
            # The host reaches containers on a bridge directly (no published ports needed).
            _wait_for_port(ips[name], 80)
        network.reload()
        gateway = network.attrs["IPAM"]["Config"][0]["Gateway"]
        code, big = servers["allowed"].exec_run(["sha256sum", "/srv/big"])
        assert code == 0
        code, output = sandbox.exec_run(
            [
                "bash",
                "-c",
                "for i in $(seq 100); do (: </dev/tcp/127.0.0.1/3128) 2>/dev/null && exit 0; "
                "sleep 0.1; done; exit 1",
            ]
        )
        assert code == 0, sandbox.logs().decode()
        yield Lab(
            client=client,
            sandbox=sandbox,
            root=root,
            allowed_ip=ips["allowed"],
            forbidden_ip=ips["forbidden"],
            gateway_ip=gateway,
            big_sha256=big.decode().split()[0],
        )
    finally:
        for container in client.containers.list(all=True, filters=selector):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
        for network in client.networks.list(filters=selector):
            with contextlib.suppress(docker.errors.NotFound):
                network.remove()
        client.close()


@contextlib.asynccontextmanager
async def egress_for(lab: Lab, policy: EgressPolicy) -> AsyncIterator[EgressProxy]:
    async with EgressManager(lab.root, resolver=lab.resolver()) as manager:
        await manager.open(SESSION, policy)
        proxy = manager.proxy(SESSION)
        assert proxy is not None
        yield proxy


CURL = "curl -sS -m 20 -i "


@pytest.mark.docker
@pytest.mark.asyncio
async def test_e2e_sandbox_has_no_network_of_its_own(lab: Lab) -> None:
    async with egress_for(lab, EgressPolicy.limited(["allowed.test"])):
        # One `key=value` line each, all on stdout: docker does not keep stdout and stderr in
        # order relative to each other.
        code, output = await lab.sh(
            f"echo \"direct=$(curl -sS -m 5 --noproxy '*' http://{lab.allowed_ip}/ 2>&1)\"; "
            'echo "dns=$(getent hosts allowed.test || echo none)"; '
            'echo "socket_dir=$(ls -A /run/managed-agents/egress)"; '
            'echo "uid=$(id -u)"; echo "routes=$(wc -l < /proc/net/route)"'
        )
    facts = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    assert "Couldn't connect" in facts["direct"] or "nreachable" in facts["direct"], output
    assert facts["dns"] == "none"  # no resolver either: names only ever reach the proxy
    assert facts["socket_dir"] == "proxy.sock"  # its own session's socket, nothing else
    assert facts["uid"] == "1000"
    assert facts["routes"] == "1"  # the route table has its header line only
    attrs = lab.client.containers.get(lab.sandbox.id).attrs
    assert attrs["HostConfig"]["NetworkMode"] == "none"


@pytest.mark.docker
@pytest.mark.asyncio
async def test_e2e_limited(lab: Lab) -> None:
    policy = EgressPolicy.limited(
        ["allowed.test", "loopback.test", "metadata.test", "gateway.test"]
    )
    async with egress_for(lab, policy) as proxy:
        code, allowed = await lab.sh("curl -sS -m 20 http://allowed.test/")
        assert (code, allowed) == (0, "hello from allowed\n")
        code, tunnelled = await lab.sh("curl -sS -m 20 --proxytunnel http://allowed.test/")
        assert (code, tunnelled) == (0, "hello from allowed\n")
        code, python = await lab.sh(
            'python3 -c "import urllib.request as u; '
            "print(u.urlopen('http://allowed.test/', timeout=20).read().decode(), end='')\""
        )
        assert (code, python) == (0, "hello from allowed\n")
        code, big = await lab.sh("curl -sS -m 60 http://allowed.test/big | sha256sum")
        assert big.split()[0] == lab.big_sha256

        code, forbidden = await lab.sh(CURL + "http://forbidden.test/")
        assert forbidden.startswith("HTTP/1.1 403 Forbidden"), forbidden
        assert "forbidden.test is not in this environment's allowed_hosts" in forbidden
        code, forbidden_tls = await lab.sh("curl -sS -m 20 --proxytunnel http://forbidden.test/")
        assert code == 56, forbidden_tls
        assert "CONNECT tunnel failed, response 403" in forbidden_tls
        code, raw_forbidden = await lab.sh(CURL + f"http://{lab.forbidden_ip}/")
        assert f"{lab.forbidden_ip} is a raw IP address" in raw_forbidden
        code, raw_allowed = await lab.sh(CURL + f"http://{lab.allowed_ip}/")
        assert f"{lab.allowed_ip} is a raw IP address" in raw_allowed
        code, port = await lab.sh(CURL + "http://allowed.test:8080/")
        assert "port 8080 is not allowed" in port
        code, loopback = await lab.sh(CURL + "http://loopback.test/")
        assert "127.0.0.1 is a loopback address" in loopback
        code, metadata = await lab.sh(CURL + "http://metadata.test/latest/meta-data/")
        assert "169.254.169.254 is a cloud metadata address" in metadata
        # The bridge gateway is the host itself: the reason Docker networks alone are not enough.
        code, gateway = await lab.sh(CURL + "http://gateway.test/")
        assert "one of the server host's own addresses" in gateway
        code, bypass = await lab.sh(f"curl -sS -m 5 --noproxy '*' http://{lab.allowed_ip}/")
        assert code != 0

        decisions = proxy.recent_decisions()
    assert {d.session_id for d in decisions} == {SESSION}
    outcomes = [(d.host, d.outcome) for d in decisions]
    assert outcomes[:4] == [("allowed.test", "allowed")] * 4
    assert ("forbidden.test", "refused") in outcomes
    assert ("gateway.test", "refused") in outcomes


@pytest.mark.docker
@pytest.mark.asyncio
async def test_e2e_unrestricted_refuses_private_and_loopback(lab: Lab) -> None:
    async with egress_for(lab, EgressPolicy.unrestricted()) as proxy:
        code, allowed = await lab.sh(CURL + "http://allowed.test/")
        assert "is a private address" in allowed, allowed
        code, raw = await lab.sh(CURL + f"http://{lab.forbidden_ip}/")
        assert f"{lab.forbidden_ip} is a private address" in raw
        code, loopback = await lab.sh(CURL + "http://loopback.test/")
        assert "loopback address" in loopback
        # NO_PROXY exempts 127.0.0.1, so clear it to make curl ask the proxy.
        code, literal = await lab.sh("NO_PROXY= no_proxy= " + CURL + "http://127.0.0.1/")
        assert "127.0.0.1 is a loopback address" in literal, literal
        code, metadata = await lab.sh(CURL + "http://169.254.169.254/")
        assert "cloud metadata address" in metadata
        code, gateway = await lab.sh(CURL + "http://gateway.test/")
        assert "private address" in gateway or "own addresses" in gateway
    assert all(not d.allowed for d in proxy.recent_decisions())


@pytest.mark.docker
@pytest.mark.asyncio
async def test_e2e_forwarder_comes_back_after_being_killed(lab: Lab) -> None:
    async with egress_for(lab, EgressPolicy.limited(["allowed.test"])):
        code, output = await lab.sh(
            # Kill the forwarder (python3), not the sh loop that restarts it.
            "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null "
            "| grep -q '^python3 .*egress-forwarde[r]' && kill ${p#/proc/}; done; "
            "curl -sS -m 5 http://allowed.test/ >/dev/null 2>&1 && exit 3; "
            "for i in $(seq 50); do curl -sS -m 5 http://allowed.test/ 2>/dev/null && exit 0; "
            "sleep 0.1; done; exit 1"
        )
    assert (code, output) == (0, "hello from allowed\n")
