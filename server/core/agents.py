"""Agents: versioned configurations. Every effective update makes a new immutable version."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from .clock import now
from .errors import ConflictError, InvalidRequestError, NotFoundError
from .idempotency import IdempotencyKeys, create_once
from .models import (
    BUILTIN_TOOL_NAMES,
    AgentCreateParams,
    AgentToolset,
    AgentUpdateParams,
    CustomTool,
    McpServerParam,
    McpToolset,
    ModelConfig,
    SkillParam,
    check_agent_shape,
)
from .store import (
    Database,
    Json,
    Order,
    Page,
    TimeFilter,
    decode_cursor,
    dumps,
    encode_cursor,
    paginate_by_id,
)

CONFIG_FIELDS = ("name", "model", "system", "description", "tools", "mcp_servers", "skills")
"""Fields whose change makes a new version (with `metadata`)."""


def normalize_model(model: str | ModelConfig | Json) -> Json:
    """The response form of `model`: always an object with `id` and `speed`."""
    if isinstance(model, str):
        return {"id": model, "speed": "standard"}
    if isinstance(model, dict):
        model = ModelConfig.model_validate(model)
    return model.model_dump(exclude_none=True)


def normalize_tools(tools: list[Any]) -> list[Json]:
    """Resolve tool declarations to the form the API returns (defaults filled in)."""
    resolved: list[Json] = []
    for tool in tools:
        if isinstance(tool, AgentToolset):
            default = tool.default_config
            enabled = default.enabled if default and default.enabled is not None else True
            policy = (
                default.permission_policy.model_dump()
                if default and default.permission_policy
                else {"type": "always_allow"}
            )
            overrides = {c.name: c for c in tool.configs or []}
            configs = []
            for name in BUILTIN_TOOL_NAMES:
                entry: Json = {"name": name, "enabled": enabled, "permission_policy": policy}
                override = overrides.get(name)
                if override is not None:
                    extra = override.model_dump(exclude_none=True, exclude={"type"})
                    entry.update(extra)
                configs.append(entry)
            resolved.append(
                {
                    "type": tool.type,
                    "default_config": {"enabled": enabled, "permission_policy": policy},
                    "configs": configs,
                }
            )
        elif isinstance(tool, McpToolset):
            default = tool.default_config
            enabled = default.enabled if default and default.enabled is not None else True
            policy = (
                default.permission_policy.model_dump()
                if default and default.permission_policy
                else {"type": "always_ask"}
            )
            resolved.append(
                {
                    "type": tool.type,
                    "mcp_server_name": tool.mcp_server_name,
                    "default_config": {"enabled": enabled, "permission_policy": policy},
                    "configs": [c.model_dump(exclude_none=True) for c in tool.configs or []],
                }
            )
        elif isinstance(tool, CustomTool):
            resolved.append(tool.model_dump())
        else:  # pragma: no cover - the discriminated union admits nothing else
            msg = f"unknown tool type {tool!r}"
            raise InvalidRequestError(msg)
    return resolved


def agent_config(
    *,
    name: str,
    model: Any,
    system: str | None,
    description: str | None,
    tools: list[Any],
    mcp_servers: list[McpServerParam],
    skills: list[SkillParam],
) -> Json:
    """The versioned part of an agent, in response form."""
    return {
        "name": name,
        "model": normalize_model(model),
        "system": system,
        "description": description,
        "tools": normalize_tools(tools),
        "mcp_servers": [s.model_dump() for s in mcp_servers],
        "skills": [s.model_dump() for s in skills],
        "multiagent": None,
    }


def _decode(row: sqlite3.Row) -> Json:
    body: Json = json.loads(row["body"])
    body["archived_at"] = row["archived_at"]
    return body


class AgentService:
    """Create, read, update (versioned), list and archive agents."""

    def __init__(self, db: Database, keys: IdempotencyKeys | None = None) -> None:
        self._db = db
        self._keys = keys

    async def create(
        self, params: AgentCreateParams, *, idempotency_key: str | None = None
    ) -> Json:
        """Create version 1 of a new agent (once per `idempotency_key`, see idempotency.py)."""
        return await create_once(
            self._keys,
            "agents",
            idempotency_key,
            params.model_dump(mode="json"),
            prefix="agent",
            create=lambda agent_id: self._create(agent_id, params),
            fetch=self.retrieve,
        )

    async def _create(self, agent_id: str, params: AgentCreateParams) -> Json:
        stamp = now()
        agent: Json = {
            "id": agent_id,
            "type": "agent",
            **agent_config(
                name=params.name,
                model=params.model,
                system=params.system,
                description=params.description,
                tools=params.tools,
                mcp_servers=params.mcp_servers,
                skills=params.skills,
            ),
            "metadata": dict(params.metadata),
            "version": 1,
            "created_at": stamp,
            "updated_at": stamp,
            "archived_at": None,
        }

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO agents (id, latest_version, created_at, updated_at) VALUES (?,1,?,?)",
                (agent["id"], stamp, stamp),
            )
            conn.execute(
                "INSERT INTO agent_versions (agent_id, version, body) VALUES (?, 1, ?)",
                (agent["id"], dumps(agent)),
            )

        await self._db.write(insert)
        return agent

    async def retrieve(self, agent_id: str, version: int | None = None) -> Json:
        """The latest version, or the given one.

        Raises:
            NotFoundError: no such agent or version.
        """

        def select(conn: sqlite3.Connection) -> sqlite3.Row | None:
            return conn.execute(
                "SELECT v.body, a.archived_at FROM agents a JOIN agent_versions v "
                "ON v.agent_id = a.id AND v.version = COALESCE(?, a.latest_version) "
                "WHERE a.id = ?",
                (version, agent_id),
            ).fetchone()

        row = await self._db.read(select)
        if row is None:
            if version is not None and await self._exists(agent_id):
                msg = f"agent {agent_id} has no version {version}; call list_agent_versions"
                raise NotFoundError(msg)
            msg = f"agent {agent_id} not found; call list_agents to see existing agents"
            raise NotFoundError(msg)
        return _decode(row)

    async def _exists(self, agent_id: str) -> bool:
        return await self._db.read(
            lambda c: (
                c.execute("SELECT 1 FROM agents WHERE id = ?", (agent_id,)).fetchone() is not None
            )
        )

    async def update(self, agent_id: str, params: AgentUpdateParams) -> Json:
        """Apply `params` to the latest version; a no-op keeps the version number.

        Raises:
            NotFoundError: no such agent.
            ConflictError: `params.version` is not the latest version, or the agent is archived.
            InvalidRequestError: the merged configuration breaks a rule.
        """
        changes = params.model_dump(exclude_unset=True, exclude={"version", "metadata"})
        if "name" in changes and changes["name"] is None:
            msg = "name cannot be cleared"
            raise InvalidRequestError(msg)
        if "model" in changes and changes["model"] is None:
            msg = "model cannot be cleared"
            raise InvalidRequestError(msg)

        def apply(conn: sqlite3.Connection) -> Json:
            row = conn.execute(
                "SELECT v.body, a.archived_at, a.latest_version FROM agents a "
                "JOIN agent_versions v ON v.agent_id = a.id AND v.version = a.latest_version "
                "WHERE a.id = ?",
                (agent_id,),
            ).fetchone()
            if row is None:
                msg = f"agent {agent_id} not found; call list_agents to see existing agents"
                raise NotFoundError(msg)
            current = _decode(row)
            if current["archived_at"] is not None:
                msg = f"agent {agent_id} is archived and read-only; create a new agent instead"
                raise ConflictError(msg)
            latest = int(row["latest_version"])
            if params.version is not None and params.version != latest:
                msg = (
                    f"version conflict: agent {agent_id} is at version {latest}, not "
                    f"{params.version}; retrieve it again and reapply your change"
                )
                raise ConflictError(msg)
            proposed = self._merge(current, params)
            if all(proposed[k] == current[k] for k in (*CONFIG_FIELDS, "metadata")):
                return current
            stamp = now()
            proposed.update(version=latest + 1, updated_at=stamp)
            conn.execute(
                "INSERT INTO agent_versions (agent_id, version, body) VALUES (?, ?, ?)",
                (agent_id, latest + 1, dumps(proposed)),
            )
            conn.execute(
                "UPDATE agents SET latest_version = ?, updated_at = ? WHERE id = ?",
                (latest + 1, stamp, agent_id),
            )
            return proposed

        return await self._db.write(apply)

    @staticmethod
    def _merge(current: Json, params: AgentUpdateParams) -> Json:
        fields = params.model_fields_set
        tools = params.tools if "tools" in fields else None
        servers = params.mcp_servers if "mcp_servers" in fields else None
        if tools is not None or servers is not None:
            check_agent_shape(
                tools if tools is not None else _tool_params(current["tools"]),
                servers
                if servers is not None
                else [McpServerParam.model_validate(s) for s in current["mcp_servers"]],
            )
        merged = dict(current)
        if "name" in fields and params.name is not None:
            merged["name"] = params.name
        if "model" in fields and params.model is not None:
            merged["model"] = normalize_model(params.model)
        if "system" in fields:
            merged["system"] = params.system
        if "description" in fields:
            merged["description"] = params.description
        if tools is not None:
            merged["tools"] = normalize_tools(tools)
        if servers is not None:
            merged["mcp_servers"] = [s.model_dump() for s in servers]
        if "skills" in fields and params.skills is not None:
            merged["skills"] = [s.model_dump() for s in params.skills]
        if params.metadata:
            metadata = dict(current["metadata"])
            for key, value in params.metadata.items():
                if value is None:
                    metadata.pop(key, None)
                else:
                    metadata[key] = value
            if len(metadata) > 16:
                msg = f"metadata would have {len(metadata)} keys; at most 16 are allowed"
                raise InvalidRequestError(msg)
            merged["metadata"] = metadata
        return merged

    async def list(
        self,
        *,
        limit: int = 20,
        page: str | None = None,
        include_archived: bool = False,
        order: Order = "desc",
        created_at: TimeFilter | None = None,
    ) -> Page:
        inner = (
            "SELECT a.id AS id, v.body AS body, a.archived_at AS archived_at FROM agents a "
            "JOIN agent_versions v ON v.agent_id = a.id AND v.version = a.latest_version "
            "WHERE 1=1"
        )
        if not include_archived:
            inner += " AND a.archived_at IS NULL"
        clauses, args = (created_at or TimeFilter()).sql("a.created_at")
        inner += clauses
        return await self._db.read(
            lambda c: paginate_by_id(
                c,
                f"SELECT * FROM ({inner}) WHERE 1=1",
                args,
                limit=limit,
                page=page,
                order=order,
                decode=_decode,
            )
        )

    async def list_versions(
        self, agent_id: str, *, limit: int = 20, page: str | None = None
    ) -> Page:
        """All versions of an agent, newest first."""
        await self.retrieve(agent_id)

        def select(conn: sqlite3.Connection) -> Page:
            args: list[Any] = [agent_id]
            sql = (
                "SELECT v.version, v.body, a.archived_at FROM agent_versions v "
                "JOIN agents a ON a.id = v.agent_id WHERE v.agent_id = ?"
            )
            if page:
                args.append(decode_cursor(page, "desc"))
                sql += " AND v.version < ?"
            sql += " ORDER BY v.version DESC LIMIT ?"
            args.append(limit + 1)
            rows = conn.execute(sql, args).fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            next_page = encode_cursor("desc", int(rows[-1]["version"])) if more and rows else None
            return Page([_decode(r) for r in rows], next_page)

        return await self._db.read(select)

    async def find_by_metadata(self, key: str, value: str) -> Json | None:
        """The oldest unarchived agent whose latest version has `metadata[key] == value`."""
        row = await self._db.read(
            lambda c: c.execute(
                "SELECT v.body, a.archived_at FROM agents a JOIN agent_versions v "
                "ON v.agent_id = a.id AND v.version = a.latest_version "
                "WHERE a.archived_at IS NULL AND json_extract(v.body, '$.metadata.' || ?) = ? "
                "ORDER BY a.id LIMIT 1",
                (json.dumps(key), value),
            ).fetchone()
        )
        return _decode(row) if row else None

    async def archive(self, agent_id: str) -> Json:
        """Make the agent read-only; new sessions refuse it, running ones go on."""
        stamp = now()

        def apply(conn: sqlite3.Connection) -> None:
            updated = conn.execute(
                "UPDATE agents SET archived_at = COALESCE(archived_at, ?) WHERE id = ?",
                (stamp, agent_id),
            ).rowcount
            if not updated:
                msg = f"agent {agent_id} not found; call list_agents to see existing agents"
                raise NotFoundError(msg)

        await self._db.write(apply)
        return await self.retrieve(agent_id)


def _tool_params(tools: list[Json]) -> list[Any]:
    """Rebuild tool params from stored (resolved) tools, for cross-field checks."""
    from pydantic import TypeAdapter

    from .models import ToolParam

    adapter: TypeAdapter[Any] = TypeAdapter(ToolParam)
    params = []
    for tool in tools:
        if tool["type"] == "agent_toolset_20260401":
            params.append(AgentToolset(type="agent_toolset_20260401"))
        else:
            params.append(adapter.validate_python(tool))
    return params
