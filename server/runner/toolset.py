"""The `agent_toolset_20260401` tools (bash, read, write, edit, glob, grep), run inside a sandbox.

Semantics and limits follow the reference implementation in `anthropic.lib.tools.agent_toolset`:
a persistent bash shell (120 s default timeout, output capped at 100 KiB), file reads capped at
256 KiB unless a line range is asked for, images and PDFs returned as content blocks.
"""

from __future__ import annotations

import base64
import posixpath
import re
import shlex
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sandbox.base import WORKSPACE, Sandbox
from sandbox.errors import SandboxError, SandboxNotFound, SandboxPathError

Json = dict[str, Any]

BASH_OUTPUT_LIMIT = 100 * 1024
BASH_DEFAULT_TIMEOUT = 120.0
READ_LIMIT = 256 * 1024
RANGE_READ_LIMIT = 16 << 20
EDIT_LIMIT = 16 << 20
IMAGE_BASE64_LIMIT = 5 << 20
PDF_LIMIT = 20 << 20
GLOB_LIMIT = 200
SEARCH_OUTPUT_LIMIT = 100 * 1024
_MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".pdf": "application/pdf",
}


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BashInput(_Input):
    command: str | None = None
    restart: bool | None = None
    timeout_ms: int | None = Field(default=None, ge=0)


class ReadInput(_Input):
    file_path: str = Field(min_length=1)
    view_range: list[int] | None = Field(default=None, min_length=2, max_length=2)


class WriteInput(_Input):
    file_path: str = Field(min_length=1)
    content: str


class EditInput(_Input):
    file_path: str = Field(min_length=1)
    old_string: str
    new_string: str
    replace_all: bool | None = None


class GlobInput(_Input):
    pattern: str = Field(min_length=1)
    path: str | None = None


class GrepInput(_Input):
    pattern: str = Field(min_length=1)
    path: str | None = None


TOOL_DEFINITIONS: dict[str, Json] = {
    "bash": {
        "name": "bash",
        "description": (
            "Run a command in a persistent bash shell inside your sandbox (Linux container). "
            "The working directory, environment variables and background jobs persist between "
            "calls. stdin is /dev/null; stdout and stderr are merged; output beyond 100 KiB is "
            "truncated in the middle. Default timeout 120 s (set timeout_ms for longer work); "
            "a command that times out is killed. Set restart=true to get a fresh shell."
        ),
        "input_schema": {
            "type": "object",
            "properties": {
                "command": {"type": "string", "description": "The shell command to run."},
                "restart": {
                    "type": "boolean",
                    "description": "Restart the shell instead of running a command.",
                },
                "timeout_ms": {"type": "integer", "description": "Timeout in milliseconds."},
            },
        },
    },
    "read": {
        "name": "read",
        "description": (
            "Read a file. Paths are relative to /workspace unless absolute. Text files up to "
            "256 KiB (use view_range [start_line, end_line], 1-indexed inclusive, end 0 = EOF, "
            "for larger ones); .png/.jpg/.gif/.webp are returned as images, .pdf as a document."
        ),
        "input_schema": {
            "type": "object",
            "properties": {
                "file_path": {"type": "string", "description": "Path of the file to read."},
                "view_range": {
                    "type": "array",
                    "items": {"type": "integer"},
                    "description": "Optional [start_line, end_line], 1-indexed, inclusive.",
                },
            },
            "required": ["file_path"],
        },
    },
    "write": {
        "name": "write",
        "description": (
            "Create or overwrite a file with the given content, creating parent directories. "
            "Paths are relative to /workspace unless absolute. Put deliverables for the user in "
            "/mnt/session/outputs/."
        ),
        "input_schema": {
            "type": "object",
            "properties": {
                "file_path": {"type": "string", "description": "Path of the file to write."},
                "content": {"type": "string", "description": "The full new content."},
            },
            "required": ["file_path", "content"],
        },
    },
    "edit": {
        "name": "edit",
        "description": (
            "Replace text in a file by exact string match. old_string must occur exactly once "
            "unless replace_all is true."
        ),
        "input_schema": {
            "type": "object",
            "properties": {
                "file_path": {"type": "string", "description": "Path of the file to edit."},
                "old_string": {"type": "string", "description": "Exact text to replace."},
                "new_string": {"type": "string", "description": "Replacement text."},
                "replace_all": {
                    "type": "boolean",
                    "description": "Replace every occurrence instead of exactly one.",
                },
            },
            "required": ["file_path", "old_string", "new_string"],
        },
    },
    "glob": {
        "name": "glob",
        "description": (
            "List files matching a glob pattern (e.g. `**/*.py`), newest first, at most 200. "
            "The pattern is relative to `path` (default /workspace)."
        ),
        "input_schema": {
            "type": "object",
            "properties": {
                "pattern": {"type": "string", "description": "Glob pattern, `**` spans dirs."},
                "path": {"type": "string", "description": "Directory to search from."},
            },
            "required": ["pattern"],
        },
    },
    "grep": {
        "name": "grep",
        "description": (
            "Search file contents for a regular expression (ripgrep syntax) under `path` "
            "(default /workspace); returns matching lines as path:line:text."
        ),
        "input_schema": {
            "type": "object",
            "properties": {
                "pattern": {"type": "string", "description": "Regular expression."},
                "path": {"type": "string", "description": "File or directory to search."},
            },
            "required": ["pattern"],
        },
    },
}
SANDBOX_TOOLS = frozenset(TOOL_DEFINITIONS)


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """What goes back to the model as the tool_result."""

    content: list[Json]
    is_error: bool = False

    @classmethod
    def text(cls, text: str, *, is_error: bool = False) -> ToolOutcome:
        return cls([{"type": "text", "text": text or "(no output)"}], is_error)


class ToolFailure(Exception):
    """A tool failed in a way the model should see as an error result."""


def resolve_path(path: str) -> str:
    """Absolute, normalised path; relative paths are taken from /workspace."""
    if "\x00" in path:
        msg = "path contains a NUL byte"
        raise ToolFailure(msg)
    return posixpath.normpath(path if path.startswith("/") else posixpath.join(WORKSPACE, path))


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Translate a doublestar glob (`**`, `*`, `?`, `[...]`, `{a,b}`) into a full-match regex."""
    out: list[str] = []
    i, n, depth = 0, len(pattern), 0
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        elif c == "{":
            out.append("(?:")
            depth += 1
        elif c == "}" and depth:
            out.append(")")
            depth -= 1
        elif c == "," and depth:
            out.append("|")
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + ")" * depth)


class Toolset:
    """Runs built-in tool calls in one session's sandbox."""

    def __init__(self, sandbox: Sandbox, *, max_timeout: float = 600.0) -> None:
        self._sandbox = sandbox
        self._max_timeout = max_timeout

    async def run(self, name: str, tool_input: Json) -> ToolOutcome:
        """Run one tool call; every failure becomes an `is_error` outcome.

        Raises:
            SandboxNotFound: the sandbox is gone (nothing ran); re-attach and call again.
        """
        handler = getattr(self, f"_{name}", None)
        if name not in SANDBOX_TOOLS or handler is None:
            return ToolOutcome.text(f"unknown tool {name!r}", is_error=True)
        try:
            result: ToolOutcome = await handler(tool_input)
        except ValidationError as exc:
            details = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in exc.errors()
            )
            return ToolOutcome.text(f"{name}: invalid input: {details}", is_error=True)
        except ToolFailure as exc:
            return ToolOutcome.text(f"{name}: {exc}", is_error=True)
        except SandboxNotFound:
            raise  # nothing ran; the caller re-attaches the sandbox and tries again
        except SandboxError as exc:
            return ToolOutcome.text(f"{name}: {exc}", is_error=True)
        return result

    async def _bash(self, raw: Json) -> ToolOutcome:
        args = BashInput.model_validate(raw)
        if args.restart:
            await self._sandbox.restart_shell()
            return ToolOutcome.text("bash session restarted")
        if not args.command:
            msg = "command is required (or set restart=true)"
            raise ToolFailure(msg)
        timeout = args.timeout_ms / 1000 if args.timeout_ms else BASH_DEFAULT_TIMEOUT
        timeout = min(timeout, self._max_timeout)
        result = await self._sandbox.run_shell(
            args.command, timeout=timeout, output_limit=BASH_OUTPUT_LIMIT
        )
        notes: list[str] = []
        if result.shell_restarted:
            notes.append(
                "[note: the previous shell was lost, so this ran in a new shell: environment "
                "variables were reset; the working directory was kept]"
            )
        text = result.output
        if result.timed_out:
            notes.append(f"[command timed out after {timeout:g} s and was killed]")
        elif result.shell_exited:
            code = "" if result.exit_code is None else f" with exit code {result.exit_code}"
            notes.append(f"[the shell exited{code}; the next command starts a new shell]")
        elif result.exit_code not in (0, None):
            notes.append(f"[exit code {result.exit_code}]")
        body = "\n".join([*([text] if text else []), *notes]) or "(no output)"
        failed = (
            result.timed_out
            or bool(result.exit_code)
            or (result.shell_exited and result.exit_code is None)
        )
        return ToolOutcome.text(body, is_error=failed)

    async def _read(self, raw: Json) -> ToolOutcome:
        args = ReadInput.model_validate(raw)
        path = resolve_path(args.file_path)
        media_type = _MEDIA_TYPES.get(posixpath.splitext(path)[1].lower())
        if media_type == "application/pdf":
            data = await self._sandbox.read_file(path, max_bytes=PDF_LIMIT)
            encoded = base64.b64encode(data).decode()
            source = {"type": "base64", "media_type": media_type, "data": encoded}
            return ToolOutcome([{"type": "document", "source": source}])
        if media_type is not None:
            data = await self._sandbox.read_file(path, max_bytes=IMAGE_BASE64_LIMIT * 3 // 4)
            encoded = base64.b64encode(data).decode()
            source = {"type": "base64", "media_type": media_type, "data": encoded}
            return ToolOutcome([{"type": "image", "source": source}])
        if args.view_range is None:
            try:
                data = await self._sandbox.read_file(path, max_bytes=READ_LIMIT)
            except SandboxPathError as exc:
                if "limit" in str(exc):
                    msg = f"{exc}; pass view_range [start_line, end_line] to read part of it"
                    raise ToolFailure(msg) from exc
                raise
            return ToolOutcome.text(_decode_text(data, path) or "(empty file)")
        start, end = args.view_range
        data = await self._sandbox.read_file(path, max_bytes=RANGE_READ_LIMIT)
        lines = _decode_text(data, path).splitlines(keepends=True)
        first = max(1, start)
        last = len(lines) if end <= 0 else min(end, len(lines))
        chosen = "".join(lines[first - 1 : last])
        if len(chosen.encode()) > READ_LIMIT:
            msg = f"lines {first}-{last} of {path} exceed {READ_LIMIT} bytes; ask for fewer lines"
            raise ToolFailure(msg)
        return ToolOutcome.text(chosen or "(no lines in that range)")

    async def _write(self, raw: Json) -> ToolOutcome:
        args = WriteInput.model_validate(raw)
        path = resolve_path(args.file_path)
        data = args.content.encode()
        await self._sandbox.write_file(path, data)
        return ToolOutcome.text(f"wrote {len(data)} bytes to {path}")

    async def _edit(self, raw: Json) -> ToolOutcome:
        args = EditInput.model_validate(raw)
        path = resolve_path(args.file_path)
        if not args.old_string:
            msg = "old_string must not be empty"
            raise ToolFailure(msg)
        text = _decode_text(await self._sandbox.read_file(path, max_bytes=EDIT_LIMIT), path)
        count = text.count(args.old_string)
        if count == 0:
            msg = f"old_string was not found in {path}"
            raise ToolFailure(msg)
        if count > 1 and not args.replace_all:
            msg = (
                f"old_string occurs {count} times in {path}; include more context to make it "
                "unique, or set replace_all"
            )
            raise ToolFailure(msg)
        updated = text.replace(args.old_string, args.new_string, -1 if args.replace_all else 1)
        await self._sandbox.write_file(path, updated.encode())
        replaced = count if args.replace_all else 1
        return ToolOutcome.text(f"edited {path} ({replaced} replacement(s))")

    async def _glob(self, raw: Json) -> ToolOutcome:
        args = GlobInput.model_validate(raw)
        if args.pattern.startswith("/") or ".." in args.pattern.split("/"):
            msg = "pattern must be relative and must not contain '..'; use `path` for the base"
            raise ToolFailure(msg)
        base = resolve_path(args.path or WORKSPACE)
        regex = glob_to_regex(args.pattern)
        script = f"find {shlex.quote(base)} -type f -printf '%T@ %p\\n' 2>/dev/null | head -n 50000"
        result = await self._sandbox.run_shell(script, timeout=60, output_limit=16 << 20)
        found: list[tuple[float, str]] = []
        prefix = base.rstrip("/") + "/"
        for line in result.output.splitlines():
            stamp, _, path = line.partition(" ")
            if path.startswith(prefix) and regex.fullmatch(path[len(prefix) :]):
                try:
                    found.append((float(stamp), path))
                except ValueError:
                    continue
        if not found:
            return ToolOutcome.text("no matches")
        found.sort(key=lambda item: item[0], reverse=True)
        lines = [p for _, p in found[:GLOB_LIMIT]]
        if len(found) > GLOB_LIMIT:
            lines.append(f"[{len(found) - GLOB_LIMIT} more matches not shown]")
        return ToolOutcome.text("\n".join(lines))

    async def _grep(self, raw: Json) -> ToolOutcome:
        args = GrepInput.model_validate(raw)
        base = resolve_path(args.path or WORKSPACE)
        pattern, target = shlex.quote(args.pattern), shlex.quote(base)
        script = (
            "if command -v rg >/dev/null 2>&1; then "
            f"rg -n --no-heading --color=never --max-columns=2000 -e {pattern} -- {target}; "
            f"else grep -rnIE -e {pattern} -- {target}; fi"
        )
        result = await self._sandbox.run_shell(script, timeout=60, output_limit=SEARCH_OUTPUT_LIMIT)
        if result.exit_code == 1 and not result.output.strip():
            return ToolOutcome.text("no matches")
        if result.exit_code not in (0, 1):
            return ToolOutcome.text(result.output or "grep failed", is_error=True)
        return ToolOutcome.text(result.output)


def _decode_text(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        msg = f"{path} is not UTF-8 text (binary file?); inspect it with bash instead"
        raise ToolFailure(msg) from exc
