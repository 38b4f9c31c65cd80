"""Which server processes are alive: each holds an exclusive `flock` on its own lock file.

Several stdio servers (one per MCP client window) may share a data directory. A session is
owned by the process that runs its agent loop; when that process dies, the kernel drops its
lock and any other process may take the session over.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from .ids import new_id


class InstanceRegistry:
    """This process's identity and a liveness check for the others."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._dir.mkdir(parents=True, exist_ok=True)
        self.id = new_id("inst")
        self._fd: int | None = os.open(self._path(self.id), os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(self._fd, str(os.getpid()).encode())

    def _path(self, instance_id: str) -> Path:
        return self._dir / f"{instance_id}.lock"

    def is_alive(self, instance_id: str | None) -> bool:
        """True while the process that registered `instance_id` is running."""
        if not instance_id:
            return False
        if instance_id == self.id:
            return self._fd is not None
        try:
            fd = os.open(self._path(instance_id), os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            self._path(instance_id).unlink()
        return False

    def close(self) -> None:
        """Release this process's lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path(self.id).unlink()
            os.close(fd)
