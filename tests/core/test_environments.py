"""Environments: unique names, updates, deletion rules."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from pydantic import ValidationError

from server.core.environments import EnvironmentService
from server.core.errors import ConflictError, NotFoundError
from server.core.models import EnvironmentCreateParams, EnvironmentUpdateParams
from server.core.store import Database

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def environments(tmp_path: Path) -> AsyncIterator[EnvironmentService]:
    db = await Database.open(tmp_path / "db.sqlite")
    yield EnvironmentService(db)
    await db.aclose()


async def test_create_defaults_to_unrestricted_cloud_config(
    environments: EnvironmentService,
) -> None:
    env = await environments.create(EnvironmentCreateParams(name="python"))
    assert env["id"].startswith("env_")
    assert env["type"] == "environment"
    assert env["config"] == {"type": "cloud", "networking": {"type": "unrestricted"}}


async def test_duplicate_name_is_a_conflict(environments: EnvironmentService) -> None:
    await environments.create(EnvironmentCreateParams(name="python"))
    with pytest.raises(ConflictError) as caught:
        await environments.create(EnvironmentCreateParams(name="python"))
    assert "already exists" in str(caught.value)


async def test_update_keeps_omitted_fields(environments: EnvironmentService) -> None:
    env = await environments.create(
        EnvironmentCreateParams.model_validate(
            {"name": "py", "description": "d", "metadata": {"a": "1"}}
        )
    )
    updated = await environments.update(env["id"], EnvironmentUpdateParams(name="py3"))
    assert updated["name"] == "py3"
    assert updated["description"] == "d"
    assert updated["metadata"] == {"a": "1"}


async def test_delete_of_unknown_environment_is_not_found(
    environments: EnvironmentService,
) -> None:
    with pytest.raises(NotFoundError):
        await environments.delete("env_nope")


@pytest.mark.parametrize(
    "config",
    [
        {"networking": {"type": "limited", "allowed_hosts": ["https://example.com"]}},
        {"networking": {"type": "limited", "allowed_hosts": ["example.com:443"]}},
        {"packages": {"pip": ["requests; curl x|sh"]}},
        {"packages": {"pip": ["--index-url=http://evil.test"]}},
        {"networking": {"type": "sometimes"}},
    ],
)
async def test_bad_configs_are_refused(config: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        EnvironmentCreateParams.model_validate({"name": "x", "config": config})
