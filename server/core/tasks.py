"""`run_task`: the one-call delegation: defaults, uploads, a session, the prompt, a bounded wait."""

from __future__ import annotations

import posixpath
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from .agents import AgentService
from .environments import EnvironmentService
from .errors import ConflictError
from .files import FileService
from .idempotency import IdempotencyKeys, create_once
from .models import (
    AgentCreateParams,
    EnvironmentCreateParams,
    FileResourceParam,
    SessionCreateParams,
    UserMessageEvent,
)
from .sessions import SessionService

Json = dict[str, Any]
DEFAULT_NAME = "managed-agents-default"
DEFAULT_MARKER = ("managed-agents-mcp", "default")
DEFAULT_SYSTEM = (
    "You are a capable software agent. Work autonomously on the task you are given, using your "
    "tools. When you are done, reply with a short summary of what you did and where the results "
    "are; put files the user should receive in /mnt/session/outputs/."
)


class TaskService:
    """Starts a session on a task and waits (bounded) for its answer."""

    def __init__(
        self,
        agents: AgentService,
        environments: EnvironmentService,
        sessions: SessionService,
        files: FileService,
        *,
        default_model: str,
        keys: IdempotencyKeys | None = None,
    ) -> None:
        self._keys = keys
        self._agents = agents
        self._environments = environments
        self._sessions = sessions
        self._files = files
        self._default_model = default_model

    async def default_agent(self) -> Json:
        """The built-in agent (all built-in tools), created on first use."""
        found = await self._agents.find_by_metadata(*DEFAULT_MARKER)
        if found is not None:
            return found
        return await self._agents.create(
            AgentCreateParams.model_validate(
                {
                    "name": DEFAULT_NAME,
                    "model": self._default_model,
                    "system": DEFAULT_SYSTEM,
                    "tools": [{"type": "agent_toolset_20260401"}],
                    "metadata": {DEFAULT_MARKER[0]: DEFAULT_MARKER[1]},
                }
            )
        )

    async def default_environment(self) -> Json:
        """The built-in environment (default image, public internet through the proxy)."""
        found = await self._environments.by_name(DEFAULT_NAME)
        if found is not None:
            return found
        try:
            return await self._environments.create(
                EnvironmentCreateParams.model_validate(
                    {"name": DEFAULT_NAME, "metadata": {DEFAULT_MARKER[0]: DEFAULT_MARKER[1]}}
                )
            )
        except ConflictError:  # another process created it a moment ago
            found = await self._environments.by_name(DEFAULT_NAME)
            assert found is not None
            return found

    async def run(
        self,
        prompt: str,
        *,
        agent: Any = None,
        environment_id: str | None = None,
        files: Sequence[str] = (),
        title: str | None = None,
        wait_s: float,
        on_events: Callable[[list[Json]], Awaitable[None]] | None = None,
        idempotency_key: str | None = None,
    ) -> Json:
        """Run `prompt` in a new session; return within `wait_s` seconds, done or not.

        Host `files` are uploaded and mounted at /mnt/session/uploads/<name>. A repeat with the
        same `idempotency_key` uploads nothing and starts nothing: it waits on the first
        call's session again.
        """
        deadline = time.monotonic() + wait_s
        request = {
            "prompt": prompt,
            "agent": agent,
            "environment_id": environment_id,
            "files": list(files),
            "title": title,
        }
        session = await create_once(
            self._keys,
            "run_task",
            idempotency_key,
            request,
            prefix="sesn",
            create=lambda session_id: self._start(
                session_id, prompt, agent, environment_id, files, title
            ),
            fetch=self._sessions.retrieve,
        )
        waited = await self._sessions.wait(
            session["id"],
            after=None,
            timeout=max(0.0, deadline - time.monotonic()),
            on_events=on_events,
        )
        mounted = {r["file_id"] for r in session["resources"]}
        outputs = []
        if waited.done:
            listed = await self._files.list(scope_id=session["id"], limit=100)
            outputs = [f for f in listed.data if f["id"] not in mounted]
        return {
            "session": waited.session,
            "events": waited.events,
            "done": waited.done,
            "next_after": waited.next_after,
            "output_files": outputs,
        }

    async def _start(
        self,
        session_id: str,
        prompt: str,
        agent: Any,
        environment_id: str | None,
        files: Sequence[str],
        title: str | None,
    ) -> Json:
        """Upload `files` and start a session (with id `session_id`) on `prompt`."""
        if agent is None:
            agent = (await self.default_agent())["id"]
        environment = environment_id or (await self.default_environment())["id"]
        resources = []
        taken: set[str] = set()
        for path in files:
            uploaded = await self._files.upload_path(Path(path))
            name = uploaded["filename"]
            stem, ext = posixpath.splitext(name)
            counter = 1
            while name in taken:
                counter += 1
                name = f"{stem}-{counter}{ext}"
            taken.add(name)
            resources.append(
                FileResourceParam(
                    type="file", file_id=uploaded["id"], mount_path=f"/mnt/session/uploads/{name}"
                )
            )
        return await self._sessions.create_as(
            session_id,
            SessionCreateParams(
                agent=agent,
                environment_id=environment,
                title=title or _title(prompt),
                resources=resources,
                initial_events=[UserMessageEvent(type="user.message", content=prompt)],  # type: ignore[arg-type]
            ),
        )


def _title(prompt: str) -> str:
    line = prompt.strip().splitlines()[0] if prompt.strip() else "task"
    return line if len(line) <= 80 else line[:77] + "..."
