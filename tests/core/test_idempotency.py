"""Idempotency keys in the domain: one object per key, even across a kill -9 mid-create."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import pytest_asyncio

from server.core.agents import AgentService
from server.core.environments import EnvironmentService
from server.core.errors import ConflictError, InvalidRequestError
from server.core.idempotency import IdempotencyKeys
from server.core.instances import InstanceRegistry
from server.core.models import AgentCreateParams, EnvironmentCreateParams
from server.core.store import Database

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def services(tmp_path: Path) -> AsyncIterator[tuple[AgentService, EnvironmentService]]:
    db = await Database.open(tmp_path / "db.sqlite")
    instances = InstanceRegistry(tmp_path / "instances")
    keys = IdempotencyKeys(db, instances)
    yield AgentService(db, keys), EnvironmentService(db, keys=keys)
    instances.close()
    await db.aclose()


def coder(**overrides: object) -> AgentCreateParams:
    return AgentCreateParams.model_validate({"name": "coder", "model": "m", **overrides})


async def _count_agents(agents: AgentService) -> int:
    return len((await agents.list(limit=100)).data)


async def test_concurrent_creates_with_one_key_make_one_agent(
    services: tuple[AgentService, EnvironmentService],
) -> None:
    agents, _ = services
    ids: list[str] = []

    async def create() -> None:
        ids.append((await agents.create(coder(), idempotency_key="k-1"))["id"])

    async with anyio.create_task_group() as group:
        for _ in range(20):
            group.start_soon(create)
    assert len(set(ids)) == 1
    assert await _count_agents(agents) == 1
    # another key is another agent
    other = await agents.create(coder(), idempotency_key="k-2")
    assert other["id"] != ids[0]


async def test_the_same_key_with_other_parameters_is_refused_and_creates_nothing(
    services: tuple[AgentService, EnvironmentService],
) -> None:
    agents, _ = services
    await agents.create(coder(), idempotency_key="k")
    with pytest.raises(InvalidRequestError, match="different parameters; use a new key"):
        await agents.create(coder(name="other"), idempotency_key="k")
    assert await _count_agents(agents) == 1


async def test_a_failed_create_releases_its_key(
    services: tuple[AgentService, EnvironmentService],
) -> None:
    _, environments = services
    squatter = await environments.create(EnvironmentCreateParams(name="taken"))
    with pytest.raises(ConflictError):
        await environments.create(EnvironmentCreateParams(name="taken"), idempotency_key="k")
    await environments.delete(squatter["id"])
    created = await environments.create(EnvironmentCreateParams(name="taken"), idempotency_key="k")
    assert created["id"] != squatter["id"]


@pytest.mark.parametrize("dies", ["after_commit", "before_commit"])
async def test_a_retry_after_the_creator_was_killed_makes_exactly_one_agent(
    tmp_path: Path, dies: str
) -> None:
    """A process reserves the key, maybe commits the agent, and dies before answering."""
    script = textwrap.dedent(
        f"""
        import os, anyio
        from pathlib import Path
        from server.core.agents import AgentService
        from server.core.idempotency import IdempotencyKeys
        from server.core.instances import InstanceRegistry
        from server.core.models import AgentCreateParams
        from server.core.store import Database

        async def main():
            home = Path({str(tmp_path)!r})
            db = await Database.open(home / "db.sqlite")
            agents = AgentService(db, IdempotencyKeys(db, InstanceRegistry(home / "instances")))
            params = AgentCreateParams(name="coder", model="m")

            async def create_then_die(agent_id):
                if {dies!r} == "after_commit":
                    await agents._create(agent_id, params)
                os.kill(os.getpid(), 9)

            await agents._keys.create_once(
                "agents", "k", params.model_dump(mode="json"), prefix="agent",
                create=create_then_die, fetch=agents.retrieve,
            )

        anyio.run(main)
        """
    )
    crashed = await anyio.run_process([sys.executable, "-c", script], check=False)
    assert crashed.returncode == -9

    db = await Database.open(tmp_path / "db.sqlite")
    instances = InstanceRegistry(tmp_path / "instances")
    try:
        agents = AgentService(db, IdempotencyKeys(db, instances))
        first = await agents.create(coder(), idempotency_key="k")
        again = await agents.create(coder(), idempotency_key="k")
        assert first["id"] == again["id"]
        assert await _count_agents(agents) == 1
    finally:
        instances.close()
        await db.aclose()


async def test_malformed_keys_are_refused(
    services: tuple[AgentService, EnvironmentService],
) -> None:
    agents, _ = services
    for key in ["", "x" * 256, "tab\there", "ключ"]:
        with pytest.raises(InvalidRequestError, match="printable ASCII"):
            await agents.create(coder(), idempotency_key=key)
    assert await _count_agents(agents) == 0
