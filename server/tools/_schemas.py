"""Output models of the tools whose results are not plain API objects (they become outputSchema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["idle", "running", "rescheduling", "terminated"]


class _Out(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)


class Page(_Out):
    """One page of a list."""

    data: list[dict[str, Any]]
    next_page: str | None
    """Pass as `page` to get the next page; null on the last one."""


class Sent(_Out):
    """The events as stored (with their ids); `processed_at` is null until processed."""

    data: list[dict[str, Any]]


class WaitOutput(_Out):
    session_id: str
    status: Status
    done: bool
    """True when the sub-agent finished its work or needs you (see stop_reason)."""
    stop_reason: dict[str, Any] | None
    """When done: `end_turn`, `requires_action` (answer `event_ids`), `retries_exhausted`,
    `budget_reached` (a runaway cap; send a message to continue), `refusal`."""
    events: list[dict[str, Any]]
    """New events since `after`: compact summaries, or full events with detail="full"."""
    next_after: str | None
    """Pass as `after` next time."""
    more: bool = False
    """True when events were left out to keep this result small: call again with next_after."""


class RunTaskOutput(_Out):
    session_id: str
    status: Status
    done: bool
    """True when the sub-agent finished (or needs you) within wait_s."""
    answer: str | None
    """The sub-agent's final message, when done."""
    stop_reason: dict[str, Any] | None
    output_files: list[dict[str, Any]] = Field(default_factory=list)
    """Files it wrote to /mnt/session/outputs/ (download them with download_file)."""
    next_after: str | None
    """When not done: pass to wait_for_session as `after`."""
    next_step: str
    """What to call next."""


class FileText(_Out):
    path: str
    size: int
    """The file's total size in bytes."""
    offset: int
    content: str
    next_offset: int | None
    """Where the rest starts (pass as `offset`); null when this is the end."""
    remaining: int
    """Bytes after this chunk."""
