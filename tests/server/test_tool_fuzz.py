"""Property tests over every MCP tool's arguments: a result or a clear error, never a half-write.

Arguments come from each tool's own input schema (valid shapes), mixed with wrong types,
unknown keys, missing keys, and ids that point at real objects, so that calls get past
validation into the services. After a failed call the store, the blob store and the set of
containers must be exactly as before it.

`MANAGED_AGENTS_FUZZ_EXAMPLES` sets the examples per tool (default 40).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import docker
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from mcp import Client

from server.app import build_server
from server.settings import Settings
from tests.conftest import OpenServices, ToolCaller, home_label
from tests.fakes.messages_api import FakeMessagesAPI, text
from tests.server.helpers import setup_session

pytestmark = [pytest.mark.docker]
AgentArgs = Callable[..., dict[str, Any]]
EXAMPLES = int(os.environ.get("MANAGED_AGENTS_FUZZ_EXAMPLES", "40"))

TOOLS = [
    "run_task",
    "start_session",
    "get_session",
    "list_sessions",
    "send_event",
    "send_message",
    "interrupt_session",
    "wait_for_session",
    "list_events",
    "read_file",
    "update_session",
    "archive_session",
    "delete_session",
    "add_session_resource",
    "list_session_resources",
    "delete_session_resource",
    "create_agent",
    "get_agent",
    "list_agents",
    "update_agent",
    "archive_agent",
    "list_agent_versions",
    "create_environment",
    "get_environment",
    "list_environments",
    "update_environment",
    "archive_environment",
    "delete_environment",
    "upload_file",
    "list_files",
    "get_file",
    "download_file",
    "delete_file",
]
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"/[^\"]+\", line \d+")

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False),
    st.text(max_size=40),
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
JUNK_IDS = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", "../etc/passwd", "sesn_", "agent_%00", "file_" + "x" * 300, "env_'--"]),
)


@dataclass
class World:
    """Real objects whose ids the generated arguments may point at."""

    agents: list[str] = field(default_factory=list)
    environments: list[str] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    resources: list[str] = field(default_factory=list)


def from_schema(schema: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values of the JSON Schema subset pydantic emits (refs, unions, objects, arrays, enums)."""
    if "$ref" in schema:
        return st.deferred(lambda: from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs))
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for union in ("anyOf", "oneOf"):
        if union in schema:
            return st.one_of([from_schema(option, defs) for option in schema[union]])
    kind = schema.get("type")
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 40))
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        items = from_schema(schema.get("items", {}), defs)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=3)
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: from_schema(v, defs) for k, v in properties.items() if k in required},
            optional={k: from_schema(v, defs) for k, v in properties.items() if k not in required},
        )
    return JSON


def arguments(schema: dict[str, Any], world: World, scratch: Path) -> st.SearchStrategy[Any]:
    """Arguments for one tool: mostly shaped like its schema, sometimes not at all."""
    defs = schema.get("$defs", {})
    properties: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))

    def value(name: str, sub: dict[str, Any]) -> st.SearchStrategy[Any]:
        ids = {
            "session_id": world.sessions,
            "scope_id": world.sessions,
            "agent_id": world.agents,
            "environment_id": world.environments,
            "file_id": world.files,
            "resource_id": world.resources,
            "agent": world.agents,
        }
        if name in ids and ids[name]:
            return st.sampled_from(ids[name]) | JUNK_IDS | JSON
        if name in ("timeout_s", "wait_s"):
            # a valid wait on a quiet session would wait it all out: keep waits short
            return st.floats(0, 0.3) | st.floats(max_value=-0.001) | JSON
        if name == "path" and "download" in schema.get("title", ""):
            return st.builds(lambda n: str(scratch / "out" / n), st.text(min_size=1, max_size=20))
        if name == "path" and "upload" in schema.get("title", ""):
            return st.sampled_from(
                [str(scratch / "input.txt"), str(scratch / "missing"), "relative.txt", str(scratch)]
            ) | st.text(max_size=20)
        return from_schema(sub, defs) | JSON

    shaped = st.fixed_dictionaries(
        {k: value(k, properties[k]) for k in properties if k in required},
        optional={k: value(k, properties[k]) for k in properties if k not in required},
    )
    unknown_key = st.tuples(shaped, st.text(min_size=1, max_size=10), JSON).map(
        lambda t: {**t[0], **({t[1]: t[2]} if t[1] not in properties else {})}
    )
    missing_key = shaped.flatmap(
        lambda d: (
            st.sampled_from(sorted(d)).map(lambda k: {x: v for x, v in d.items() if x != k})
            if d
            else st.just(d)
        )
    )
    anything = st.dictionaries(st.text(max_size=12), JSON, max_size=5)
    return st.one_of(shaped, shaped, shaped, unknown_key, missing_key, anything)


def snapshot(database: Path, blobs: Path, label: str) -> tuple[Any, ...]:
    """Everything a failed call must leave untouched."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        rows = tuple(sorted(map(repr, db.execute(f"SELECT * FROM {t}"))) for t in sorted(tables))
    files = tuple(sorted(str(p) for p in blobs.rglob("*"))) if blobs.exists() else ()
    client = docker.from_env()
    try:
        containers = tuple(
            sorted(str(c.id) for c in client.containers.list(all=True, filters={"label": label}))
        )
    finally:
        client.close()
    return rows, files, containers


@contextlib.asynccontextmanager
async def fuzz_server(
    open_services_for: OpenServices, settings: Settings
) -> AsyncIterator[tuple[ToolCaller, Client, Any]]:
    async with (
        open_services_for() as services,
        Client(build_server(settings, services=services)) as client,
    ):
        yield ToolCaller(client), client, services


BUSY = """
    SELECT (SELECT count(*) FROM sessions WHERE status IN ('running', 'rescheduling'))
         + (SELECT count(*) FROM events e JOIN sessions s ON s.id = e.session_id
            WHERE e.processed_at IS NULL AND s.status != 'terminated')
"""


async def _quiesce(database: Path) -> None:
    """Wait until no turn runs or is about to, so only the next call can change the state."""

    def busy() -> int:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            return int(db.execute(BUSY).fetchone()[0])

    with anyio.fail_after(60):
        while await anyio.to_thread.run_sync(busy):  # noqa: ASYNC110 - polls another connection
            await anyio.sleep(0.05)


@pytest.fixture
def portal() -> Iterator[anyio.from_thread.BlockingPortal]:
    with anyio.from_thread.start_blocking_portal() as portal:
        yield portal


@pytest.mark.parametrize("tool", TOOLS)
def test_any_arguments_get_a_result_or_a_clear_error_and_no_half_write(
    tool: str,
    portal: anyio.from_thread.BlockingPortal,
    open_services_for: OpenServices,
    settings: Settings,
    fake_api: FakeMessagesAPI,
    new_agent: AgentArgs,
    tmp_path: Path,
) -> None:
    fake_api.set_default(text("Done."))
    scratch = tmp_path / "scratch"
    (scratch / "out").mkdir(parents=True)
    (scratch / "input.txt").write_text("hello\n")
    label = home_label(settings.home)
    with portal.wrap_async_context_manager(fuzz_server(open_services_for, settings)) as (
        mcp,
        client,
        services,
    ):
        world = World()

        async def populate() -> None:
            session = await setup_session(mcp, new_agent())
            world.sessions.append(session["id"])
            world.agents.append(session["agent"]["id"])
            world.environments.append(session["environment_id"])
            data = base64.b64encode(b"fuzz me\n").decode()
            file = await mcp("upload_file", {"content_base64": data, "filename": "f.txt"})
            world.files.append(file["id"])
            resource = await mcp(
                "add_session_resource", {"session_id": session["id"], "file_id": file["id"]}
            )
            world.resources.append(resource["id"])

        portal.call(populate)
        [schema] = [t.input_schema for t in portal.call(client.list_tools).tools if t.name == tool]

        @settings_for_fuzz
        @given(args=arguments(schema, world, scratch))
        def check(args: Any) -> None:
            before = snapshot(settings.database_path, settings.home / "blobs", label)
            result = portal.call(client.call_tool, tool, args)
            if result.is_error:
                message = " ".join(c.text for c in result.content if c.type == "text")
                assert message.strip(), f"{tool} failed with no message"
                assert not TRACEBACK.search(message), message
                assert len(message) < 4000, f"{tool}: a {len(message)}-character error"
                after = snapshot(settings.database_path, settings.home / "blobs", label)
                assert after == before, f"{tool} failed ({message}) but changed state"
            else:
                if tool == "add_session_resource":
                    mount = result.structured_content["mount_path"]
                    assert mount.startswith("/mnt/session/uploads/"), mount
                portal.call(_quiesce, settings.database_path)

        check()


settings_for_fuzz = hypothesis_settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.asyncio
async def test_every_tool_is_fuzzed(open_services_for: OpenServices, settings: Settings) -> None:
    async with fuzz_server(open_services_for, settings) as (_, client, _services):
        listed = {t.name for t in (await client.list_tools()).tools}
    assert listed == set(TOOLS)


@pytest.mark.asyncio
async def test_wrong_arguments_are_named_without_echoing_them(
    open_services_for: OpenServices, settings: Settings
) -> None:
    secret = "s3cr3t-" + "y" * 200
    async with fuzz_server(open_services_for, settings) as (mcp, _client, _services):
        message = await mcp.error("send_message", {"session_id": 5, "text": "", "x": secret})
    assert message == (
        "Error executing tool send_message: invalid_request_error: session_id: Input should be "
        "a valid string; text: String should have at least 1 character. Check the tool's input "
        "schema and call it again."
    )
