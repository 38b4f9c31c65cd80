"""Server settings, read once from the environment (`Settings.from_env`).

The variables and their defaults are listed in the README's Configuration section. Empty values
count as unset (MCPB hosts substitute empty strings for blank optional fields).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from sandbox.base import Limits
from sandbox.images import DEFAULT_IMAGE


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    value = _get(env, name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        msg = f"{name}={value!r} is not a number"
        raise SystemExit(msg) from None


BUILD_PASSTHROUGH = (
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_TRUSTED_HOST",
    "NPM_CONFIG_REGISTRY",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str:
    value = _get(env, name) or allowed[0]
    if value not in allowed:
        msg = f"{name}={value!r}: use one of {', '.join(allowed)}"
        raise SystemExit(msg)
    return value


def _pairs(env: Mapping[str, str], name: str) -> dict[str, str]:
    """`a=1.2.3.4,b=5.6.7.8` as a dict."""
    value = _get(env, name)
    if value is None:
        return {}
    pairs = {}
    for item in value.split(","):
        key, sep, address = item.strip().partition("=")
        if not sep or not key or not address:
            msg = f"{name}: {item!r} is not name=address"
            raise SystemExit(msg)
        pairs[key.strip()] = address.strip()
    return pairs


def _build_network(value: str | None) -> str | None:
    if value in (None, "auto"):
        return None
    if value not in ("host", "bridge", "none"):
        msg = f"MANAGED_AGENTS_BUILD_NETWORK={value!r}: use auto, host, bridge or none"
        raise SystemExit(msg)
    return value


def _read_ca_bundle(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        msg = f"MANAGED_AGENTS_CA_BUNDLE={path!r} cannot be read: {exc.strerror}"
        raise SystemExit(msg) from exc


def default_home() -> Path:
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "managed-agents-mcp"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable; build with `Settings.from_env()`."""

    home: Path = field(default_factory=default_home)
    image: str = DEFAULT_IMAGE
    sandbox: str = "auto"
    """`docker`, `bubblewrap` or `auto` (Docker when it answers, else bubblewrap)."""
    docker_host: str | None = None
    anthropic_api_key: str | None = None
    anthropic_base_url: str | None = None
    max_tokens: int = 16000
    model_retries: int = 4
    retry_delay: float = 1.0
    max_model_requests: int = 200
    """Model requests one user message may cause before its turn is stopped."""
    max_tool_calls: int = 500
    """Tool calls one user message may cause before its turn is stopped."""
    max_tool_timeout: float = 600.0
    max_upload_bytes: int = 500 << 20
    build_network: str | None = None
    """Network for image builds (None: the backend's choice)."""
    build_args: Mapping[str, str] = field(default_factory=dict)
    """Environment passed to image builds only (package indexes, proxies)."""
    ca_bundle: bytes | None = None
    warm_pool: int = 1
    """Ready containers kept per environment recipe (0 turns the pool off)."""
    default_model: str = "claude-sonnet-4-6"
    """Model of the built-in agent `run_task` uses when no agent is given."""
    token: str | None = None
    """HTTP token (MANAGED_AGENTS_TOKEN); generated into `<home>/token` when unset."""
    egress_hosts: Mapping[str, str] = field(default_factory=dict)
    """Names the egress proxy resolves to fixed addresses before asking DNS."""
    limits: Limits = field(default_factory=lambda: Limits(memory_bytes=2048 << 20, pids=512))
    poll_interval: float = 0.1
    """How often other processes' writes to the shared database are looked for."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if env is None else env
        home = _get(env, "MANAGED_AGENTS_HOME")
        limits = Limits(
            memory_bytes=int(_number(env, "MANAGED_AGENTS_MEMORY_MB", 2048)) << 20,
            cpus=_number(env, "MANAGED_AGENTS_CPUS", 2.0),
            pids=int(_number(env, "MANAGED_AGENTS_PIDS", 512)),
        )
        settings = cls(
            home=Path(home).expanduser() if home else default_home(),
            image=_get(env, "MANAGED_AGENTS_IMAGE") or DEFAULT_IMAGE,
            sandbox=_choice(env, "MANAGED_AGENTS_SANDBOX", ("auto", "docker", "bubblewrap")),
            docker_host=_get(env, "DOCKER_HOST"),
            anthropic_api_key=_get(env, "ANTHROPIC_API_KEY"),
            anthropic_base_url=_get(env, "ANTHROPIC_BASE_URL"),
            max_tokens=int(_number(env, "MANAGED_AGENTS_MAX_TOKENS", 16000)),
            model_retries=int(_number(env, "MANAGED_AGENTS_MODEL_RETRIES", 4)),
            retry_delay=_number(env, "MANAGED_AGENTS_RETRY_DELAY", 1.0),
            max_model_requests=int(_number(env, "MANAGED_AGENTS_MAX_MODEL_REQUESTS", 200)),
            max_tool_calls=int(_number(env, "MANAGED_AGENTS_MAX_TOOL_CALLS", 500)),
            max_upload_bytes=int(_number(env, "MANAGED_AGENTS_MAX_UPLOAD_MB", 500) * (1 << 20)),
            build_network=_build_network(_get(env, "MANAGED_AGENTS_BUILD_NETWORK")),
            build_args={k: v for k in BUILD_PASSTHROUGH if (v := _get(env, k) or "")},
            ca_bundle=_read_ca_bundle(_get(env, "MANAGED_AGENTS_CA_BUNDLE")),
            warm_pool=int(_number(env, "MANAGED_AGENTS_WARM_POOL", 1)),
            egress_hosts=_pairs(env, "MANAGED_AGENTS_EGRESS_HOSTS"),
            token=_get(env, "MANAGED_AGENTS_TOKEN"),
            default_model=_get(env, "MANAGED_AGENTS_DEFAULT_MODEL") or "claude-sonnet-4-6",
            limits=limits,
        )
        return replace(settings, **overrides) if overrides else settings  # type: ignore[arg-type]

    @property
    def database_path(self) -> Path:
        return self.home / "managed-agents.db"
