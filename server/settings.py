"""Server settings, read once from the environment.

| variable | default | meaning |
|---|---|---|
| `MANAGED_AGENTS_HOME` | `~/.local/share/managed-agents-mcp` (see `default_home`) | data dir |
| `MANAGED_AGENTS_IMAGE` | `managed-agents-sandbox:latest` | image for session containers |
| `DOCKER_HOST` | docker's default socket | Docker daemon to use |
| `ANTHROPIC_API_KEY`, `ANTHROPIC_BASE_URL` | — | passed to the anthropic SDK |
| `MANAGED_AGENTS_MAX_TOKENS` | 16000 | `max_tokens` of each model request |
| `MANAGED_AGENTS_MODEL_RETRIES` | 4 | retries of an overloaded/rate-limited model request |
| `MANAGED_AGENTS_RETRY_DELAY` | 1.0 | first retry delay in seconds (doubles each time) |
| `MANAGED_AGENTS_MAX_MODEL_REQUESTS` | 200 | model requests per turn before the turn is stopped |
| `MANAGED_AGENTS_MEMORY_MB`, `_CPUS`, `_PIDS` | 2048, 2, 512 | default container limits |
| `MANAGED_AGENTS_MAX_UPLOAD_MB` | 500 | largest file `upload_file` accepts |

Empty values count as unset (MCPB hosts substitute empty strings for blank optional fields).
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
    docker_host: str | None = None
    anthropic_api_key: str | None = None
    anthropic_base_url: str | None = None
    max_tokens: int = 16000
    model_retries: int = 4
    retry_delay: float = 1.0
    max_model_requests: int = 200
    max_tool_timeout: float = 600.0
    max_upload_bytes: int = 500 << 20
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
            docker_host=_get(env, "DOCKER_HOST"),
            anthropic_api_key=_get(env, "ANTHROPIC_API_KEY"),
            anthropic_base_url=_get(env, "ANTHROPIC_BASE_URL"),
            max_tokens=int(_number(env, "MANAGED_AGENTS_MAX_TOKENS", 16000)),
            model_retries=int(_number(env, "MANAGED_AGENTS_MODEL_RETRIES", 4)),
            retry_delay=_number(env, "MANAGED_AGENTS_RETRY_DELAY", 1.0),
            max_model_requests=int(_number(env, "MANAGED_AGENTS_MAX_MODEL_REQUESTS", 200)),
            max_upload_bytes=int(_number(env, "MANAGED_AGENTS_MAX_UPLOAD_MB", 500) * (1 << 20)),
            limits=limits,
        )
        return replace(settings, **overrides) if overrides else settings  # type: ignore[arg-type]

    @property
    def database_path(self) -> Path:
        return self.home / "managed-agents.db"
