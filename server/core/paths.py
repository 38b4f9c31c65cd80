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


MAX_MOUNT_PATH = 1024


def mount_path(path: str | None, file_id: str) -> str:
    """Where a mounted file appears in the container.

    Paths are rooted under /mnt/session/uploads/ (the API's newer rule): `/data/x.csv` becomes
    `/mnt/session/uploads/data/x.csv`, and a path already under that directory stays as it is.
    The default is `/mnt/session/uploads/<file_id>`.

    Raises:
        InvalidRequestError: the path is relative, has `..`, control characters or is too long.
    """
    if path is None:
        return f"{UPLOADS_DIR}/{file_id}"
    problem = None
    if not path.startswith("/"):
        problem = "must be absolute (start with /)"
    elif len(path) > MAX_MOUNT_PATH:
        problem = f"is longer than {MAX_MOUNT_PATH} characters"
    elif any(not ch.isprintable() for ch in path):
        problem = "contains control characters"
    elif ".." in path.split("/"):
        problem = "must not contain '..'"
    elif path.rstrip("/") in ("", UPLOADS_DIR) or path.endswith("/"):
        problem = "must name a file, not a directory"
    if problem:
        msg = f"mount_path {path[:120]!r} {problem}; e.g. /mnt/session/uploads/data.csv"
        raise InvalidRequestError(msg)
    normal = posixpath.normpath(path)
    if normal.startswith(UPLOADS_DIR + "/"):
        return normal
    return posixpath.normpath(UPLOADS_DIR + normal)
