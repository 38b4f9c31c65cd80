"""Environment images and limits for real: packages, reuse, build failures, base images."""

from __future__ import annotations

import contextlib
import io
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from tests.conftest import IMAGE, OpenMCP
from tests.fakes.messages_api import FakeMessagesAPI, text, tool_use
from tests.fakes.package_index import PackageIndex, build_wheel
from tests.server.helpers import of_type, say, wait_idle

pytestmark = [pytest.mark.asyncio, pytest.mark.docker]
AgentArgs = Callable[..., dict[str, Any]]


VERSION = f"1.0.{secrets.randbelow(10**9)}"
"""Unique per run: environment images are cached by content on the daemon across runs."""


@pytest.fixture
def package_index(tmp_path: Path) -> Iterator[PackageIndex]:
    wheel = build_wheel(tmp_path, "ma-probe", VERSION, "VALUE = 'probe says 42'\n")
    with PackageIndex([wheel]) as index:
        yield index


def index_settings(index: PackageIndex) -> dict[str, Any]:
    """Builds use the host network so they reach the index on loopback."""
    return {
        "build_network": "host",
        "build_args": {"PIP_INDEX_URL": index.url, "PIP_TRUSTED_HOST": "127.0.0.1"},
    }


def container_of(session_id: str) -> dict[str, Any]:
    client = docker.from_env()
    try:
        return client.containers.get(f"ma-{session_id}").attrs
    finally:
        client.close()


async def test_a_pip_package_declared_on_the_environment_imports_in_sessions(
    open_mcp: OpenMCP,
    fake_api: FakeMessagesAPI,
    new_agent: AgentArgs,
    package_index: PackageIndex,
) -> None:
    fake_api.add(
        tool_use("bash", {"command": "python3 -c 'import ma_probe; print(ma_probe.VALUE)'"}),
        text("It imports."),
    )
    config = {
        "packages": {"pip": [f"ma-probe=={VERSION}"]},
        "networking": {"type": "limited", "allowed_hosts": []},
    }
    async with open_mcp(**index_settings(package_index)) as mcp:
        agent = await mcp("create_agent", new_agent())
        env = await mcp("create_environment", {"name": "with-probe", "config": config})
        session = await mcp("start_session", {"agent": agent["id"], "environment_id": env["id"]})
        await say(mcp, session["id"], "Import it.")
        _, events = await wait_idle(mcp, session["id"])
        assert of_type(events, "agent.tool_result")[0]["content"][0]["text"] == "probe says 42\n"
        first_image = container_of(session["id"])["Config"]["Image"]
        assert first_image.startswith("managed-agents-env:")
        downloads = len(package_index.requests)
        assert downloads >= 1

        # Another environment with the same packages reuses the built image.
        twin = await mcp("create_environment", {"name": "twin", "config": config})
        second = await mcp("start_session", {"agent": agent["id"], "environment_id": twin["id"]})
        assert container_of(second["id"])["Config"]["Image"] == first_image
        assert len(package_index.requests) == downloads


async def test_a_failing_package_is_named_and_no_session_is_created(
    open_mcp: OpenMCP, new_agent: AgentArgs, package_index: PackageIndex
) -> None:
    async with open_mcp(**index_settings(package_index)) as mcp:
        agent = await mcp("create_agent", new_agent())
        env = await mcp(
            "create_environment",
            {"name": "broken", "config": {"packages": {"pip": ["ma-no-such-package"]}}},
        )
        error = await mcp.error(
            "start_session", {"agent": agent["id"], "environment_id": env["id"]}
        )
        assert "invalid_request_error" in error
        assert "installing pip: ma-no-such-package failed" in error
        assert "No matching distribution" in error
        assert (await mcp("list_sessions", {}))["data"] == []


async def test_a_custom_base_image_and_dockerfile_steps_are_used(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    """An image without /workspace or the agent user still gives a working sandbox."""
    client = docker.from_env()
    foreign = "ma-test-foreign:latest"
    dockerfile = (
        f"FROM {IMAGE}\nUSER root\nRUN rm -rf /workspace /home/agent && userdel agent\nUSER 0\n"
    )
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=foreign, rm=True)
    fake_api.add(
        tool_use("bash", {"command": "id -u; cat /etc/ma-marker; touch /workspace/ok && ls"}),
        text("Works."),
    )
    try:
        async with open_mcp() as mcp:
            agent = await mcp("create_agent", new_agent())
            env = await mcp(
                "create_environment",
                {
                    "name": "foreign",
                    "config": {
                        "image": foreign,
                        "dockerfile": "RUN echo marked > /etc/ma-marker",
                        "networking": {"type": "limited", "allowed_hosts": []},
                    },
                },
            )
            session = await mcp(
                "start_session", {"agent": agent["id"], "environment_id": env["id"]}
            )
            await say(mcp, session["id"], "Check.")
            _, events = await wait_idle(mcp, session["id"])
            result = of_type(events, "agent.tool_result")[0]
            assert result["content"][0]["text"] == "1000\nmarked\nok\n"
            bad = await mcp.error(
                "create_environment",
                {"name": "x", "config": {"dockerfile": "FROM debian\nRUN true"}},
            )
            assert "must not contain FROM" in bad
    finally:
        with contextlib.suppress(docker.errors.APIError):
            client.images.remove(foreign, force=True)
        client.close()


async def test_environment_limits_reach_the_container_and_the_turn(
    open_mcp: OpenMCP, fake_api: FakeMessagesAPI, new_agent: AgentArgs
) -> None:
    fake_api.add(tool_use("bash", {"command": "sleep 60"}))
    limits = {"memory_mb": 300, "pids": 64, "cpus": 0.5, "turn_timeout_s": 3}
    async with open_mcp() as mcp:
        agent = await mcp("create_agent", new_agent())
        env = await mcp(
            "create_environment",
            {
                "name": "tight",
                "config": {
                    "limits": limits,
                    "networking": {"type": "limited", "allowed_hosts": []},
                },
            },
        )
        session = await mcp("start_session", {"agent": agent["id"], "environment_id": env["id"]})
        host = container_of(session["id"])["HostConfig"]
        assert host["Memory"] == 300 << 20
        assert host["PidsLimit"] == 64
        assert host["NanoCpus"] == 500_000_000

        await say(mcp, session["id"], "Sleep.")
        answer, events = await wait_idle(mcp, session["id"], limit=30)
    assert answer["stop_reason"] == {"type": "retries_exhausted"}
    (error,) = of_type(events, "session.error")
    assert "wall-clock limit" in error["error"]["message"]
    assert of_type(events, "agent.tool_result")[0]["content"][0]["text"].startswith("Stopped")
