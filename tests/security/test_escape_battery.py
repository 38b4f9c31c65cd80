"""Escape and reach-out battery, run from inside real sessions (catalogue S-02, S-03, S-04, S-09,
S-15 and A-06 of threats-and-tests.md).

For each backend one server runs over the real HTTP transport (a loopback port, its token in
`<home>/token`), next to a canary listening on 0.0.0.0 and [::]. Probe sessions -- no network
(`limited`, nothing allowed), `limited` with allowed names that point at the host, loopback and
the metadata address, and `unrestricted`, on either backend -- each run
`inside.py` through their bash tool as a scripted agent would; another session plants files and
a process for them to look for. Each route's verdict is its own test case below, so a report
names exactly what broke. Set MA_SECURITY_REPORT_DIR to keep every route's evidence as JSON.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest

from sandbox.bubblewrap import BubblewrapBackend
from sandbox.docker import DockerBackend
from sandbox.egress import CONTAINER_SOCKET_DIR
from sandbox.forwarder import CONTAINER_FORWARDER_PATH
from server.settings import Settings
from tests.conftest import IMAGE, model_for, remove_labelled
from tests.fakes.messages_api import FakeMessagesAPI
from tests.security import inside
from tests.security.helpers import (
    Canary,
    Session,
    bracket,
    bwrap_state_root,
    host_addresses,
    new_agent,
    new_environment,
    new_session,
    remove_tree,
    routing_fake,
    serve,
    traversable_home,
)

pytestmark = pytest.mark.slow

BACKENDS = ("docker", "bubblewrap")
MODES = ("no_network", "limited_allowlist", "unrestricted")
BACKEND_MODES = {
    "docker": MODES,
    "bubblewrap": MODES,
}
REPORT_ENV = "MA_SECURITY_REPORT_DIR"
ROUTES = tuple(inside.ROUTES)
INSIDE_SOURCE = Path(inside.__file__).read_text()

KNOWN_GAPS: dict[tuple[str, str], str] = {}

OTHER_SETUP = """\
M={marker}
for d in /workspace /tmp "$HOME" /mnt/session/outputs; do echo private > "$d/$M.txt"; done
nohup python3 -c 'import time; time.sleep(900)' "$M" >/dev/null 2>&1 &
sleep 0.5
echo "files=$(ls /workspace/$M.txt /tmp/$M.txt $HOME/$M.txt /mnt/session/outputs/$M.txt | wc -l)"
echo "procs=$(grep -l "$M" /proc/[0-9]*/cmdline 2>/dev/null | wc -l)"
"""

OTHER_RECHECK = """\
M={marker}
echo "files=$(ls /workspace/$M.txt /tmp/$M.txt $HOME/$M.txt 2>/dev/null | wc -l)"
echo "procs=$(grep -l "$M" /proc/[0-9]*/cmdline 2>/dev/null | wc -l)"
"""


@dataclass
class Battery:
    """Everything one backend's run observed."""

    routes: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    other_before: str = ""
    other_after: str = ""
    canary_hits: list[str] = field(default_factory=list)
    healthz_from_host: int | None = None
    egress_allowed: list[str] = field(default_factory=list)
    egress_refused: int = 0
    containers: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class _EgressLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _probe_config(port: int, api_port: int, canary: int, other: Session) -> dict[str, Any]:
    hosts = host_addresses()
    host_targets = [f"{bracket(ip)}:{canary}" for ip in hosts]
    proxy_targets = [
        f"http://127.0.0.1:{port}/healthz",
        f"http://localhost:{port}/healthz",
        f"CONNECT 127.0.0.1:{port}",
        f"CONNECT 127.0.0.1:{api_port}",
        "http://127.0.0.1/",
        "CONNECT 127.0.0.1:443",
        "http://localhost/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
        "http://2130706433/",
        "http://0x7f.1/",
        "http://loopback-alias.test/",
        "CONNECT loopback-alias.test:443",
        "http://host-alias.test/",
        "CONNECT host-alias.test:443",
        "http://172.17.0.1/",
    ]
    for ip in hosts:
        proxy_targets += [
            f"http://{bracket(ip)}:{canary}/",
            f"http://{bracket(ip)}/",
            f"CONNECT {bracket(ip)}:443",
        ]
    return {
        "targets": [
            f"127.0.0.1:{port}",
            f"[::1]:{port}",
            f"127.0.0.1:{api_port}",
            f"172.17.0.1:{canary}",
            *host_targets,
        ],
        "curl_direct": [f"http://127.0.0.1:{port}/healthz", f"http://127.0.0.1:{api_port}/"],
        "proxy_targets": proxy_targets,
        "curl_proxied": [f"http://127.0.0.1:{port}/healthz", f"http://localhost:{port}/healthz"],
        "metadata": [
            "http://169.254.169.254/latest/meta-data/",
            "CONNECT 169.254.169.254:443",
            "http://[fd00:ec2::254]/",
            "http://100.100.100.200/",
            "http://metadata-alias.test/latest/meta-data/",
            "CONNECT metadata-alias.test:443",
        ],
        "host_markers": ["process_api", "pytest", "dockerd", "containerd", "uvicorn"],
        "other_marker": "",  # set per run
        "other_name": f"ma-{other.id}",
    }


def _parse(output: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for line in output.splitlines():
        if line.startswith(inside.ROUTE_PREFIX):
            verdict = json.loads(line.removeprefix(inside.ROUTE_PREFIX))
            found[verdict["route"]] = verdict
    return found


def _inspect(names: list[str]) -> dict[str, dict[str, Any]]:
    client = docker.from_env()
    try:
        found = {}
        for name in names:
            attrs = client.containers.get(name).attrs
            host = attrs["HostConfig"]
            found[name] = {
                "profile": {
                    "CapDrop": host.get("CapDrop"),
                    "CapAdd": host.get("CapAdd"),
                    "Privileged": host.get("Privileged"),
                    "SecurityOpt": host.get("SecurityOpt"),
                    "ReadonlyRootfs": host.get("ReadonlyRootfs"),
                    "PidMode": host.get("PidMode"),
                    "IpcMode": host.get("IpcMode"),
                    "UTSMode": host.get("UTSMode"),
                    "UsernsMode": host.get("UsernsMode"),
                    "Init": host.get("Init"),
                    "Devices": host.get("Devices"),
                    "User": attrs["Config"].get("User"),
                },
                "network_mode": attrs["HostConfig"]["NetworkMode"],
                "addresses": [
                    n.get("IPAddress") or n.get("GlobalIPv6Address") or ""
                    for n in (attrs["NetworkSettings"].get("Networks") or {}).values()
                ],
                "binds": [
                    (m.get("Type"), m.get("Source"), m.get("Destination"), m.get("RW"))
                    for m in attrs.get("Mounts") or []
                ],
            }
        return found
    finally:
        client.close()


async def _run(backend_name: str, home: Path, state_root: Path | None) -> Battery:
    battery = Battery()
    hosts = host_addresses()
    egress_hosts = {"loopback-alias.test": "127.0.0.1", "metadata-alias.test": "169.254.169.254"}
    ipv4 = [ip for ip in hosts if ":" not in ip]
    egress_hosts["host-alias.test"] = ipv4[0] if ipv4 else "127.0.0.1"
    settings = Settings(
        home=home,
        image=IMAGE,
        retry_delay=0.01,
        poll_interval=0.05,
        warm_pool=0,
        egress_hosts=egress_hosts,
    )
    backend = DockerBackend() if state_root is None else BubblewrapBackend(state_root)
    log = _EgressLog()
    egress_logger = logging.getLogger("sandbox.egress")
    level = egress_logger.level
    egress_logger.setLevel(logging.DEBUG)  # allowed decisions are logged at INFO
    egress_logger.addHandler(log)
    try:
        with Canary() as canary, FakeMessagesAPI() as fake:
            routing_fake(fake)
            api_port = int(fake.url.rsplit(":", 1)[1])
            async with serve(settings, backend, model_for(fake)) as server:
                mcp = server.mcp
                agent = await new_agent(mcp)
                networks = {
                    "no_network": {"type": "limited", "allowed_hosts": []},
                    "limited_allowlist": {
                        "type": "limited",
                        "allowed_hosts": [
                            "loopback-alias.test",
                            "host-alias.test",
                            "metadata-alias.test",
                            "127.0.0.1",
                            "169.254.169.254",
                            *ipv4,
                        ][:20],
                    },
                    "unrestricted": {"type": "unrestricted"},
                }
                modes = BACKEND_MODES[backend_name]
                envs = {
                    mode: await new_environment(mcp, f"sec-{mode}", networks[mode])
                    for mode in {"no_network", *modes}
                }
                other = await new_session(mcp, server.services, agent, envs["no_network"])
                marker = f"ma-other-{secrets.token_hex(6)}"
                battery.other_before = (await other.bash(OTHER_SETUP.format(marker=marker))).text
                probes = {
                    mode: await new_session(mcp, server.services, agent, envs[mode])
                    for mode in modes
                }
                config = _probe_config(server.port, api_port, canary.port, other)
                config["other_marker"] = marker
                encoded = base64.b64encode(json.dumps(config).encode()).decode()
                command = f"python3 - {encoded} <<'__MA_PROBE__'\n{INSIDE_SOURCE}\n__MA_PROBE__\n"
                for mode, session in probes.items():
                    start = anyio.current_time()
                    run = await session.bash(command, timeout_ms=180_000, limit=240)
                    battery.seconds[mode] = round(anyio.current_time() - start, 1)
                    battery.outputs[mode] = run.text
                    battery.routes[mode] = _parse(run.text)
                battery.other_after = (await other.bash(OTHER_RECHECK.format(marker=marker))).text

                def healthz() -> int:
                    url = f"http://127.0.0.1:{server.port}/healthz"
                    with urllib.request.urlopen(url, timeout=5) as response:
                        return int(response.status)

                battery.healthz_from_host = await anyio.to_thread.run_sync(healthz)
                if state_root is None:
                    names = [f"ma-{s.id}" for s in (other, *probes.values())]
                    battery.containers = await anyio.to_thread.run_sync(_inspect, names)
            battery.canary_hits = list(canary.hits)
    finally:
        egress_logger.removeHandler(log)
        egress_logger.setLevel(level)
        with contextlib.suppress(Exception):
            await backend.aclose()
    battery.egress_allowed = [m for m in log.messages if m.startswith("egress allowed")]
    battery.egress_refused = sum(m.startswith("egress refused") for m in log.messages)
    return battery


@pytest.fixture(scope="module")
def batteries(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Battery]:
    """`batteries(backend)` runs the battery on first use (once per module) and caches it."""
    done: dict[str, Battery | BaseException] = {}

    def get(backend_name: str) -> Battery:
        if backend_name not in done:
            request.getfixturevalue("docker_ready" if backend_name == "docker" else "bwrap_ready")
            try:
                done[backend_name] = _collect(backend_name, tmp_path_factory)
            except BaseException as exc:
                done[backend_name] = exc
        result = done[backend_name]
        if isinstance(result, BaseException):
            raise result
        if report_dir := os.environ.get(REPORT_ENV):
            path = Path(report_dir) / f"escape-battery-{backend_name}.json"
            path.write_text(json.dumps(dataclasses.asdict(result), indent=1))
        return result

    return get


def _collect(backend_name: str, tmp_path_factory: pytest.TempPathFactory) -> Battery:
    if backend_name == "docker":
        home = tmp_path_factory.mktemp("security-docker") / "home"
        home.mkdir()
        try:
            return anyio.run(_run, backend_name, home, None)
        finally:
            remove_labelled(home)
    home = traversable_home()
    try:
        with bwrap_state_root() as state_root:
            return anyio.run(_run, backend_name, home, state_root)
    finally:
        remove_tree(home.parent)


def _marks(backend: str, route: str) -> list[pytest.MarkDecorator]:
    marks = [pytest.mark.docker if backend == "docker" else pytest.mark.bubblewrap]
    if gap := KNOWN_GAPS.get((backend, route)):
        marks.append(pytest.mark.xfail(strict=True, reason=gap))
    return marks


CASES = [
    pytest.param(backend, mode, route, id=f"{backend}-{mode}-{route}", marks=_marks(backend, route))
    for backend in BACKENDS
    for mode in BACKEND_MODES[backend]
    for route in ROUTES
]


@pytest.mark.parametrize(("backend", "mode", "route"), CASES)
def test_route_is_closed(
    batteries: Callable[[str], Battery], backend: str, mode: str, route: str
) -> None:
    battery = batteries(backend)
    verdicts = battery.routes[mode]
    assert route in verdicts, f"the probe did not report {route}:\n{battery.outputs[mode][-3000:]}"
    verdict = verdicts[route]
    assert not verdict.get("error"), f"the probe for {route} crashed: {verdict['evidence']}"
    assert not verdict["escaped"], f"{route} succeeded from inside ({mode}): {verdict['evidence']}"


BACKEND_PARAMS = [
    pytest.param(b, marks=pytest.mark.docker if b == "docker" else pytest.mark.bubblewrap)
    for b in BACKENDS
]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_the_probes_could_see_what_they_looked_for(
    batteries: Callable[[str], Battery], backend: str
) -> None:
    """Positive controls: the other session sees its own files and process before and after the
    probes ran (so 'invisible' means invisible), every probe finished, and the HTTP port the
    sandboxes could not reach was up for the host the whole time."""
    battery = batteries(backend)
    assert "files=4" in battery.other_before, battery.other_before
    assert "procs=0" not in battery.other_before, battery.other_before
    assert "files=3" in battery.other_after, battery.other_after
    assert "procs=0" not in battery.other_after, battery.other_after
    for mode in BACKEND_MODES[backend]:
        assert "MA-DONE" in battery.outputs[mode], battery.outputs[mode][-2000:]
    assert battery.healthz_from_host == 200


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_no_connection_reached_the_host_or_left_through_the_proxy(
    batteries: Callable[[str], Battery], backend: str
) -> None:
    """The 0.0.0.0/[::] canary saw no connection, and the egress proxies allowed nothing (every
    request the probes sent them was refused and logged)."""
    battery = batteries(backend)
    assert battery.canary_hits == []
    assert battery.egress_allowed == []
    assert battery.egress_refused >= 20


@pytest.mark.docker
def test_session_containers_have_no_address_and_no_host_paths(
    batteries: Callable[[str], Battery],
) -> None:
    """Another session has no IP or name to reach: no network at all; nothing of the host is
    mounted but the session's own egress socket directory and the forwarder script; and the
    hardening profile (S-01) holds for every session the server made, whatever its networking."""
    battery = batteries("docker")
    assert len(battery.containers) == 1 + len(MODES)
    for name, info in battery.containers.items():
        profile = info["profile"]
        assert profile["CapDrop"] == ["ALL"], (name, profile)
        assert not profile["CapAdd"], (name, profile)
        assert profile["Privileged"] is False, (name, profile)
        assert "no-new-privileges" in profile["SecurityOpt"], (name, profile)
        assert not any("unconfined" in opt for opt in profile["SecurityOpt"]), (name, profile)
        assert profile["ReadonlyRootfs"] is True, (name, profile)
        assert profile["IpcMode"] == "private", (name, profile)
        assert not any(profile[k] == "host" for k in ("PidMode", "UTSMode", "UsernsMode"))
        assert profile["Init"] is True, (name, profile)
        assert not profile["Devices"], (name, profile)
        assert profile["User"] not in ("", "0", "root"), (name, profile)
        assert info["network_mode"] == "none", (name, info)
        assert all(not address for address in info["addresses"]), (name, info)
        for kind, source, destination, writable in info["binds"]:
            if kind == "volume":
                assert destination == "/workspace", (name, info)
                continue
            assert kind == "bind", (name, info)
            assert not writable, (name, info)
            assert destination in (CONTAINER_SOCKET_DIR, CONTAINER_FORWARDER_PATH), (name, info)
            assert "docker.sock" not in (source or ""), (name, info)


@pytest.mark.bubblewrap
@pytest.mark.asyncio
async def test_bubblewrap_sessions_with_egress_start() -> None:
    home = traversable_home()
    try:
        with bwrap_state_root() as state_root, FakeMessagesAPI() as fake:
            routing_fake(fake)
            settings = Settings(
                home=home, image=IMAGE, retry_delay=0.01, poll_interval=0.05, warm_pool=0
            )
            async with serve(settings, BubblewrapBackend(state_root), model_for(fake)) as server:
                agent = await new_agent(server.mcp)
                env = await new_environment(server.mcp, "egress", {"type": "unrestricted"})
                session = await new_session(server.mcp, server.services, agent, env)
                assert (await session.bash("echo ok")).text.strip() == "ok"
    finally:
        remove_tree(home.parent)
