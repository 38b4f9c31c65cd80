"""Network policy end to end: sessions reach exactly what their environment allows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import docker
import pytest

from tests.conftest import OpenMCP
from tests.fakes.hosts import web_hosts
from tests.fakes.messages_api import FakeMessagesAPI, text, tool_use
from tests.server.helpers import of_type, say, wait_idle

pytestmark = [pytest.mark.asyncio, pytest.mark.docker]
AgentArgs = Callable[..., dict[str, Any]]


def probe_script(targets: list[str], direct: str) -> str:
    """curl each target through the proxy, then one straight past it; one line each."""
    lines = [
        f"printf '%s ' {t}; curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 10 {t} "
        "|| echo failed"
        for t in targets
    ]
    lines.append(
        f"curl -s -o /dev/null --max-time 5 --noproxy '*' {direct} && echo direct-reached "
        "|| echo direct-blocked"
    )
    return "\n".join(lines)


async def run_probe(
    open_mcp: OpenMCP,
    fake_api: FakeMessagesAPI,
    agent_args: dict[str, Any],
    networking: dict[str, Any],
    hosts: dict[str, str],
    script: str,
) -> tuple[dict[str, str], str]:
    fake_api.add(tool_use("bash", {"command": script}), text("Probed."))
    egress_hosts = {
        "allowed.test": hosts["allowed"],
        "forbidden.test": hosts["forbidden"],
        "metadata.test": "169.254.169.254",
        "loopback.test": "127.0.0.1",
    }
    async with open_mcp(egress_hosts=egress_hosts) as mcp:
        agent = await mcp("create_agent", agent_args)
        env = await mcp("create_environment", {"name": "net", "config": {"networking": networking}})
        session = await mcp("start_session", {"agent": agent["id"], "environment_id": env["id"]})
        client = docker.from_env()
        try:
            mode = client.containers.get(f"ma-{session['id']}").attrs["HostConfig"]["NetworkMode"]
        finally:
            client.close()
        await say(mcp, session["id"], "Probe the network.")
        _, events = await wait_idle(mcp, session["id"])
    output = of_type(events, "agent.tool_result")[0]["content"][0]["text"]
    codes = dict(line.split(" ", 1) for line in output.splitlines() if line.startswith("http"))
    return codes, output + f"\nnetwork_mode={mode}"


async def test_limited_networking_reaches_exactly_the_allowed_host(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    with web_hosts(["allowed", "forbidden"]) as hosts:
        targets = [
            "http://allowed.test/",
            "http://forbidden.test/",
            f"http://{hosts['forbidden']}/",
            f"http://{hosts['allowed']}/",
            "http://metadata.test/",
        ]
        codes, output = await run_probe(
            open_mcp,
            fake_api,
            new_agent(),
            {"type": "limited", "allowed_hosts": ["allowed.test"]},
            hosts,
            probe_script(targets, f"http://{hosts['allowed']}/"),
        )
    assert codes == {
        "http://allowed.test/": "200",
        "http://forbidden.test/": "403",
        f"http://{hosts['forbidden']}/": "403",
        f"http://{hosts['allowed']}/": "403",
        "http://metadata.test/": "403",
    }, output
    assert "direct-blocked" in output
    assert "network_mode=none" in output


async def test_unrestricted_networking_never_reaches_private_or_local_addresses(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    with web_hosts(["allowed", "forbidden"]) as hosts:
        targets = ["http://allowed.test/", "http://metadata.test/", "http://loopback.test/"]
        codes, output = await run_probe(
            open_mcp,
            fake_api,
            new_agent(),
            {"type": "unrestricted"},
            hosts,
            probe_script(targets, f"http://{hosts['allowed']}/"),
        )
    assert codes == dict.fromkeys(targets, "403"), output
    assert "direct-blocked" in output
