"""Agents: versioning, update semantics, limits, listing and archiving."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from pydantic import ValidationError

from server.core.agents import AgentService
from server.core.errors import ConflictError, NotFoundError
from server.core.models import AgentCreateParams, AgentUpdateParams
from server.core.store import Database

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def agents(tmp_path: Path) -> AsyncIterator[AgentService]:
    db = await Database.open(tmp_path / "db.sqlite")
    yield AgentService(db)
    await db.aclose()


def params(**overrides: object) -> AgentCreateParams:
    data: dict[str, object] = {"name": "coder", "model": "claude-sonnet-4-6"}
    data.update(overrides)
    return AgentCreateParams.model_validate(data)


async def test_create_returns_version_one_in_the_api_shape(agents: AgentService) -> None:
    agent = await agents.create(params(tools=[{"type": "agent_toolset_20260401"}]))
    assert agent["id"].startswith("agent_")
    assert agent["type"] == "agent"
    assert agent["version"] == 1
    assert agent["model"] == {"id": "claude-sonnet-4-6", "speed": "standard"}
    toolset = agent["tools"][0]
    assert toolset["default_config"] == {
        "enabled": True,
        "permission_policy": {"type": "always_allow"},
    }
    assert [c["name"] for c in toolset["configs"]][:6] == [
        "bash",
        "read",
        "write",
        "edit",
        "glob",
        "grep",
    ]
    assert agent["archived_at"] is None
    assert await agents.retrieve(agent["id"]) == agent


async def test_effective_update_makes_a_new_version_and_keeps_the_old(
    agents: AgentService,
) -> None:
    agent = await agents.create(params(system="v1"))
    updated = await agents.update(agent["id"], AgentUpdateParams(system="v2", version=1))
    assert updated["version"] == 2
    assert (await agents.retrieve(agent["id"]))["system"] == "v2"
    assert (await agents.retrieve(agent["id"], version=1))["system"] == "v1"
    versions = await agents.list_versions(agent["id"])
    assert [v["version"] for v in versions.data] == [2, 1]


async def test_noop_update_keeps_the_version(agents: AgentService) -> None:
    agent = await agents.create(params(system="same", metadata={"team": "a"}))
    again = await agents.update(
        agent["id"], AgentUpdateParams(system="same", metadata={"team": "a"})
    )
    assert again["version"] == 1


async def test_stale_version_is_a_conflict(agents: AgentService) -> None:
    agent = await agents.create(params())
    await agents.update(agent["id"], AgentUpdateParams(system="x", version=1))
    with pytest.raises(ConflictError) as caught:
        await agents.update(agent["id"], AgentUpdateParams(system="y", version=1))
    assert caught.value.code == "invalid_request_error"
    assert caught.value.status == 409
    assert "version 2" in str(caught.value)


async def test_metadata_merges_per_key_and_null_deletes(agents: AgentService) -> None:
    agent = await agents.create(params(metadata={"a": "1", "b": "2"}))
    updated = await agents.update(agent["id"], AgentUpdateParams(metadata={"b": None, "c": "3"}))
    assert updated["metadata"] == {"a": "1", "c": "3"}


async def test_unknown_agent_and_version_are_not_found(agents: AgentService) -> None:
    agent = await agents.create(params())
    with pytest.raises(NotFoundError):
        await agents.retrieve("agent_missing")
    with pytest.raises(NotFoundError) as caught:
        await agents.retrieve(agent["id"], version=7)
    assert "no version 7" in str(caught.value)


async def test_list_pages_newest_first_and_hides_archived(agents: AgentService) -> None:
    first = await agents.create(params(name="first"))
    second = await agents.create(params(name="second"))
    third = await agents.create(params(name="third"))
    page = await agents.list(limit=2)
    assert [a["id"] for a in page.data] == [third["id"], second["id"]]
    assert page.next_page is not None
    rest = await agents.list(limit=2, page=page.next_page)
    assert [a["id"] for a in rest.data] == [first["id"]]
    assert rest.next_page is None
    await agents.archive(second["id"])
    visible = await agents.list()
    assert second["id"] not in [a["id"] for a in visible.data]
    everything = await agents.list(include_archived=True)
    assert second["id"] in [a["id"] for a in everything.data]


async def test_archived_agent_is_read_only(agents: AgentService) -> None:
    agent = await agents.create(params())
    archived = await agents.archive(agent["id"])
    assert archived["archived_at"] is not None
    with pytest.raises(ConflictError):
        await agents.update(agent["id"], AgentUpdateParams(system="x"))


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 257}, "name"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "at most 16"),
        ({"metadata": {"k": "v" * 513}}, "512"),
        ({"system": "s" * 100_001}, "system"),
        (
            {"mcp_servers": [{"type": "url", "name": "gh", "url": "https://x"}]},
            "no mcp_toolset",
        ),
        ({"tools": [{"type": "mcp_toolset", "mcp_server_name": "gh"}]}, "unknown mcp_servers"),
        ({"tools": [{"type": "custom", "name": "bad name!"}]}, "name"),
    ],
)
async def test_field_limits_are_enforced(overrides: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError) as caught:
        params(**overrides)
    assert fragment in str(caught.value)
