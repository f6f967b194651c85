"""What a scenario measured, and how it is printed: a table for people, a JSON line per result."""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

Value = float | int | str | None


@dataclass
class Result:
    scenario: str
    params: dict[str, Value]
    metrics: dict[str, Value]
    target: str = "server"
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return self.scenario, describe(self.params)

    def as_json(self) -> str:
        fields = {"target": self.target, "scenario": self.scenario, **self.params, **self.metrics}
        if self.notes:
            fields["notes"] = "; ".join(self.notes)
        return json.dumps(fields)


def percentile(ordered: Sequence[float], fraction: float) -> float | None:
    """Nearest rank on an already sorted sequence; None when there is nothing to rank."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def latency_ms(samples: list[float], *points: float) -> dict[str, Value]:
    """`p50_ms`, `p99_ms`, … and `max_ms` of samples given in seconds."""
    ordered = sorted(samples)
    summary: dict[str, Value] = {}
    for point in points:
        value = percentile(ordered, point / 100)
        summary[f"p{point:g}_ms"] = None if value is None else round(value * 1000, 1)
    summary["max_ms"] = round(ordered[-1] * 1000, 1) if ordered else None
    return summary


def per_second(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


class CpuMeter:
    """The load generator's own CPU use over a measurement, in percent of one core.

    Near 100 means the client, not the server, may be what limits the figure.
    """

    def __init__(self) -> None:
        self.started = (self._cpu(), time.perf_counter())

    @staticmethod
    def _cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def percent(self) -> float:
        cpu, wall = self._cpu() - self.started[0], time.perf_counter() - self.started[1]
        return round(100 * cpu / wall, 1) if wall > 0 else 0.0


class ServerCpu:
    """The server's CPU time over a measurement (user + system, from /proc), per operation.

    What the server spent on each operation moves far less with the rest of the machine's load
    than its latencies and rates do: the figure for an A/B of a change on a busy machine.
    """

    def __init__(self, pid: int | None) -> None:
        self._pid = pid
        self._started = self._seconds()

    def _seconds(self) -> float | None:
        if self._pid is None:
            return None
        try:
            fields = Path(f"/proc/{self._pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def us_per(self, operations: int) -> float | None:
        now = self._seconds()
        if now is None or self._started is None or operations <= 0:
            return None
        return round((now - self._started) / operations * 1e6, 1)


def describe(values: dict[str, Value]) -> str:
    return " ".join(f"{k}={show(v)}" for k, v in values.items())


def show(value: Value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return value


def table(results: Sequence[Result]) -> str:
    rows = [("target", "scenario", "params", "measured")]
    rows += [(r.target, r.scenario, describe(r.params), describe(r.metrics)) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
        for row in rows
    ]
    for result in results:
        lines += [f"  note ({result.target} {result.scenario}): {note}" for note in result.notes]
    return "\n".join(lines)


# The figures worth a ratio: rates, latencies and memory; counts and error tallies are not.
RATIO_FIGURES = (
    "messages_per_s",
    "open_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "kib_per_stream",
    "server_cpu_us_per_msg",
    "server_cpu_us_per_delivery",
)


def ratios(results: Sequence[Result], baseline: str) -> str:
    """Each headline figure: the baseline's, then every other target's with target/baseline."""
    base = {r.key: r.metrics for r in results if r.target == baseline}
    targets = list(dict.fromkeys(r.target for r in results if r.target != baseline))
    found = {(r.target, r.key): r.metrics for r in results}
    rows = [("scenario", "params", "figure", baseline, *targets)]
    for key, reference in base.items():
        for name in RATIO_FIGURES:
            if isinstance(reference.get(name), int | float):
                cells = [_compared(found.get((t, key), {}).get(name), reference[name]) for t in targets]
                rows.append((*key, name, show(reference[name]), *cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def _compared(value: Value, reference: Value) -> str:
    if not isinstance(value, int | float):
        return "-"
    if not isinstance(reference, int | float) or reference == 0:
        return show(value)
    return f"{show(value)} ({value / reference:.2f}x)"


# What an A/B of interleaved rounds compares: the steadiest figures of each scenario.
ROUND_FIGURES = ("messages_per_s", "server_cpu_us_per_msg", "server_cpu_us_per_delivery", "p99_ms")


def rounds(results: Sequence[Result], figures: Sequence[str] = ROUND_FIGURES) -> str:
    """Each figure of each scenario per target over the rounds, its median, and the median's
    ratio to its own target's without a variant (`pombo-sqlite+x` to `pombo-sqlite`): the A/B
    comparison of interleaved rounds."""
    rows = [("scenario", "params", "figure", "target", "rounds", "median", "ratio")]
    keys = list(dict.fromkeys(r.key for r in results))
    for key in keys:
        for name in figures:
            per_target: dict[str, list[float]] = {}
            for r in results:
                value = r.metrics.get(name)
                if r.key == key and isinstance(value, int | float):
                    per_target.setdefault(r.target, []).append(float(value))
            medians = {target: statistics.median(values) for target, values in per_target.items()}
            for target, values in per_target.items():
                median, reference = medians[target], medians.get(target.split("+")[0])
                ratio = f"{median / reference:.3f}x" if reference else "-"
                listed = " ".join(show(v) for v in values)
                rows.append((*key, name, target, listed, show(median), ratio))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)
