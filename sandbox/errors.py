"""Errors raised by sandbox backends, and the one place Docker's errors are translated.

Tree::

    SandboxError                  (op, retryable)
    ├── SandboxUnavailable        the backend itself cannot be reached (daemon down, no bwrap)
    ├── SandboxNotFound           the sandbox (container) no longer exists
    ├── ImageNotFound             the configured image is not present
    ├── SandboxExecError          a command could not be started or its channel broke
    ├── SandboxPathError          a path is invalid or escapes the allowed roots
    └── ImageBuildError           building an image failed
        └── EnvironmentBuildError an environment image step failed (names it, shows output)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar


class SandboxError(Exception):
    """Root of every error a sandbox backend raises."""

    code: ClassVar[str] = "sandbox_error"

    def __init__(self, message: str, *, op: str = "", retryable: bool = False) -> None:
        super().__init__(message)
        self.op = op
        self.retryable = retryable


class SandboxUnavailable(SandboxError):
    """The backend cannot be reached (e.g. the Docker daemon is down)."""

    code = "sandbox_unavailable"


class SandboxNotFound(SandboxError, LookupError):
    """The sandbox no longer exists."""

    code = "sandbox_not_found"


class ImageNotFound(SandboxError, LookupError):
    """The image a sandbox should start from is not present."""

    code = "image_not_found"


class SandboxExecError(SandboxError):
    """A command could not be started, or the channel to it broke."""

    code = "sandbox_exec_error"


class SandboxPathError(SandboxError, ValueError):
    """A path is malformed or outside the roots the caller may touch."""

    code = "sandbox_path_error"


class ImageBuildError(SandboxError):
    """Building an image failed."""

    code = "image_build_error"


class EnvironmentBuildError(ImageBuildError):
    """An environment image failed to build; the message names the step and its last lines."""

    code = "environment_build_error"


@contextlib.contextmanager
def map_docker_errors(op: str, *, image: str | None = None) -> Iterator[None]:
    """Translate docker-py and transport errors raised inside the block into `SandboxError`s.

    The most specific match wins; the original exception is chained.
    """
    import docker.errors
    import requests.exceptions

    try:
        yield
    except docker.errors.ImageNotFound as exc:
        msg = (
            f"image {image!r} is not present on the Docker daemon; build it with "
            "`managed-agents-mcp image build` (or `--offline`), or set MANAGED_AGENTS_IMAGE"
            if image
            else f"{op}: image not found: {exc.explanation}"
        )
        raise ImageNotFound(msg, op=op) from exc
    except docker.errors.NotFound as exc:
        msg = f"{op}: not found: {exc.explanation}"
        raise SandboxNotFound(msg, op=op) from exc
    except docker.errors.APIError as exc:
        msg = f"{op}: Docker refused the request: {exc.explanation or exc}"
        raise SandboxError(msg, op=op, retryable=exc.is_server_error()) from exc
    except (requests.exceptions.ConnectionError, ConnectionError, FileNotFoundError) as exc:
        _close_failed_connect_sockets(exc)
        msg = (
            f"{op}: the Docker daemon is not reachable ({type(exc).__name__}); start Docker "
            "or point DOCKER_HOST at a running daemon"
        )
        raise SandboxUnavailable(msg, op=op, retryable=True) from exc
    except docker.errors.DockerException as exc:
        msg = (
            f"{op}: the Docker daemon is not reachable ({exc}); start Docker or point "
            "DOCKER_HOST at a running daemon"
        )
        raise SandboxUnavailable(msg, op=op, retryable=True) from exc


def _close_failed_connect_sockets(exc: BaseException) -> None:
    """Close the sockets docker-py leaves open when connecting fails.

    `docker/transport/unixconn.py` creates a socket per connection attempt and does not close
    it when `connect()` raises, so with the daemon down every call would leak a descriptor
    until garbage collection. The socket is still reachable from the failed frame.
    """
    import socket

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        tb = current.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name == "connect":
                sock = tb.tb_frame.f_locals.get("sock")
                if isinstance(sock, socket.socket):
                    sock.close()
            tb = tb.tb_next
        current = current.__cause__ or current.__context__
