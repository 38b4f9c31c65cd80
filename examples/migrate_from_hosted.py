"""Code written for the hosted Claude Managed Agents API, run unchanged against this server.

Only the client's `base_url` and key differ from what runs against api.anthropic.com: the
official `anthropic` SDK's `client.beta.agents`, `.environments`, `.sessions` (with
`.events` and `.resources`) and `client.beta.files` talk to the REST API that
`serve --transport http` serves beside `/mcp`.

    ANTHROPIC_API_KEY=sk-ant-... uv run managed-agents-mcp serve --transport http &
    uv run python examples/migrate_from_hosted.py

The server needs the API key (its sub-agents call the model), Docker and the sandbox image;
this script needs neither. MANAGED_AGENTS_URL (default http://127.0.0.1:8765) and
MANAGED_AGENTS_TOKEN (default: what `managed-agents-mcp token` prints) choose the server.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import anthropic

DEFAULT_URL = "http://127.0.0.1:8765"
SAMPLE_CSV = b"city,temperature\nParis,21\nOslo,12\nCairo,35\n"
TASK = (
    "Count the data rows (not the header) of /mnt/session/uploads/data/input.csv, write "
    "`rows: <count>` to /mnt/session/outputs/summary.txt, and tell me the count."
)


@dataclass
class Outcome:
    """What the run saw, for printing (and for the test that runs this script)."""

    agent_versions: list[int] = field(default_factory=list)
    streamed: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    reply: str = ""
    outputs: dict[str, bytes] = field(default_factory=dict)


def run(client: anthropic.Anthropic, *, csv: bytes = SAMPLE_CSV) -> Outcome:
    """The hosted quickstart flow: agent, environment, file, session, stream, outputs."""
    outcome = Outcome()

    # An agent is a versioned configuration: an effective update makes version 2.
    agent = client.beta.agents.create(
        name="migration-example",
        model="claude-sonnet-4-6",
        system="You are a careful data analyst.",
        tools=[{"type": "agent_toolset_20260401"}],
    )
    agent = client.beta.agents.update(
        agent.id, version=agent.version, system="You are a careful data analyst. Be brief."
    )
    outcome.agent_versions = [v.version for v in client.beta.agents.versions.list(agent.id)]

    environment = client.beta.environments.create(
        name=f"migration-example-{secrets.token_hex(4)}",
        config={"type": "cloud", "networking": {"type": "limited", "allowed_hosts": []}},
    )

    # Mounted files are read-only copies under /mnt/session/uploads/.
    uploaded = client.beta.files.upload(file=("input.csv", csv, "text/csv"))
    session = client.beta.sessions.create(
        agent=agent.id,
        environment_id=environment.id,
        title="Count the rows",
        resources=[{"type": "file", "file_id": uploaded.id, "mount_path": "/data/input.csv"}],
    )
    mounted = {r.file_id for r in session.resources if r.type == "file"}

    # Open the stream first (it does not replay), then send the work.
    with client.beta.sessions.events.stream(session.id) as stream:
        client.beta.sessions.events.send(
            session.id,
            events=[{"type": "user.message", "content": [{"type": "text", "text": TASK}]}],
        )
        for event in stream:
            outcome.streamed.append(event.to_dict())
            if event.type == "agent.message":
                outcome.reply = "".join(b.text for b in event.content if b.type == "text")
            if event.type == "session.status_terminated":
                break
            if event.type == "session.status_idle" and event.stop_reason.type != "requires_action":
                break

    outcome.history = [e.to_dict() for e in client.beta.sessions.events.list(session.id)]

    # Whatever the agent wrote under /mnt/session/outputs/ is a file scoped to the session.
    for file in client.beta.files.list(scope_id=session.id, betas=["managed-agents-2026-04-01"]):
        if file.id not in mounted:
            outcome.outputs[file.filename] = client.beta.files.download(file.id).read()

    client.beta.sessions.archive(session.id)
    client.beta.sessions.delete(session.id)
    client.beta.environments.delete(environment.id)
    client.beta.files.delete(uploaded.id)
    client.beta.agents.archive(agent.id)
    return outcome


def client_from_env() -> anthropic.Anthropic:
    """A client for this server instead of api.anthropic.com: the only change to make."""
    token = os.environ.get("MANAGED_AGENTS_TOKEN") or _server_token()
    return anthropic.Anthropic(
        base_url=os.environ.get("MANAGED_AGENTS_URL") or DEFAULT_URL, api_key=token
    )


def _server_token() -> str:
    command = shutil.which("managed-agents-mcp")
    argv = [command, "token"] if command else [sys.executable, "-m", "server", "token"]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def main() -> None:
    with client_from_env() as client:
        outcome = run(client)
    print("agent versions:", outcome.agent_versions)
    print("streamed:", ", ".join(e["type"] for e in outcome.streamed))
    print("events in history:", len(outcome.history))
    print("reply:", outcome.reply)
    for name, data in outcome.outputs.items():
        print(f"output {name}: {data.decode(errors='replace').strip()}")


if __name__ == "__main__":
    main()
