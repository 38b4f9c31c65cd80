"""manifest.json (MCPB 0.4) stays in step with the server it starts."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import anyio
from mcp import Client

from server.app import build_server
from server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_manifest_lists_exactly_the_registered_tools(tmp_path: Path) -> None:
    manifest = json.loads((ROOT / "manifest.json").read_text())

    async def registered() -> list[str]:
        async with Client(build_server(Settings(home=tmp_path))) as client:
            return [t.name for t in (await client.list_tools()).tools]

    assert [t["name"] for t in manifest["tools"]] == anyio.run(registered), (
        "manifest.json is out of date: run `uv run python scripts/sync_manifest.py`"
    )


def test_manifest_version_matches_the_package() -> None:
    manifest = json.loads((ROOT / "manifest.json").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert manifest["manifest_version"] == "0.4"
    assert manifest["version"] == project["version"]
    assert manifest["server"]["mcp_config"]["args"][-1] == "serve"
