"""Helpers for driving the REST API with the official anthropic SDK."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import anthropic
import anyio
from anthropic.types.beta import BetaCloudConfigParams
from anthropic.types.beta.sessions import (
    BetaManagedAgentsFileResource,
    BetaManagedAgentsUserMessageEventParams,
)

from tests.server.http_server import RunningServer

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLE = ROOT / "examples" / "migrate_from_hosted.py"
NO_NETWORK: BetaCloudConfigParams = {
    "type": "cloud",
    "networking": {"type": "limited", "allowed_hosts": []},
}


def async_client(server: RunningServer) -> anthropic.AsyncAnthropic:
    """The SDK pointed at the test server (no retries, so failures show at once)."""
    return anthropic.AsyncAnthropic(
        base_url=server.url, api_key=server.token, max_retries=0, timeout=60
    )


def sync_client(server: RunningServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=server.token, max_retries=0, timeout=60)


def load_example() -> ModuleType:
    """examples/migrate_from_hosted.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("migrate_from_hosted", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Its dataclass resolves string annotations through sys.modules.
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


async def new_session(client: anthropic.AsyncAnthropic, name: str) -> Any:
    """An agent with the built-in tools, an environment without network, and a session."""
    agent = await client.beta.agents.create(
        name=name, model="claude-sonnet-4-6", tools=[{"type": "agent_toolset_20260401"}]
    )
    environment = await client.beta.environments.create(name=f"env-{name}", config=NO_NETWORK)
    return await client.beta.sessions.create(agent=agent.id, environment_id=environment.id)


def ends_turn(event: Any) -> bool:
    """The drain-loop gate of the hosted docs: idle (not waiting for us) or terminated."""
    if event.type == "session.status_terminated":
        return True
    return event.type == "session.status_idle" and event.stop_reason.type != "requires_action"


async def read_turn(stream: Any, *, limit: float = 60) -> list[Any]:
    """Events from an open SDK stream until the turn ends (bounded)."""
    events: list[Any] = []
    with anyio.fail_after(limit):
        async for event in stream:
            events.append(event)
            if ends_turn(event):
                return events
    raise AssertionError(f"the stream ended before the turn did: {[e.type for e in events]}")


def user_message(text: str) -> BetaManagedAgentsUserMessageEventParams:
    return {"type": "user.message", "content": [{"type": "text", "text": text}]}


def file_resource(resource: Any) -> BetaManagedAgentsFileResource:
    """A session resource, which on this server is always a file."""
    assert isinstance(resource, BetaManagedAgentsFileResource), resource
    return resource
