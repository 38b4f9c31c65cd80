"""Paths inside a session container, as the API names them, and the rules for client access."""

from __future__ import annotations

import posixpath

from .errors import InvalidRequestError

WORKSPACE = "/workspace"
UPLOADS_DIR = "/mnt/session/uploads"
OUTPUTS_DIR = "/mnt/session/outputs"
READABLE_ROOTS = (WORKSPACE, "/mnt/session", "/tmp", "/home/agent")
"""Where a client may read files from a session's container."""


def container_path(path: str, *, roots: tuple[str, ...] = READABLE_ROOTS) -> str:
    """Normalise a client-supplied container path and check it lies under `roots`.

    Relative paths are taken from /workspace.

    Raises:
        InvalidRequestError: the path is empty, has a NUL byte, or leaves the allowed roots.
    """
    if not path or "\x00" in path or len(path) > 4096:
        msg = "path must be a non-empty container path without NUL bytes (at most 4096 chars)"
        raise InvalidRequestError(msg)
    joined = path if path.startswith("/") else posixpath.join(WORKSPACE, path)
    normal = posixpath.normpath(joined)
    if not any(normal == r or normal.startswith(r + "/") for r in roots):
        msg = f"path {path!r} is outside the session's files; use a path under " + ", ".join(roots)
        raise InvalidRequestError(msg)
    return normal
