"""managed-agents-mcp execution plane: sandbox backends. Knows nothing of `server`."""

from .base import ExecResult, Limits, Sandbox, SandboxBackend, SandboxInfo, SandboxSpec, ShellResult
from .errors import (
    ImageNotFound,
    SandboxError,
    SandboxExecError,
    SandboxNotFound,
    SandboxPathError,
    SandboxUnavailable,
)

__all__ = [
    "ExecResult",
    "ImageNotFound",
    "Limits",
    "Sandbox",
    "SandboxBackend",
    "SandboxError",
    "SandboxExecError",
    "SandboxInfo",
    "SandboxNotFound",
    "SandboxPathError",
    "SandboxSpec",
    "SandboxUnavailable",
    "ShellResult",
]
