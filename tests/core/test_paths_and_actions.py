"""Pure rules: container paths, mount paths, waiting tool calls, credential-looking files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.core.actions import outstanding_actions
from server.core.errors import InvalidRequestError
from server.core.files import looks_sensitive
from server.core.paths import container_path, mount_path


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, "/mnt/session/uploads/file_1"),
        ("/data.csv", "/mnt/session/uploads/data.csv"),
        ("/mnt/session/uploads/in/x.csv", "/mnt/session/uploads/in/x.csv"),
        ("/etc/passwd", "/mnt/session/uploads/etc/passwd"),
        ("/a//b/./c.txt", "/mnt/session/uploads/a/b/c.txt"),
    ],
)
def test_mount_paths_are_rooted_under_uploads(given: str | None, expected: str) -> None:
    assert mount_path(given, "file_1") == expected


@pytest.mark.parametrize(
    "bad",
    [
        "data.csv",
        "/mnt/../etc/passwd",
        "/x/../../y",
        "/",
        "/mnt/session/uploads",
        "/dir/",
        "/a\x00b",
        "/a\nb",
        "/" + "x" * 1100,
    ],
)
def test_bad_mount_paths_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequestError):
        mount_path(bad, "file_1")


@pytest.mark.parametrize(
    ("given", "expected"),
    [("notes.txt", "/workspace/notes.txt"), ("/tmp/x", "/tmp/x"), ("a/../b", "/workspace/b")],
)
def test_container_paths_resolve_inside_the_readable_roots(given: str, expected: str) -> None:
    assert container_path(given) == expected


@pytest.mark.parametrize("bad", ["/etc/passwd", "../etc/passwd", "/workspace/../root", "", "\x00"])
def test_container_paths_outside_the_roots_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequestError):
        container_path(bad)


def ev(kind: str, processed: bool = True, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "processed_at": "t" if processed else None, **fields}


def test_outstanding_actions_track_asks_and_custom_calls_until_answered() -> None:
    events = [
        ev("agent.tool_use", id="a", evaluated_permission="allow"),
        ev("agent.tool_use", id="b", evaluated_permission="ask"),
        ev("agent.custom_tool_use", id="c", name="weather"),
        ev("agent.tool_use", id="d", evaluated_permission="ask"),
        ev("user.tool_confirmation", processed=False, tool_use_id="d", result="allow"),
    ]
    assert [a["id"] for a in outstanding_actions(events)] == ["b", "c"]
    assert [a["id"] for a in outstanding_actions(events, count_queued=False)] == ["b", "c", "d"]
    events.append(ev("user.custom_tool_result", custom_tool_use_id="c"))
    events.append(ev("agent.tool_result", tool_use_id="b"))
    assert [a["id"] for a in outstanding_actions(events, count_queued=False)] == ["d"]


@pytest.mark.parametrize(
    "path",
    [
        "/home/u/.ssh/id_ed25519",
        "/p/.env",
        "/p/.env.local",
        "/home/u/.aws/credentials",
        "/x/server.pem",
        "/x/tls.key",
        "/home/u/.docker/config.json",
        "/home/u/.netrc",
    ],
)
def test_credential_looking_files_are_flagged(path: str) -> None:
    assert looks_sensitive(Path(path)) is not None


@pytest.mark.parametrize("path", ["/home/u/data.csv", "/p/README.md", "/p/environment.yml"])
def test_ordinary_files_are_not_flagged(path: str) -> None:
    assert looks_sensitive(Path(path)) is None
