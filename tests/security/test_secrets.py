"""The model API key and the HTTP token never reach a sandbox, an event, a tool result or a log
(catalogue S-13, A-06 and A-08).

The server runs with `ANTHROPIC_API_KEY=sk-ant-canary-<random>` (in its settings *and* in the
process environment, so any accidental pass-through would show) and its HTTP token generated into
`<home>/token`. From inside a session the agent dumps its environment, every readable
`/proc/*/environ` and `cmdline`, and greps the whole filesystem it can read for both canaries.
The script carries the canaries reversed, so no event quotes them verbatim; it prints counts only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from sandbox.base import SandboxBackend
from sandbox.bubblewrap import BubblewrapBackend
from sandbox.docker import DockerBackend
from server.settings import Settings
from tests.conftest import IMAGE, remove_labelled
from tests.fakes.messages_api import FakeMessagesAPI
from tests.security.helpers import (
    bwrap_state_root,
    new_agent,
    new_environment,
    new_session,
    routing_fake,
    serve,
)

pytestmark = pytest.mark.asyncio

SEARCH = r"""
K=$(printf %s '{key}' | rev)
T=$(printf %s '{token}' | rev)
# The needle reaches grep through a pipe (-f), never its argv, or cmdline would match grep.
has() {{ grep -cFf <(printf '%s\n' "$n"); }}
printf '%s\n' "$K" "$T" > /tmp/ma-control  # a positive control for the filesystem search
n=$K; echo "control=$(printf '%s\n' "$K" | has)"
readable() {{ for f in /proc/[0-9]*/environ; do cat "$f" >/dev/null 2>&1 && echo; done; }}
echo "environ_readable=$(readable | wc -l)"
for pair in "key:$K" "token:$T"; do
  name=${{pair%%:*}}; n=${{pair#*:}}
  echo "$name.env=$(env | has)"
  echo "$name.environ=$(cat /proc/[0-9]*/environ 2>/dev/null | tr '\0' '\n' | has)"
  echo "$name.cmdline=$(cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\0' '\n' | has)"
  hits=$(grep -rlsFf <(printf '%s\n' "$n") {excludes} / 2>/dev/null)
  echo "$name.files=$(printf '%s\n' "$hits" | grep -v -x -e /tmp/ma-control -e '' | wc -l)"
  echo "found_control.$name=$(printf '%s\n' "$hits" | grep -cx /tmp/ma-control)"
done
rm -f /tmp/ma-control
echo "data_dir_visible=$(ls -d '{home}' '{home}/token' 2>/dev/null | wc -l)"
skip='\( -path /proc -o -path /sys -o -path /dev \) -prune -o'
echo "searched_entries=$(eval "find / $skip -print" 2>/dev/null | wc -l)"
"""
EXCLUDES = {
    "docker": "--exclude-dir=proc --exclude-dir=sys --exclude-dir=dev",
    # The bubblewrap sandbox sees the host's own /usr read-only: several GB that no secret of
    # the server can be in; everything else it can read is searched.
    "bubblewrap": "--exclude-dir=proc --exclude-dir=sys --exclude-dir=dev --exclude-dir=usr",
}


@contextlib.contextmanager
def _backend(name: str) -> Iterator[SandboxBackend]:
    if name == "docker":
        yield DockerBackend()
        return
    with bwrap_state_root() as state_root:
        yield BubblewrapBackend(state_root)


def _all_files(home: Path, *, skip: set[Path]) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in home.rglob("*") if p.is_file() and p not in skip}


def _container_env(name: str) -> list[str]:
    client = docker.from_env()
    try:
        return list(client.containers.get(name).attrs["Config"]["Env"] or [])
    finally:
        client.close()


@pytest.mark.parametrize(
    "backend_name",
    [
        pytest.param("docker", marks=pytest.mark.docker),
        pytest.param("bubblewrap", marks=pytest.mark.bubblewrap),
    ],
)
async def test_model_key_and_http_token_stay_out_of_sessions_events_and_logs(
    backend_name: str,
    home: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    key = "sk-ant-canary-" + secrets.token_hex(16)
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    found: dict[str, Any] = {}
    try:
        with FakeMessagesAPI() as fake, _backend(backend_name) as backend:
            routing_fake(fake)
            settings = Settings(
                home=home,
                image=IMAGE,
                retry_delay=0.01,
                poll_interval=0.05,
                warm_pool=0,
                anthropic_api_key=key,
                anthropic_base_url=fake.url,
            )
            # model=None: the server builds its own Anthropic client from the settings.
            async with serve(settings, backend, None) as server:
                token = server.token
                assert (home / "token").read_text().strip() == token
                mcp = server.mcp
                agent = await new_agent(mcp)
                env = await new_environment(mcp, "s", {"type": "limited", "allowed_hosts": []})
                session = await new_session(mcp, server.services, agent, env)
                script = SEARCH.format(
                    key=key[::-1],
                    token=token[::-1],
                    home=str(home),
                    excludes=EXCLUDES[backend_name],
                )
                run = await session.bash(script, timeout_ms=120_000, limit=180)
                found["counts"] = dict(re.findall(r"^([\w.]+)=(\d+)$", run.text, re.MULTILINE))
                page = await server.services.sessions.list_events(session.id, limit=1000)
                found["events"] = json.dumps(page.data)
                found["wait_events"] = json.dumps(run.events)
                listed = await mcp("list_events", {"session_id": session.id, "limit": 1000})
                found["list_events"] = json.dumps(listed)
                if backend_name == "docker":
                    found["container_env"] = _container_env(f"ma-{session.id}")
            found["credentials"] = [
                h.get("x-api-key") or h.get("authorization", "").removeprefix("Bearer ")
                for h in fake.request_headers
            ]
    finally:
        if backend_name == "docker":
            remove_labelled(home)
    counts = {k: int(v) for k, v in found["counts"].items()}
    # The search worked: its needle matches itself, processes' environments were readable, the
    # server really held and used the key (the fake API saw it on every request).
    assert counts["control"] == 1, run.text
    assert counts["found_control.key"] == counts["found_control.token"] == 1, run.text
    assert counts["environ_readable"] >= 3, run.text
    assert counts["searched_entries"] > 1000, run.text
    assert found["credentials"], "the fake API saw no request"
    assert set(found["credentials"]) == {key}
    leaks = {k: v for k, v in counts.items() if k.startswith(("key.", "token.")) and v}
    assert leaks == {}, run.text
    assert counts["data_dir_visible"] == 0, run.text
    for name in ("events", "wait_events", "list_events"):
        assert key not in found[name], name
        assert token not in found[name], name
    assert not any(key in item or "ANTHROPIC" in item for item in found.get("container_env", []))
    assert key not in caplog.text
    assert token not in caplog.text
    # Nothing the server stored in its data dir (database, WAL, blobs, egress) holds the key;
    # the token is only in its own file.
    files = _all_files(home, skip={home / "token"})
    assert [p for p, data in files.items() if key.encode() in data] == []
    assert [p for p, data in files.items() if token.encode() in data] == []
    print(f"\n[secrets:{backend_name}] {json.dumps(counts)} log_records={len(caplog.records)}")
