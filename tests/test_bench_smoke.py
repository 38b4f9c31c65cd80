"""The bench's smoke run (`python -m bench --smoke`) finishes and reports every case."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.results import CASE_TITLES

ROOT = Path(__file__).resolve().parent.parent
LIMIT_S = 110
"""Past the bench's own smoke budget (it stops its cases by then), so a hang is caught here."""

pytestmark = [pytest.mark.docker, pytest.mark.bubblewrap, pytest.mark.slow]


def run_smoke(out: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "bench", "--smoke", "--out", str(out)]
    with subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=LIMIT_S)
        except subprocess.TimeoutExpired:
            # SIGTERM first: the bench removes its containers, networks and images on it.
            proc.send_signal(signal.SIGTERM)
            try:
                stdout, stderr = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            pytest.fail(f"bench --smoke ran over {LIMIT_S} s\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def test_smoke_run_reports_every_case_with_numbers(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = run_smoke(out)
    assert (out / "results.json").exists(), done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    errors = {k: c["error"] for k, c in results["cases"].items() if "error" in c}
    assert errors == {}, done.stderr[-4000:]
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(results["cases"]) == set(CASE_TITLES)
    for key, case in results["cases"].items():
        assert case["rows"], key
        for row in case["rows"]:
            assert row["n"] >= 1, (key, row)
            assert row["min"] > 0, (key, row)
            assert row["median"] > 0, (key, row)
            assert row["max"] > 0, (key, row)
    peers = results["cases"]["peers"]["peers"]
    assert peers["ours (Docker)"] == "ran"
    assert peers["ours (bubblewrap)"] == "ran"
    names = [row["name"] for row in results["cases"]["peers"]["rows"]]
    for peer in ("llm-sandbox", "swe-rex"):
        if peers[peer] == "ran":
            assert any(name.startswith(f"{peer}: total") for name in names), peer
        else:
            assert peers[peer].startswith("blocked: "), peers[peer]
            assert len(peers[peer]) > len("blocked: ") + 10, peers[peer]
    assert (out / "table.md").read_text().startswith("| case |")
    assert results["meta"]["cleanup"] == [], "the cases left Docker objects behind"
