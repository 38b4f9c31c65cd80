"""Rewrite manifest.json's `tools` list and `version` from the server and pyproject.toml.

Run after adding or renaming a tool: `uv run python scripts/sync_manifest.py`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import tomllib
from pathlib import Path

import anyio
from mcp import Client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.app import build_server  # noqa: E402
from server.settings import Settings  # noqa: E402


async def registered_tools() -> list[dict[str, str]]:
    with tempfile.TemporaryDirectory() as home:
        async with Client(build_server(Settings(home=Path(home)))) as client:
            tools = (await client.list_tools()).tools
    return [
        {"name": t.name, "description": (t.description or "").strip().splitlines()[0]}
        for t in tools
    ]


def main() -> None:
    path = ROOT / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["tools"] = anyio.run(registered_tools)
    manifest["version"] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    path.write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
