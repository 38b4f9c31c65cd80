"""Commands for the person watching: `sessions`, `tail`, `shell`, `files`.

They read the server's database directly (SQLite in WAL mode is safe to read while servers run)
and never act as a server: no turns run here and no session changes owner.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from server.core.changes import ChangeBus
from server.core.clock import parse_time
from server.core.errors import ManagedAgentsError, NotFoundError
from server.core.files import BlobStore, FileService
from server.core.session_store import SessionStore
from server.core.sessions import WAITING_STATUSES
from server.core.store import Database
from server.present import clip, content_text
from server.settings import Settings

Json = dict[str, Any]


class UserError(Exception):
    """A mistake of the person at the terminal: shown as one line, no traceback."""


@contextlib.asynccontextmanager
async def _open(settings: Settings) -> AsyncIterator[tuple[SessionStore, FileService]]:
    if not settings.database_path.exists():
        msg = f"no data in {settings.home} yet (set MANAGED_AGENTS_HOME to the server's data dir)"
        raise UserError(msg)
    db = await Database.open(settings.database_path)
    try:
        files = FileService(
            db, BlobStore(settings.home / "blobs"), max_upload_bytes=settings.max_upload_bytes
        )
        yield SessionStore(db, ChangeBus()), files
    finally:
        await db.aclose()


def run(command: Callable[..., Any], *args: Any) -> int:
    """Run an async command; user errors become one red line and exit code 1."""
    from rich.console import Console

    try:
        anyio.run(functools.partial(command, *args))
    except (UserError, ManagedAgentsError) as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _age(stamp: str) -> str:
    seconds = (datetime.now(UTC) - parse_time(stamp)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _last_message(events: list[Json]) -> str:
    for event in reversed(events):
        if event["type"] in ("agent.message", "user.message"):
            who = "agent" if event["type"] == "agent.message" else "user"
            return f"{who}: " + content_text(event.get("content")).replace("\n", " ")
    return ""


async def sessions_command(settings: Settings, show_all: bool, limit: int, as_json: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    async with _open(settings) as (store, _):
        records = sorted(
            await store.all_sessions(), key=lambda r: r.session["created_at"], reverse=True
        )
        rows = []
        for record in records:
            session = record.session
            if session["archived_at"] and not show_all:
                continue
            events = await store.events(session["id"])
            rows.append((session, _last_message(events)))
            if len(rows) >= limit:
                break
    if as_json:
        for session, last in rows:
            sys.stdout.write(json.dumps({**session, "last_message": last}) + "\n")
        return
    table = Table(title=f"sessions in {settings.home}", title_justify="left")
    for column in ("session", "status", "age", "agent", "title", "last message"):
        table.add_column(column, overflow="fold" if column == "session" else "ellipsis")
    colors = {"running": "green", "idle": "cyan", "rescheduling": "yellow", "terminated": "dim"}
    for session, last in rows:
        status = session["status"]
        table.add_row(
            session["id"],
            f"[{colors.get(status, 'white')}]{status}[/]",
            _age(session["created_at"]),
            str((session.get("agent") or {}).get("name") or ""),
            session.get("title") or "",
            clip(last, 80),
        )
    Console().print(table if rows else "no sessions yet")


def render_event(event: Json) -> str | None:
    """One event as rich markup for `tail`, or None for bookkeeping events."""
    from rich.markup import escape

    kind = event["type"]
    if kind == "user.message":
        return f"[bold blue]user[/] {escape(content_text(event.get('content')))}"
    if kind == "agent.message":
        return f"[bold magenta]agent[/] {escape(content_text(event.get('content')))}"
    if kind in ("agent.tool_use", "agent.custom_tool_use"):
        data = event.get("input") or {}
        detail = data.get("command") or data.get("file_path") or json.dumps(data)
        ask = (
            " [yellow](waiting for approval)[/]"
            if event.get("evaluated_permission") == "ask"
            else ""
        )
        name = escape(str(event.get("name")))
        return f"[bold yellow]$ {name}[/] {escape(clip(str(detail), 500))}{ask}"
    if kind == "agent.tool_result":
        text = clip(content_text(event.get("content")), 1200)
        style = "red" if event.get("is_error") else "dim"
        return f"[{style}]{escape(text)}[/]"
    if kind == "session.error":
        error = event.get("error") or {}
        kind_text = escape(str(error.get("type")))
        return f"[bold red]error[/] {kind_text}: {escape(str(error.get('message')))}"
    if kind == "session.status_idle":
        reason = (event.get("stop_reason") or {}).get("type")
        return f"[cyan]● idle[/] [dim]({reason})[/]"
    if kind == "session.status_running":
        return "[green]● running[/]"
    if kind == "user.interrupt":
        return "[yellow]■ interrupt[/]"
    return None


async def tail_command(settings: Settings, session_id: str, as_json: bool, history: bool) -> None:
    """Print the session's events as they happen (Ctrl-C to stop)."""
    from rich.console import Console

    console = Console(highlight=False)
    async with _open(settings) as (store, _):
        record = await store.get(session_id)
        if record is None:
            msg = f"session {session_id} not found (`managed-agents-mcp sessions` lists them)"
            raise UserError(msg)
        seen = 0 if history else len(await store.events(session_id))
        async with anyio.create_task_group() as group:

            async def ignore(_: set[str]) -> None:
                return

            group.start_soon(functools.partial(store.bus.watch, store.db, ignore, interval=0.2))
            status = None
            while True:
                token = store.bus.token(session_id)
                record = await store.get(session_id)
                if record is None:
                    console.print("[dim]session deleted[/]")
                    group.cancel_scope.cancel()
                    return
                events = await store.events(session_id)
                for event in events[seen:]:
                    if as_json:
                        sys.stdout.write(json.dumps(event) + "\n")
                        sys.stdout.flush()
                    elif (line := render_event(event)) is not None:
                        console.print(line)
                seen = len(events)
                status = record.session["status"]
                if as_json or status in WAITING_STATUSES:
                    await token.wait()
                    continue
                with console.status("[green]working…[/]", spinner="dots"):
                    await token.wait()


def _container_command(settings: Settings, sandbox_id: str, argv: list[str]) -> list[str]:
    docker = shutil.which("docker")
    if docker is None:
        msg = "the `docker` command is not installed; install the Docker CLI to open a shell"
        raise UserError(msg)
    host = ["-H", settings.docker_host] if settings.docker_host else []
    return [docker, *host, "exec", "-it", "-w", "/workspace", sandbox_id, *argv]


async def shell_command(settings: Settings, session_id: str) -> None:
    """Replace this process with an interactive shell in the session's container."""
    async with _open(settings) as (store, _):
        record = await store.get(session_id)
        if record is None:
            msg = f"session {session_id} not found (`managed-agents-mcp sessions` lists them)"
            raise UserError(msg)
    sandbox = record.sandbox_id or f"ma-{session_id}"
    if settings.sandbox == "bubblewrap":
        msg = "`shell` needs the Docker backend; this server runs sessions with bubblewrap"
        raise UserError(msg)
    argv = _container_command(
        settings, sandbox, ["sh", "-c", "command -v bash >/dev/null && exec bash || exec sh"]
    )
    os.execv(argv[0], argv)


async def files_command(settings: Settings, session_id: str, download: Path | None) -> None:
    """List a session's output files, or download them all into a directory."""
    from rich.console import Console
    from rich.table import Table

    async with _open(settings) as (store, files):
        if await store.get(session_id) is None:
            msg = f"session {session_id} not found (`managed-agents-mcp sessions` lists them)"
            raise UserError(msg)
        mounted = {r["file_id"] for r in await store.resources(session_id)}
        listed = [
            f
            for f in (await files.list(scope_id=session_id, limit=1000)).data
            if f["id"] not in mounted
        ]
        if download is not None:
            await anyio.to_thread.run_sync(
                functools.partial(download.mkdir, parents=True, exist_ok=True)
            )
            for item in listed:
                target = download / item["filename"]
                try:
                    await files.download_to(item["id"], target, overwrite=True)
                except NotFoundError:
                    continue
                Console().print(f"saved {target}")
            return
    table = Table(title=f"outputs of {session_id}", title_justify="left")
    for column in ("file", "name", "size", "type", "created"):
        table.add_column(column)
    for item in listed:
        table.add_row(
            item["id"],
            item["filename"],
            str(item["size_bytes"]),
            item["mime_type"],
            item["created_at"],
        )
    Console().print(
        table if listed else "no output files (the agent writes them to /mnt/session/outputs/)"
    )
