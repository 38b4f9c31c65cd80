"""`python -m bench`: run every case (`--smoke`: tiny counts), print a table, write the results."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import platform
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import anyio.to_thread

from .common import FULL, SMOKE, Bench, remove_work, sweep_bwrap, sweep_docker
from .results import CASE_TITLES, Case, machine, markdown_table, write_chart, write_json

CaseRunner = Callable[[Bench, Case], Awaitable[None]]

# Upper bounds per case (full, smoke) in seconds; a case past its bound is cancelled and
# reported as failed, and the run goes on with the next one.
BUDGETS = {
    "start": (150, 25),
    "tool_call": (120, 20),
    "event_path": (150, 20),
    "scale": (240, 30),
    "cold_start": (90, 20),
    "peers": (240, 60),
}
TOTAL_BUDGET = (570, 90)


def _runners() -> dict[str, CaseRunner]:
    from . import cold_start, event_path, peers, scale, start, tool_call

    return {
        "start": start.run,
        "tool_call": tool_call.run,
        "event_path": event_path.run,
        "scale": scale.run,
        "cold_start": cold_start.run,
        "peers": peers.run,
    }


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny counts (CI): well under 2 min")
    parser.add_argument(
        "--out", type=Path, help="results folder (default bench/results/<timestamp>)"
    )
    parser.add_argument(
        "--cases",
        default=",".join(CASE_TITLES),
        help=f"comma-separated subset of {', '.join(CASE_TITLES)}",
    )
    args = parser.parse_args(argv)
    unknown = set(args.cases.split(",")) - set(CASE_TITLES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    return args


def _meta(bench: Bench, started: datetime) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str] = {"python": platform.python_version()}
    for package in ("docker", "anthropic", "mcp", "llm-sandbox", "swe-rex"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    try:
        client = bench.docker()
        try:
            versions["docker engine"] = str(client.version().get("Version"))
        finally:
            client.close()
    except Exception as exc:  # the cases say what failed; the header just records it
        versions["docker engine"] = f"unreachable: {exc}"
    return {
        "mode": "smoke" if bench.smoke else "full",
        "run_id": bench.run_id,
        "started": started.isoformat(timespec="seconds"),
        "image": bench.image,
        "counts": dataclasses.asdict(bench.counts),
        "machine": machine(),
        "versions": versions,
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
    }


async def _run_all(bench: Bench, keys: list[str], out: Path, meta: dict[str, Any]) -> list[Case]:
    runners = _runners()
    cases: list[Case] = []
    deadline = time.monotonic() + TOTAL_BUDGET[bench.smoke]
    # The server imports anthropic and docker on first use (seconds); no case should pay that
    # except the cold start, which runs in fresh processes.
    for module in ("anthropic", "docker"):
        await anyio.to_thread.run_sync(importlib.import_module, module)
    with bench.fake_model():
        for key in keys:
            case = Case(key)
            cases.append(case)
            budget = min(BUDGETS[key][bench.smoke], deadline - time.monotonic())
            print(f"== {CASE_TITLES[key]} (at most {budget:.0f} s)", file=sys.stderr, flush=True)
            started = time.perf_counter()
            try:
                if budget <= 0:
                    msg = "skipped: the run's time budget is spent"
                    raise TimeoutError(msg)
                with anyio.fail_after(budget):
                    await runners[key](bench, case)
            except Exception as exc:
                logging.getLogger("bench").exception("case %s failed", key)
                case.error = f"{type(exc).__name__}: {exc}".strip()
            case.seconds = time.perf_counter() - started
            # Written after every case, so an interrupted run still leaves what it measured.
            write_json(out / "results.json", meta, cases)
    return cases


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # A SIGTERM (e.g. a test's timeout) must still reach the cleanup below.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # swe-rex logs every step at DEBUG through rich unless told otherwise (read at import).
    os.environ.setdefault("SWE_REX_LOG_STREAM_LEVEL", "WARNING")
    signal.signal(signal.SIGTERM, _interrupt)
    started = datetime.now(UTC)
    bench = Bench(counts=SMOKE if args.smoke else FULL, smoke=args.smoke)
    out: Path = args.out or Path("bench/results") / started.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    meta = _meta(bench, started)
    keys = [k for k in CASE_TITLES if k in args.cases.split(",")]
    t0 = time.perf_counter()
    cases: list[Case] = []
    try:
        cases = anyio.run(_run_all, bench, keys, out, meta)
    finally:
        leftovers = anyio.run(sweep_bwrap, bench) + sweep_docker(bench)
        remove_work(bench)
        if leftovers:
            print(f"cleaned up after the cases: {', '.join(leftovers)}", file=sys.stderr)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    meta["cleanup"] = leftovers
    write_json(out / "results.json", meta, cases)
    table = markdown_table(cases)
    (out / "table.md").write_text(table)
    chart_problem = write_chart(out / "chart.png", cases)
    print(table)
    print(f"{meta['mode']} run: {meta['seconds']} s; results in {out}/", end="")
    print(" (results.json, table.md" + (")" if chart_problem else ", chart.png)"))
    if chart_problem:
        print(chart_problem)
    return 1 if any(c.error for c in cases) else 0


if __name__ == "__main__":
    raise SystemExit(main())
