"""Timestamps in the API's format: RFC 3339, UTC, millisecond precision, `Z` suffix."""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> str:
    """The current time as `2026-04-03T18:24:10.412Z`."""
    return format_time(datetime.now(UTC))


def format_time(moment: datetime) -> str:
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 timestamp (with `Z` or an offset)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
