"""Resource exhaustion from inside a session (catalogue S-05, S-06, S-07, B-07, B-08).

A "victim" session runs each attack through its bash tool, with small limits from its
environment (`config.limits`); a "bystander" session on the same server must keep answering,
and so must the victim afterwards. Measured numbers are printed (run with `-s` to see them) and
written to `$MA_SECURITY_REPORT_DIR/exhaustion.json` when that variable is set.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest
from mcp import Client

from sandbox.docker import DockerBackend
from server.app import build_server, open_services
from server.settings import Settings
from tests.conftest import ToolCaller, model_for
from tests.fakes.messages_api import FakeMessagesAPI
from tests.security.helpers import (
    Session,
    new_agent,
    new_environment,
    new_session,
    peak_rss_kib,
    reset_peak_rss,
    routing_fake,
    rss_kib,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.docker, pytest.mark.slow]

MIB = 1 << 20
WORKSPACE_CAP_MIB = 1024
VICTIM_LIMITS = {
    "memory_mb": 512,
    "pids": 128,
    "tmp_mb": 64,
    "outputs_mb": 64,
    "workspace_mb": WORKSPACE_CAP_MIB,
}
HOME_TMPFS_MIB = 256  # Limits.home_bytes: not configurable per environment
REPORT_ENV = "MA_SECURITY_REPORT_DIR"


def record(name: str, numbers: dict[str, Any]) -> None:
    """Print a measurement and add it to the report file (if one is asked for)."""
    print(f"\n[{name}] " + json.dumps(numbers))
    if report_dir := os.environ.get(REPORT_ENV):
        path = Path(report_dir) / "exhaustion.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data[name] = numbers
        path.write_text(json.dumps(data, indent=1))


@dataclass
class Scene:
    mcp: ToolCaller
    settings: Settings
    victim: Session
    bystander: Session

    @property
    def container(self) -> str:
        return f"ma-{self.victim.id}"

    async def both_answer(self) -> dict[str, float]:
        """The victim and the bystander each run `echo ok`; return how long each took."""
        took: dict[str, float] = {}
        for name, session in (("victim", self.victim), ("bystander", self.bystander)):
            start = anyio.current_time()
            run = await session.bash("echo ok", limit=60)
            took[name] = round(anyio.current_time() - start, 2)
            assert (run.text.strip(), run.is_error) == ("ok", False), (name, run.text[-2000:])
        return took


@pytest.fixture
def open_scene(settings: Settings, fake_api: FakeMessagesAPI) -> Any:
    @contextlib.asynccontextmanager
    async def opener(**limits: Any) -> AsyncIterator[Scene]:
        routing_fake(fake_api)
        async with (
            open_services(settings, backend=DockerBackend(), model=model_for(fake_api)) as services,
            Client(build_server(settings, services=services)) as client,
        ):
            mcp = ToolCaller(client)
            agent = await new_agent(mcp)
            limited = await new_environment(
                mcp, "victim", {"type": "limited", "allowed_hosts": []}, VICTIM_LIMITS | limits
            )
            plain = await new_environment(
                mcp, "bystander", {"type": "limited", "allowed_hosts": []}
            )
            victim = await new_session(mcp, services, agent, limited)
            bystander = await new_session(mcp, services, agent, plain)
            yield Scene(mcp, settings, victim, bystander)

    return opener


def _docker_sync(container: str, what: str) -> Any:
    client = docker.from_env()
    try:
        found = client.containers.get(container)
        if what == "pids":
            stats: Any = found.stats(stream=False)
            return int(stats.get("pids_stats", {}).get("current", -1))
        if what == "log":
            path = Path(found.attrs["LogPath"])
            return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
        raise ValueError(what)
    finally:
        client.close()


async def docker_info(container: str, what: str) -> Any:
    return await anyio.to_thread.run_sync(_docker_sync, container, what)


def host_threads() -> int:
    """All threads on the host (the 4th field of /proc/loadavg is running/total)."""
    return int(Path("/proc/loadavg").read_text().split()[3].split("/")[1])


BOMB = "bomb() { bomb | bomb & }; bomb"


async def test_fork_bomb_is_held_by_the_pids_limit(open_scene: Any) -> None:
    """S-05: a real bash fork bomb (it backgrounds itself, so the tool call returns at once and
    the bomb keeps running) stays under `pids` (128 here) for as long as it runs; the bystander
    session and the server keep answering meanwhile."""
    async with open_scene() as scene:
        threads_before = host_threads()
        start = anyio.current_time()
        run = await scene.victim.bash(BOMB, timeout_ms=8000)
        bomb_seconds = round(anyio.current_time() - start, 1)
        samples: list[int] = []
        for _ in range(3):
            await anyio.sleep(1)
            samples.append(await docker_info(scene.container, "pids"))
        threads_during = host_threads()
        start = anyio.current_time()
        bystander = await scene.bystander.bash("echo ok", limit=60)
        bystander_latency = round(anyio.current_time() - start, 2)
        start = anyio.current_time()
        await scene.mcp("get_session", {"session_id": scene.victim.id})
        server_latency = round(anyio.current_time() - start, 3)
        numbers = {
            "pids_limit": VICTIM_LIMITS["pids"],
            "container_pids_after_the_call_returned": samples,
            "host_threads_before": threads_before,
            "host_threads_during": threads_during,
            "bomb_call_seconds": bomb_seconds,
            "bomb_result_tail": run.text[-200:],
            "bystander_echo_during_bomb_s": bystander_latency,
            "get_session_during_bomb_s": server_latency,
        }
        record("fork_bomb", numbers)
        assert max(samples) <= VICTIM_LIMITS["pids"], numbers
        assert (bystander.text.strip(), bystander.is_error) == ("ok", False), bystander.text
        assert bystander_latency < 15, numbers
        assert server_latency < 2, numbers


async def test_session_is_usable_again_after_a_fork_bomb(open_scene: Any) -> None:
    """After the bomb's tool call, the next command finds the sandbox out of processes, kills
    them all first and says so; `echo ok` then answers `ok`, and exactly `ok` the time after."""
    async with open_scene() as scene:
        await scene.victim.bash(BOMB, timeout_ms=8000)
        await anyio.sleep(2)
        answers = [await scene.victim.bash("echo ok", timeout_ms=10_000) for _ in range(2)]
        pids = await docker_info(scene.container, "pids")
        record(
            "fork_bomb_recovery",
            {"pids_after": pids, "echo_answers": [a.text[-160:] for a in answers]},
        )
        # The first answer says what the sandbox did (it killed the bomb); the second is clean.
        assert "run out of processes" in answers[0].text, answers[0].text
        assert answers[0].text.strip().splitlines()[-1] == "ok", answers[0].text
        assert [(a.text.strip(), a.is_error) for a in answers[1:]] == [("ok", False)]
        assert not answers[0].is_error
        assert pids < 10


async def test_memory_hog_is_killed_and_the_session_recovers(open_scene: Any) -> None:
    """S-06: allocating twice the memory limit gets the hog OOM-killed (exit 137) quickly."""
    async with open_scene() as scene:
        size = VICTIM_LIMITS["memory_mb"] * 2 * MIB
        script = (
            "start=$(date +%s%N)\n"
            f'python3 -c \'b = bytearray({size}); print("sur" + "vived")\'\n'
            "rc=$?\n"
            'echo "rc=$rc ms=$(( ($(date +%s%N) - start) / 1000000 ))"\n'
        )
        run = await scene.victim.bash(script, timeout_ms=60_000)
        after = await scene.both_answer()
        rc = re.search(r"rc=(\d+)", run.text)
        millis = re.search(r"ms=(\d+)", run.text)
        types = sorted({e["type"] for e in run.events})
        numbers = {
            "memory_limit_mib": VICTIM_LIMITS["memory_mb"],
            "allocated_mib": size // MIB,
            "exit_code": int(rc.group(1)) if rc else None,
            "seconds_to_kill": int(millis.group(1)) / 1000 if millis else None,
            "event_types": types,
            "echo_after_s": after,
        }
        record("memory_hog", numbers)
        assert "survived" not in run.text
        assert numbers["exit_code"] == 137, run.text
        assert numbers["seconds_to_kill"] is not None
        assert numbers["seconds_to_kill"] < 10


FILL = """\
fill() {{  # fill PATH MIB: write zeros until MIB or ENOSPC; print bytes kept and dd's complaint
  dd if=/dev/zero of="$1" bs=1M count="$2" 2>&1 | grep -o 'No space left on device' | head -1
  echo "$1 kept=$(stat -c %s "$1") df=$(df -k "$(dirname "$1")" | awk 'NR==2 {{print $2}}')k"
}}
fill /tmp/fill {tmp}
fill /dev/shm/fill 128
fill "$HOME/fill" {home}
rm -f /tmp/fill /dev/shm/fill "$HOME/fill"
fill /mnt/session/outputs/fill {outputs}
rm -f /mnt/session/outputs/fill
head -c 32M /dev/urandom > /mnt/session/outputs/kept.bin
"""


def _kept(text: str, path: str) -> int:
    found = re.search(re.escape(path) + r" kept=(\d+)", text)
    assert found, text
    return int(found.group(1))


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def test_tmpfs_fills_stop_at_their_caps(open_scene: Any) -> None:
    """S-07: /tmp, /dev/shm, $HOME and /mnt/session/outputs are size-capped tmpfs: ENOSPC at
    the cap. What is left in outputs at the end of the turn is copied to the server's file store
    (host disk): bounded per turn by the outputs cap, not across turns."""
    async with open_scene() as scene:
        store_before = _dir_bytes(scene.settings.home)
        script = FILL.format(
            tmp=VICTIM_LIMITS["tmp_mb"] * 2,
            home=HOME_TMPFS_MIB + 64,
            outputs=VICTIM_LIMITS["outputs_mb"] * 2,
        )
        run = await scene.victim.bash(script, timeout_ms=120_000)
        store_after = _dir_bytes(scene.settings.home)
        after = await scene.both_answer()
        kept = {
            "tmp": _kept(run.text, "/tmp/fill"),
            "dev_shm": _kept(run.text, "/dev/shm/fill"),
            "home": _kept(run.text, "/home/agent/fill"),
            "outputs": _kept(run.text, "/mnt/session/outputs/fill"),
        }
        numbers = {
            "caps_mib": {
                "tmp": VICTIM_LIMITS["tmp_mb"],
                "dev_shm": 64,
                "home": HOME_TMPFS_MIB,
                "outputs": VICTIM_LIMITS["outputs_mb"],
            },
            "kept_mib": {k: round(v / MIB, 2) for k, v in kept.items()},
            "enospc_reports": run.text.count("No space left on device"),
            "data_dir_growth_mib": round((store_after - store_before) / MIB, 1),
            "echo_after_s": after,
        }
        record("tmpfs_fill", numbers)
        for name, cap in numbers["caps_mib"].items():
            assert kept[name] <= cap * MIB * 1.01, (name, numbers)
            assert kept[name] >= cap * MIB * 0.9, (name, numbers)
        assert numbers["enospc_reports"] == 4, run.text
        # The 32 MiB file left in outputs was collected into the store, and nothing more.
        assert 32 <= numbers["data_dir_growth_mib"] <= VICTIM_LIMITS["outputs_mb"] + 8, numbers


async def test_workspace_fill_is_bounded(open_scene: Any) -> None:
    """S-07 for the workspace: reserving more than the environment's 1 GiB `workspace_mb` fails
    (RLIMIT_FSIZE: "File too large"), and the session answers afterwards. (fallocate reserves
    blocks without writing them, so the attempt costs no real I/O.)"""
    async with open_scene() as scene:
        size = WORKSPACE_CAP_MIB + 64
        run = await scene.victim.bash(
            f"fallocate -l {size}M /workspace/fill && echo reserved; "
            'df -k /workspace | awk \'NR==2 {print "size_k=" $2 " avail_k=" $4}\'; '
            "rm -f /workspace/fill",
            timeout_ms=60_000,
        )
        after = await scene.both_answer()
        record(
            "workspace_fill",
            {"asked_mib": size, "output": run.text[-300:], "echo_after_s": after},
        )
        assert "reserved" not in run.text, run.text


async def test_output_flood_is_truncated_and_server_memory_stays_bounded(
    open_scene: Any,
) -> None:
    """B-07: 1 GiB on stdout reaches the server through the exec socket; the tool result keeps
    head and tail (100 KiB), the stored event is small, server RSS stays flat; and B-08: a flood
    of the container's own stdout (its log) is capped by json-file rotation (10 MiB x 3)."""
    async with open_scene() as scene:
        await scene.both_answer()  # warm up: the first model call loads the SDK
        samples: list[int] = []
        reset_peak_rss()
        rss_before = rss_kib()
        outcome: dict[str, Any] = {}

        async def flood() -> None:
            start = anyio.current_time()
            run = await scene.victim.bash("yes | head -c 1G", timeout_ms=180_000, limit=240)
            outcome.update(seconds=round(anyio.current_time() - start, 1), run=run)

        async def sample() -> None:
            while "run" not in outcome:
                samples.append(rss_kib())
                await anyio.sleep(0.05)

        async def bystand() -> None:
            await anyio.sleep(1.5)  # the flood is under way by then
            start = anyio.current_time()
            outcome["bystander"] = await scene.bystander.bash("echo ok", limit=60)
            outcome["bystander_s"] = round(anyio.current_time() - start, 2)

        async with anyio.create_task_group() as group:
            group.start_soon(flood)
            group.start_soon(sample)
            group.start_soon(bystand)
        bystander, bystander_latency = outcome["bystander"], outcome["bystander_s"]
        run = outcome["run"]
        rss_peak = peak_rss_kib()
        rss_after = rss_kib()
        log_run = await scene.victim.bash(
            "head -c 64M /dev/zero | tr '\\0' x | fold -w 1000 > /proc/1/fd/1; echo logged",
            timeout_ms=120_000,
            limit=180,
        )
        log_bytes = await docker_info(scene.container, "log")
        after = await scene.both_answer()
        numbers = {
            "flood_seconds": outcome["seconds"],
            "result_chars": len(run.text),
            "stored_event_bytes": run.stored_bytes,
            "mcp_event_chars": run.mcp_event_chars,
            "rss_before_mib": round(rss_before / 1024, 1),
            "rss_peak_mib": round(rss_peak / 1024, 1),
            "rss_max_sampled_mib": round(max(samples, default=rss_before) / 1024, 1),
            "rss_after_mib": round(rss_after / 1024, 1),
            "rss_samples": len(samples),
            "bystander_echo_during_flood_s": bystander_latency,
            "container_log_flood": log_run.text[-100:],
            "container_log_bytes_on_host_mib": round(log_bytes / MIB, 1),
            "echo_after_s": after,
        }
        record("output_flood", numbers)
        assert bystander.text.strip() == "ok"
        assert "bytes of output truncated" in run.text
        assert len(run.text) <= 110 * 1024
        assert run.stored_bytes <= 1 << 20
        assert run.mcp_event_chars <= 40_000
        assert rss_peak - rss_before < 300 * 1024, numbers
        assert "logged" in log_run.text
        assert log_bytes <= 31 * MIB, numbers


async def test_collecting_outputs_keeps_server_memory_bounded(open_scene: Any) -> None:
    """B-05/B-07 for outputs: a sub-agent filling its outputs tmpfs (files under the 100 MiB
    per-file collection cap) must not make the server's resident memory jump."""
    async with open_scene(memory_mb=1024, outputs_mb=256) as scene:
        await scene.both_answer()
        reset_peak_rss()
        before = rss_kib()
        run = await scene.victim.bash(
            "for i in 1 2; do head -c 95M /dev/urandom > /mnt/session/outputs/big$i.bin; done; "
            "du -sm /mnt/session/outputs | cut -f1",
            timeout_ms=60_000,
        )
        peak = peak_rss_kib()
        numbers = {
            "outputs_mib": run.text.strip(),
            "rss_before_mib": round(before / 1024, 1),
            "rss_peak_mib": round(peak / 1024, 1),
            "rss_after_mib": round(rss_kib() / 1024, 1),
            "data_dir_mib": round(_dir_bytes(scene.settings.home) / MIB, 1),
        }
        record("outputs_collection", numbers)
        assert peak - before < 128 * 1024, numbers
