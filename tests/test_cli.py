"""The command line: fast start-up and `doctor`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

LAZY_PROBE = """
import sys, anyio
from pathlib import Path
from mcp import Client
from server.app import build_server
from server.settings import Settings

async def main():
    async with Client(build_server(Settings(home=Path(sys.argv[1])))) as client:
        names = [t.name for t in (await client.list_tools()).tools]
        loaded = sorted(m for m in ("anthropic", "docker") if m in sys.modules)
        print(len(names), ",".join(loaded) or "-")

anyio.run(main)
"""


def test_serving_tools_list_does_not_import_anthropic_or_docker(tmp_path: Path) -> None:
    """Clients time a stdio server's start: the slow SDKs load only when first used."""
    result = subprocess.run(
        [sys.executable, "-c", LAZY_PROBE, str(tmp_path / "home")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    count, loaded = result.stdout.split()
    assert int(count) >= 14
    assert loaded == "-"


def run_doctor(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", "doctor"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", ""), **env},
        check=False,
    )


def test_doctor_names_each_failure_and_how_to_fix_it(tmp_path: Path) -> None:
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    result = run_doctor(
        {
            "DOCKER_HOST": f"unix://{tmp_path}/no-such.sock",
            "MANAGED_AGENTS_SANDBOX": "docker",
            "MANAGED_AGENTS_HOME": str(blocked / "home"),
            "HOME": str(tmp_path),
        }
    )
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert all(line.startswith("FAIL") for line in lines)
    assert "fix: start Docker" in lines[0]
    assert "ANTHROPIC_API_KEY" in lines[1]
    assert "MANAGED_AGENTS_HOME" in lines[2]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.docker
def test_doctor_passes_on_a_ready_machine(tmp_path: Path) -> None:
    env = {
        "MANAGED_AGENTS_HOME": str(tmp_path / "home"),
        "ANTHROPIC_API_KEY": "sk-test",
        "HOME": str(tmp_path),
    }
    for name in ("DOCKER_HOST", "MANAGED_AGENTS_IMAGE"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    result = run_doctor(env)
    assert result.returncode == 0, result.stdout
    assert [line[:4] for line in result.stdout.splitlines()] == ["ok  "] * 4
