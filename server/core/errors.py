"""Domain errors, each carrying the Managed Agents API error type and HTTP status.

Tree::

    ManagedAgentsError            api_error             500
    ├── InvalidRequestError       invalid_request_error 400
    │   └── ConflictError         invalid_request_error 409  (version mismatch, duplicate name,
    │                                                         wrong state)
    ├── NotFoundError             not_found_error       404
    ├── PermissionDeniedError     permission_error      403
    ├── RequestTooLargeError      request_too_large     413
    └── BackendUnavailableError   api_error             503  (Docker or the sandbox is down)

Messages say what was wrong and what to do next: the MCP client's model reads them verbatim.
"""

from __future__ import annotations

import re
from typing import ClassVar

_LONG_WORD = re.compile(r"\S{121,}")


def _clip_echoes(message: str) -> str:
    """Shorten very long words (echoed ids, paths, values) so an error stays readable."""
    return _LONG_WORD.sub(lambda m: f"{m[0][:60]}…({len(m[0])} characters)", message)


class ManagedAgentsError(Exception):
    """Root of every error the domain raises on purpose.

    Messages often echo what the caller sent; very long words in them are clipped so that a
    5,000-character id cannot flood the reader.
    """

    code: ClassVar[str] = "api_error"
    status: ClassVar[int] = 500

    def __init__(self, *args: object) -> None:
        if args and isinstance(args[0], str):
            args = (_clip_echoes(args[0]), *args[1:])
        super().__init__(*args)


class InvalidRequestError(ManagedAgentsError, ValueError):
    """The request is malformed or not allowed in the resource's current state."""

    code = "invalid_request_error"
    status = 400


class ConflictError(InvalidRequestError):
    """The request conflicts with the current state (stale version, duplicate name, busy)."""

    status = 409


class NotFoundError(ManagedAgentsError, LookupError):
    """The named resource does not exist (or was deleted)."""

    code = "not_found_error"
    status = 404


class PermissionDeniedError(ManagedAgentsError):
    """The caller may not do this."""

    code = "permission_error"
    status = 403


class RequestTooLargeError(ManagedAgentsError):
    """The request or upload exceeds a configured size limit."""

    code = "request_too_large"
    status = 413


class BackendUnavailableError(ManagedAgentsError):
    """The sandbox backend (Docker) cannot be used right now."""

    status = 503
