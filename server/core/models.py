"""Request models of the Managed Agents API, validated at every boundary (MCP tools, REST).

Field names, `type` strings and limits follow the hosted API (beta `managed-agents-2026-04-01`).
Field docstrings become the JSON-schema descriptions an MCP client's model reads.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BUILTIN_TOOL_NAMES = ("bash", "read", "write", "edit", "glob", "grep", "web_fetch", "web_search")
"""The tools of `agent_toolset_20260401`, in the API's order."""

METADATA_MAX_PAIRS = 16
METADATA_MAX_KEY = 64
METADATA_MAX_VALUE = 512
MAX_TOOLS = 256
MAX_MCP_SERVERS = 20
MAX_SKILLS = 20
MAX_INITIAL_EVENTS = 50


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def check_metadata(value: dict[str, Any] | None, *, allow_null: bool = False) -> None:
    """Enforce the API's metadata limits: ≤16 pairs, keys ≤64 chars, string values ≤512 chars."""
    if value is None:
        return
    if len(value) > METADATA_MAX_PAIRS:
        msg = f"metadata may have at most {METADATA_MAX_PAIRS} keys, got {len(value)}"
        raise ValueError(msg)
    for key, item in value.items():
        if not key or len(key) > METADATA_MAX_KEY:
            msg = f"metadata keys must be 1-{METADATA_MAX_KEY} characters: {key[:80]!r}"
            raise ValueError(msg)
        if item is None and allow_null:
            continue
        if not isinstance(item, str):
            msg = f"metadata[{key!r}] must be a string"
            raise ValueError(msg)
        if len(item) > METADATA_MAX_VALUE:
            msg = f"metadata[{key!r}] is longer than {METADATA_MAX_VALUE} characters"
            raise ValueError(msg)


# --------------------------------------------------------------------------------------- agents


class ModelConfig(_Params):
    """The model an agent runs on, in object form."""

    id: Annotated[str, Field(min_length=1, max_length=256)]
    """Model id, e.g. `claude-sonnet-4-6`."""
    speed: Literal["standard", "fast"] = "standard"
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None


class PermissionPolicy(_Params):
    """Whether a tool call runs at once (`always_allow`) or waits for a `user.tool_confirmation`."""

    type: Literal["always_allow", "always_ask"]


class ToolsetDefaultConfig(_Params):
    enabled: bool | None = None
    """Default for every tool of the toolset (default true)."""
    permission_policy: PermissionPolicy | None = None


class BuiltinToolConfig(BaseModel):
    """Per-tool override inside `agent_toolset_20260401.configs`."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)

    name: Literal["bash", "read", "write", "edit", "glob", "grep", "web_fetch", "web_search"]
    type: str | None = None
    enabled: bool | None = None
    permission_policy: PermissionPolicy | None = None

    @model_validator(mode="after")
    def _type_matches(self) -> BuiltinToolConfig:
        if self.type is not None and self.type != self.name:
            msg = f"configs entry type {self.type!r} must equal its name {self.name!r}"
            raise ValueError(msg)
        return self


class AgentToolset(_Params):
    """The built-in tools (bash, read, write, edit, glob, grep, web_fetch, web_search)."""

    type: Literal["agent_toolset_20260401"]
    default_config: ToolsetDefaultConfig | None = None
    configs: list[BuiltinToolConfig] | None = None


class McpToolConfig(_Params):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    enabled: bool | None = None
    permission_policy: PermissionPolicy | None = None


class McpToolset(_Params):
    """Tools of one MCP server declared in `mcp_servers` (default policy `always_ask`)."""

    type: Literal["mcp_toolset"]
    mcp_server_name: Annotated[str, Field(min_length=1, max_length=255)]
    default_config: ToolsetDefaultConfig | None = None
    configs: list[McpToolConfig] | None = None


class CustomTool(_Params):
    """A tool the client executes: the session idles with `requires_action` until answered."""

    type: Literal["custom"]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
    description: Annotated[str, Field(max_length=10_000)] = ""
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})

    @field_validator("input_schema")
    @classmethod
    def _object_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("type") != "object":
            msg = 'input_schema must be a JSON schema with "type": "object"'
            raise ValueError(msg)
        return value


ToolParam = Annotated[AgentToolset | McpToolset | CustomTool, Field(discriminator="type")]


class McpServerParam(_Params):
    """A remote MCP server the agent may use (streamable HTTP)."""

    type: Literal["url"]
    name: Annotated[str, Field(min_length=1, max_length=255)]
    url: Annotated[str, Field(min_length=1, max_length=2048)]


class SkillParam(_Params):
    type: Literal["anthropic", "custom"]
    skill_id: Annotated[str, Field(min_length=1, max_length=256)]
    version: str | None = None


def check_agent_shape(tools: list[Any] | None, mcp_servers: list[McpServerParam] | None) -> None:
    """Cross-field rules: unique names, every MCP server referenced by exactly one toolset."""
    tools = tools or []
    servers = mcp_servers or []
    if len(tools) > MAX_TOOLS:
        msg = f"an agent may have at most {MAX_TOOLS} tools, got {len(tools)}"
        raise ValueError(msg)
    names = [s.name for s in servers]
    if len(names) != len(set(names)):
        msg = "mcp_servers names must be unique"
        raise ValueError(msg)
    toolset_servers = [t.mcp_server_name for t in tools if isinstance(t, McpToolset)]
    if len(toolset_servers) != len(set(toolset_servers)):
        msg = "each MCP server may be referenced by only one mcp_toolset"
        raise ValueError(msg)
    missing = sorted(set(toolset_servers) - set(names))
    if missing:
        msg = f"mcp_toolset refers to unknown mcp_servers {missing}; declare them in mcp_servers"
        raise ValueError(msg)
    unused = sorted(set(names) - set(toolset_servers))
    if unused:
        msg = f"mcp_servers {unused} have no mcp_toolset; add one per server in tools"
        raise ValueError(msg)
    toolsets = [t for t in tools if isinstance(t, AgentToolset)]
    if len(toolsets) > 1:
        msg = "tools may contain agent_toolset_20260401 only once"
        raise ValueError(msg)
    custom = [t.name for t in tools if isinstance(t, CustomTool)]
    if len(custom) != len(set(custom)):
        msg = "custom tool names must be unique"
        raise ValueError(msg)
    clash = sorted(set(custom) & set(BUILTIN_TOOL_NAMES)) if toolsets else []
    if clash:
        msg = f"custom tools {clash} clash with built-in tool names"
        raise ValueError(msg)


class AgentCreateParams(_Params):
    """A new agent: a versioned configuration (model, system prompt, tools, ...)."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    """Human-readable name, 1-256 characters."""
    model: str | ModelConfig
    """Model id such as `claude-sonnet-4-6`, or `{id, speed}`."""
    system: Annotated[str, Field(max_length=100_000)] | None = None
    """System prompt (≤100,000 characters)."""
    description: Annotated[str, Field(max_length=2048)] | None = None
    tools: list[ToolParam] = Field(default_factory=list)
    """Toolsets and custom tools; `[{"type": "agent_toolset_20260401"}]` gives the built-ins."""
    mcp_servers: Annotated[list[McpServerParam], Field(max_length=MAX_MCP_SERVERS)] = Field(
        default_factory=list
    )
    skills: Annotated[list[SkillParam], Field(max_length=MAX_SKILLS)] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    """Up to 16 string pairs (keys ≤64, values ≤512 characters)."""

    @model_validator(mode="after")
    def _rules(self) -> AgentCreateParams:
        check_metadata(self.metadata)
        check_agent_shape(self.tools, self.mcp_servers)
        return self


class AgentUpdateParams(_Params):
    """Changes to an agent: omitted fields are kept, arrays replace whole, metadata merges."""

    version: int | None = None
    """The version you are updating from; a mismatch is a conflict (optimistic concurrency)."""
    name: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    model: str | ModelConfig | None = None
    system: Annotated[str, Field(max_length=100_000)] | None = None
    description: Annotated[str, Field(max_length=2048)] | None = None
    tools: list[ToolParam] | None = None
    mcp_servers: Annotated[list[McpServerParam], Field(max_length=MAX_MCP_SERVERS)] | None = None
    skills: Annotated[list[SkillParam], Field(max_length=MAX_SKILLS)] | None = None
    metadata: dict[str, str | None] | None = None
    """Per-key patch: a string sets the key, null deletes it."""

    @model_validator(mode="after")
    def _rules(self) -> AgentUpdateParams:
        check_metadata(self.metadata, allow_null=True)
        return self


# --------------------------------------------------------------------------------- environments


_PACKAGE_SPEC = re.compile(r"^[A-Za-z0-9@][A-Za-z0-9._+\-/@:=<>~!*,\[\]]{0,213}$")


class Packages(_Params):
    """Packages installed into the environment's image (order: apt, cargo, gem, go, npm, pip)."""

    type: Literal["packages"] = "packages"
    apt: list[str] = Field(default_factory=list)
    cargo: list[str] = Field(default_factory=list)
    gem: list[str] = Field(default_factory=list)
    go: list[str] = Field(default_factory=list)
    npm: list[str] = Field(default_factory=list)
    pip: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _safe_specs(self) -> Packages:
        for manager in ("apt", "cargo", "gem", "go", "npm", "pip"):
            for spec in getattr(self, manager):
                if not _PACKAGE_SPEC.match(spec) or spec.startswith("-") or ".." in spec:
                    msg = (
                        f"{manager} package {spec[:80]!r} is not a plain package spec "
                        "(name with an optional version pin, no options, paths or spaces)"
                    )
                    raise ValueError(msg)
        return self


class UnrestrictedNetwork(_Params):
    type: Literal["unrestricted"]


class LimitedNetwork(_Params):
    """Deny by default; only `allowed_hosts` (exact names or `*.` wildcards) are reachable."""

    type: Literal["limited"]
    allowed_hosts: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        default_factory=list
    )
    allow_mcp_servers: bool = False
    allow_package_managers: bool = False

    @field_validator("allowed_hosts")
    @classmethod
    def _bare_hosts(cls, hosts: list[str]) -> list[str]:
        pattern = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*$")
        for host in hosts:
            if not pattern.match(host):
                msg = (
                    f"allowed_hosts entry {host[:80]!r} must be a bare hostname or `*.domain` "
                    "(no scheme, port or path)"
                )
                raise ValueError(msg)
        return hosts


NetworkingParam = Annotated[UnrestrictedNetwork | LimitedNetwork, Field(discriminator="type")]


class EnvironmentLimits(_Params):
    """Resource limits of each session container (local extension; server defaults apply)."""

    memory_mb: Annotated[int, Field(ge=64, le=262_144)] | None = None
    cpus: Annotated[float, Field(gt=0, le=256)] | None = None
    pids: Annotated[int, Field(ge=16, le=1_000_000)] | None = None
    tmp_mb: Annotated[int, Field(ge=1, le=262_144)] | None = None
    """Size of the /tmp tmpfs."""
    outputs_mb: Annotated[int, Field(ge=1, le=262_144)] | None = None
    """Size of the /mnt/session/outputs tmpfs."""
    workspace_mb: Annotated[int, Field(ge=16, le=16_777_216)] | None = None
    """How much /workspace may hold (default 10 GiB). Over it, commands cannot write files
    until the agent deletes some; no single file can be larger (on Docker)."""
    command_timeout_s: Annotated[float, Field(gt=0, le=86_400)] | None = None
    """Longest a single bash command may run (the model may ask for less)."""
    turn_timeout_s: Annotated[float, Field(gt=0, le=604_800)] | None = None
    """Longest a turn may run before it is stopped (wall clock)."""


class CloudConfig(_Params):
    """How session containers of this environment are built and networked.

    `image`, `dockerfile` and `limits` are local extensions of this server (the hosted API has
    no such fields): a base image instead of the default sandbox image, Dockerfile instructions
    applied before the packages, and per-container limits.
    """

    type: Literal["cloud"] = "cloud"
    packages: Packages | None = None
    networking: NetworkingParam = Field(
        default_factory=lambda: UnrestrictedNetwork(type="unrestricted")
    )
    image: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    """Local extension: the base image (default: the server's sandbox image)."""
    dockerfile: Annotated[str, Field(min_length=1, max_length=65_536)] | None = None
    """Local extension: Dockerfile instructions run (as root) on top of the base image before
    the packages, e.g. `RUN apt-get update && apt-get install -y jq`. May not contain FROM."""
    limits: EnvironmentLimits | None = None
    """Local extension: limits of each session container."""

    @field_validator("dockerfile")
    @classmethod
    def _no_from(cls, value: str | None) -> str | None:
        if value and re.search(r"(?im)^\s*FROM\s", value):
            msg = "dockerfile must not contain FROM; name the base image in `image` instead"
            raise ValueError(msg)
        return value


class EnvironmentCreateParams(_Params):
    """A new environment: the recipe for every session container that references it."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    """Unique name."""
    description: Annotated[str, Field(max_length=2048)] | None = None
    config: CloudConfig = Field(default_factory=CloudConfig)
    metadata: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _rules(self) -> EnvironmentCreateParams:
        check_metadata(self.metadata)
        return self


class EnvironmentUpdateParams(_Params):
    """Changes to an environment; omitted fields are kept. Applies to new containers only."""

    name: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    description: Annotated[str, Field(max_length=2048)] | None = None
    config: CloudConfig | None = None
    metadata: dict[str, str | None] | None = None

    @model_validator(mode="after")
    def _rules(self) -> EnvironmentUpdateParams:
        check_metadata(self.metadata, allow_null=True)
        return self


# ------------------------------------------------------------------------------- content blocks


class TextBlock(_Params):
    type: Literal["text"]
    text: str


class Base64Source(_Params):
    type: Literal["base64"]
    media_type: str
    data: str


class UrlSource(_Params):
    type: Literal["url"]
    url: Annotated[str, Field(min_length=1, max_length=8192)]


class FileSource(_Params):
    type: Literal["file"]
    file_id: str


class PlainTextSource(_Params):
    type: Literal["text"]
    media_type: Literal["text/plain"] = "text/plain"
    data: str


class ImageBlock(_Params):
    type: Literal["image"]
    source: Annotated[Base64Source | UrlSource | FileSource, Field(discriminator="type")]


class DocumentBlock(_Params):
    type: Literal["document"]
    source: Annotated[
        Base64Source | PlainTextSource | UrlSource | FileSource, Field(discriminator="type")
    ]
    title: str | None = None
    context: str | None = None


ContentBlock = Annotated[TextBlock | ImageBlock | DocumentBlock, Field(discriminator="type")]


def _text_content(value: Any) -> Any:
    """Accept a bare string where the API wants `[{"type": "text", "text": ...}]`."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    return value


# ----------------------------------------------------------------------------------- user events


class UserMessageEvent(_Params):
    """A message from the user; starts (or steers) a turn."""

    type: Literal["user.message"]
    content: Annotated[list[ContentBlock], Field(min_length=1)]
    """Content blocks (text, image, document); a plain string is accepted as one text block."""

    _content = field_validator("content", mode="before")(_text_content)


class UserInterruptEvent(_Params):
    """Stop the current turn: the model stream and any running command are cancelled."""

    type: Literal["user.interrupt"]
    session_thread_id: str | None = None


class UserToolConfirmationEvent(_Params):
    """Allow or deny a tool call that is waiting with `evaluated_permission: "ask"`."""

    type: Literal["user.tool_confirmation"]
    tool_use_id: str
    """The `sevt_…` id of the waiting `agent.tool_use` / `agent.mcp_tool_use` event."""
    result: Literal["allow", "deny"]
    deny_message: str | None = None
    """Told to the model when the call is denied."""
    session_thread_id: str | None = None


class UserCustomToolResultEvent(_Params):
    """The result of an `agent.custom_tool_use`, which your client executed."""

    type: Literal["user.custom_tool_result"]
    custom_tool_use_id: str
    """The `sevt_…` id of the `agent.custom_tool_use` event."""
    content: list[ContentBlock] = Field(default_factory=list)
    is_error: bool = False
    session_thread_id: str | None = None

    _content = field_validator("content", mode="before")(_text_content)


class SystemMessageEvent(_Params):
    """Extra system context appended mid-session."""

    type: Literal["system.message"]
    content: Annotated[list[TextBlock], Field(min_length=1, max_length=1000)]

    _content = field_validator("content", mode="before")(_text_content)


UserEvent = Annotated[
    UserMessageEvent
    | UserInterruptEvent
    | UserToolConfirmationEvent
    | UserCustomToolResultEvent
    | SystemMessageEvent,
    Field(discriminator="type"),
]


# -------------------------------------------------------------------------------------- sessions


class AgentRef(_Params):
    """Pin a session to an agent version (latest when `version` is omitted)."""

    type: Literal["agent"]
    id: str
    version: int | None = None


class AgentWithOverrides(_Params):
    """An agent with session-local replacements (they do not create agent versions)."""

    type: Literal["agent_with_overrides"]
    id: str
    version: int | None = None
    model: str | ModelConfig | None = None
    system: Annotated[str, Field(max_length=100_000)] | None = None
    tools: list[ToolParam] | None = None
    mcp_servers: Annotated[list[McpServerParam], Field(max_length=MAX_MCP_SERVERS)] | None = None
    skills: Annotated[list[SkillParam], Field(max_length=MAX_SKILLS)] | None = None


AgentSelector = str | Annotated[AgentRef | AgentWithOverrides, Field(discriminator="type")]


class FileResourceParam(_Params):
    """Mount an uploaded file read-only into the session container."""

    type: Literal["file"]
    file_id: str
    mount_path: str | None = None
    """Absolute path in the container; default `/mnt/session/uploads/<file_id>`."""


class SessionCreateParams(_Params):
    """A new session: an agent (version) working in a container built from an environment."""

    agent: AgentSelector
    """An agent id (latest version), `{type: "agent", id, version}` or
    `{type: "agent_with_overrides", id, ...}`."""
    environment_id: str
    title: Annotated[str, Field(max_length=512)] | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    resources: list[FileResourceParam] = Field(default_factory=list)
    vault_ids: list[str] = Field(default_factory=list)
    initial_events: Annotated[list[UserMessageEvent], Field(max_length=MAX_INITIAL_EVENTS)] = Field(
        default_factory=list
    )
    """Up to 50 `user.message` events; when given, the session starts running at once."""

    @model_validator(mode="after")
    def _rules(self) -> SessionCreateParams:
        check_metadata(self.metadata)
        if self.vault_ids:
            msg = "vault_ids are not supported by this server; omit them"
            raise ValueError(msg)
        return self


class SessionAgentUpdate(_Params):
    """Session-local replacement of the agent's tools (applies from the next turn)."""

    tools: list[ToolParam] | None = None
    mcp_servers: Annotated[list[McpServerParam], Field(max_length=MAX_MCP_SERVERS)] | None = None


class SessionUpdateParams(_Params):
    """Changes to a session: title, metadata (per-key patch) and, while idle, its tools."""

    title: Annotated[str, Field(max_length=512)] | None = None
    metadata: dict[str, str | None] | None = None
    agent: SessionAgentUpdate | None = None

    @model_validator(mode="after")
    def _rules(self) -> SessionUpdateParams:
        check_metadata(self.metadata, allow_null=True)
        return self
