"""File reads and writes inside a sandbox, built on its one-shot `exec` (shared by all backends)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .base import ExecResult
from .errors import SandboxPathError

Exec = Callable[..., Awaitable[ExecResult]]

# $1 path, $2 byte limit, $3.. allowed roots (none: anywhere). The real path (symlinks resolved)
# must lie under a root, so a link in the workspace cannot reach the rest of the sandbox.
READ_FILE_SCRIPT = (
    'f=$1; max=$2; shift 2; [ -e "$f" ] || exit 3; '
    'if [ $# -gt 0 ]; then r=$(realpath -e -- "$f") || exit 3; ok=; '
    'for root in "$@"; do case "$r/" in "$root"/*) ok=1;; esac; done; [ -n "$ok" ] || exit 6; '
    "f=$r; fi; "
    '[ -f "$f" ] || exit 4; '
    'n=$(wc -c < "$f"); [ "$n" -le "$max" ] || { echo "$n"; exit 5; }; exec cat -- "$f"'
)
# $1 path, $2 offset, $3 length, $4.. allowed roots: prints the size on a line, then the bytes.
READ_RANGE_SCRIPT = (
    'f=$1; off=$2; len=$3; shift 3; [ -e "$f" ] || exit 3; '
    'if [ $# -gt 0 ]; then r=$(realpath -e -- "$f") || exit 3; ok=; '
    'for root in "$@"; do case "$r/" in "$root"/*) ok=1;; esac; done; [ -n "$ok" ] || exit 6; '
    "f=$r; fi; "
    '[ -f "$f" ] || exit 4; n=$(wc -c < "$f"); [ "$off" -le "$n" ] || { echo "$n"; exit 7; }; '
    'echo "$n"; tail -c +$((off + 1)) -- "$f" | head -c "$len"'
)
WRITE_FILE_SCRIPT = (
    'd=$(dirname -- "$1"); mkdir -p -- "$d" && cat > "$1" && { [ -z "$2" ] || chmod "$2" "$1"; }'
)


async def read_file(exec_: Exec, path: str, *, max_bytes: int, roots: Sequence[str] = ()) -> bytes:
    """See `Sandbox.read_file`."""
    result = await exec_(
        ["sh", "-c", READ_FILE_SCRIPT, "sh", path, str(max_bytes), *roots],
        max_output=max_bytes + 4096,
    )
    if result.exit_code == 0:
        return result.stdout
    reasons: dict[int, Any] = {
        3: "no such file",
        4: "not a regular file",
        5: f"file is {result.stdout.decode().strip()} bytes, over the {max_bytes}-byte limit",
        6: "resolves (through a symlink) outside the allowed directories " + ", ".join(roots),
    }
    reason = reasons.get(result.exit_code) or result.stderr.decode(errors="replace").strip()
    msg = f"{path}: {reason or f'cannot read (exit {result.exit_code})'}"
    raise SandboxPathError(msg, op="read_file")


async def read_range(
    exec_: Exec, path: str, *, offset: int, length: int, roots: Sequence[str] = ()
) -> tuple[bytes, int]:
    """Up to `length` bytes of a file from byte `offset`, and the file's total size."""
    result = await exec_(
        ["sh", "-c", READ_RANGE_SCRIPT, "sh", path, str(offset), str(length), *roots],
        max_output=length + 4096,
    )
    if result.exit_code == 0:
        size, _, data = result.stdout.partition(b"\n")
        return data, int(size)
    reasons: dict[int, Any] = {
        3: "no such file",
        4: "not a regular file",
        6: "resolves (through a symlink) outside the allowed directories " + ", ".join(roots),
        7: f"offset {offset} is past the end of the file ({result.stdout.decode().strip()} bytes)",
    }
    reason = reasons.get(result.exit_code) or result.stderr.decode(errors="replace").strip()
    msg = f"{path}: {reason or f'cannot read (exit {result.exit_code})'}"
    raise SandboxPathError(msg, op="read_file")


async def write_file(
    exec_: Exec, path: str, data: bytes, *, user: str | None = None, mode: int | None = None
) -> None:
    """See `Sandbox.write_file`."""
    mode_arg = f"{mode:o}" if mode is not None else ""
    result = await exec_(
        ["sh", "-c", WRITE_FILE_SCRIPT, "sh", path, mode_arg], user=user, stdin=data
    )
    if result.exit_code != 0:
        reason = result.stderr.decode(errors="replace").strip() or f"exit {result.exit_code}"
        msg = f"{path}: cannot write: {reason}"
        raise SandboxPathError(msg, op="write_file")
