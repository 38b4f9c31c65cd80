"""Measured rows, their summaries, and the table, JSON and chart made from them."""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CASE_TITLES = {
    "start": "1. session start to first command runnable",
    "tool_call": "2. tool-call overhead",
    "event_path": "3. event path",
    "scale": "4. scale",
    "cold_start": "5. server cold start to tools/list over stdio",
    "peers": "6. beside the peers: start a sandbox, run short commands, tear down",
}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0


@dataclass
class Row:
    """One measured quantity: its samples and what they mean."""

    name: str
    unit: str
    samples: list[float]
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        values = self.samples
        out: dict[str, Any] = {"name": self.name, "unit": self.unit, "n": len(values)}
        if values:
            out |= {
                "min": min(values),
                "median": statistics.median(values),
                "max": max(values),
                "mean": statistics.fmean(values),
                "p90": percentile(values, 90),
                "p99": percentile(values, 99),
            }
        if self.note:
            out["note"] = self.note
        return out | self.extra


@dataclass
class Comparison:
    """A figure derived from rows of the same run (a ratio or a difference of medians)."""

    name: str
    value: float
    unit: str
    note: str = ""


@dataclass
class Case:
    """One benchmark case's rows, derived figures and anything that blocked part of it."""

    key: str
    rows: list[Row] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    peers: dict[str, str] = field(default_factory=dict)
    """Peer name → "ran" or "blocked: <reason>" (peers case only)."""
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    load_before: float = field(default_factory=load_average)

    def add(self, name: str, unit: str, samples: list[float], note: str = "", **extra: Any) -> Row:
        row = Row(name, unit, list(samples), note, extra)
        self.rows.append(row)
        return row

    def row(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.name == name), None)

    def median(self, name: str) -> float | None:
        row = self.row(name)
        return statistics.median(row.samples) if row and row.samples else None

    def compare(self, name: str, value: float | None, unit: str, note: str = "") -> None:
        if value is not None and math.isfinite(value):
            self.comparisons.append(Comparison(name, value, unit, note))

    def ratio(self, name: str, top: str, bottom: str, note: str = "") -> None:
        """Median of row `top` over median of row `bottom`, when both exist."""
        a, b = self.median(top), self.median(bottom)
        if a is not None and b:
            self.compare(name, a / b, "x", note or f"median of «{top}» / median of «{bottom}»")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "title": CASE_TITLES[self.key],
            "seconds": round(self.seconds, 2),
            "load_before": self.load_before,
            "rows": [r.summary() for r in self.rows],
            "comparisons": [vars(c) for c in self.comparisons],
            "notes": self.notes,
        }
        if self.peers:
            out["peers"] = self.peers
        if self.error:
            out["error"] = self.error
        return out


def fmt(value: float) -> str:
    """Three significant digits, no exponent for the magnitudes seen here."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    if magnitude >= 0.01:
        return f"{value:.3f}"
    return f"{value:.2g}"


def markdown_table(cases: list[Case]) -> str:
    """All rows as one Markdown table, then each case's derived figures and blockers."""
    lines = [
        "| case | measure | n | min | median | max | unit |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        label = CASE_TITLES[case.key].split(" ", 1)[0].rstrip(".")
        if case.error:
            lines.append(f"| {label} | **failed**: {case.error} | | | | | |")
        for row in case.rows:
            s = row.summary()
            if not row.samples:
                continue
            cells = [fmt(s["min"]), fmt(s["median"]), fmt(s["max"])]
            lines.append(f"| {label} | {row.name} | {s['n']} | {' | '.join(cells)} | {row.unit} |")
    for case in cases:
        bullets = [f"- {c.name}: **{fmt(c.value)} {c.unit}**" for c in case.comparisons]
        bullets += [f"- {peer}: {status}" for peer, status in case.peers.items() if status != "ran"]
        bullets += [f"- {note}" for note in case.notes]
        if bullets:
            lines += ["", f"**{CASE_TITLES[case.key]}**", "", *bullets]
    return "\n".join(lines) + "\n"


def write_json(path: Path, meta: dict[str, Any], cases: list[Case]) -> None:
    payload = {"meta": meta, "cases": {c.key: c.to_json() for c in cases}}
    path.write_text(json.dumps(payload, indent=2) + "\n")


def write_chart(path: Path, cases: list[Case]) -> str | None:
    """A PNG: per case, every millisecond row as median with a min–max whisker (log scale).

    Returns why no chart was drawn, or None.
    """
    try:
        # A bench-group dependency: the type checker may run without it.
        import matplotlib  # pyright: ignore[reportMissingImports]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pyright: ignore[reportMissingImports]
    except ImportError:
        return "matplotlib is not installed (uv sync --group bench): no chart"
    panels = [(c, [r for r in c.rows if r.unit == "ms" and r.samples]) for c in cases]
    panels = [(c, rows) for c, rows in panels if rows]
    if not panels:
        return "no millisecond rows to chart"
    heights = [max(1.2, 0.32 * len(rows) + 0.8) for _, rows in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(11, sum(heights)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, (case, rows) in zip(axes[:, 0], panels, strict=True):
        medians = [statistics.median(r.samples) for r in rows]
        low = [m - min(r.samples) for m, r in zip(medians, rows, strict=True)]
        high = [max(r.samples) - m for m, r in zip(medians, rows, strict=True)]
        colours = ["#4c72b0" if _ours(r.name) else "#dd8452" for r in rows]
        positions = list(range(len(rows)))
        ax.barh(positions, medians, xerr=[low, high], color=colours, capsize=2)
        ax.set_yticks(positions, [r.name for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_title(CASE_TITLES[case.key], fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("ms (median, whiskers min–max; orange = peer)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None


def _ours(name: str) -> bool:
    return not name.startswith(("llm-sandbox", "swe-rex"))


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "load_average": load_average()}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_mib"] = int(line.split()[1]) // 1024
    except OSError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["kernel"] = os.uname().release
    return info
