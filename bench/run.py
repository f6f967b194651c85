"""Start the servers, run scenarios against each in one run, print the figures and Pombo/baseline.

    .venv/bin/python bench/run.py                                   # everything, default sizes
    .venv/bin/python bench/run.py --scenario fanout --subscribers 1000 --rate 50
    .venv/bin/python bench/run.py --targets baseline,pombo-sqlite --scenario publish --clients 32

Targets: `baseline` (bench/baseline.py on Redis), `pombo-sqlite` (the embedded default in a
temporary data dir), `pombo-postgres` (a fresh database on --postgres, created and dropped here,
and Redis). Scenarios run one after another, each on every target in turn, so a change in the
machine's load hits all targets alike. Everything started here is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import FrameType

import servers
import uvloop
from loadgen import raise_open_files_limit, report, run_scenarios, say
from options import Options, add_arguments, chosen
from results import Result, ratios, rounds
from servers import Server
from wire import Target

TARGETS = ("baseline", "pombo-sqlite", "pombo-postgres")


Starter = Callable[[], contextlib.AbstractContextManager[Server]]


def _starters(args: argparse.Namespace, workdir: Path) -> list[tuple[str, Starter]]:
    """Each chosen target, and after each Pombo one its variants (`--variant`), labelled."""
    chosen: list[tuple[str, Starter]] = []
    for label in args.targets:
        if label == "baseline":
            chosen.append((label, partial(servers.baseline, workdir, args.redis)))
            continue
        for variant, extra in [("", {}), *args.variant]:
            settings = {**dict(args.server_env), **extra}
            named = f"{label}+{variant}" if variant else label
            if label == "pombo-sqlite":
                chosen.append((named, partial(servers.pombo_sqlite, workdir, settings, named)))
            else:
                start = partial(servers.pombo_postgres, workdir, settings, args.postgres, args.redis, named)
                chosen.append((named, start))
    return chosen


async def compare(
    started: list[Server], options: Options, names: list[str], results: list[Result], rounds: int = 1
) -> None:
    """Each scenario on every target in turn, `rounds` times (every other round in reverse, so a
    drift in the machine's speed favours no target); results land in `results` as they come."""
    for turn in range(rounds):
        for name in names:
            await _each_target(started[:: -1 if turn % 2 else 1], options, name, results)


async def _each_target(started: list[Server], options: Options, name: str, results: list[Result]) -> None:
    for server in started:
        if name in server.unsupported:
            say(f"{server.label}: {name} skipped (not offered)")
            continue
        if server.exit_code is not None:
            note = f"not run: the server had exited ({server.exit_code}); see {server.log_path}"
            results.append(Result(name, {}, {}, server.label, [note]))
            continue
        target = Target.parse(server.url, server.token)
        per_server = dataclasses.replace(options, server_pid=server.pid)
        results += await run_scenarios(target, per_server, [name], server.label)


def _stop_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP all unwind, so the servers are stopped and the database dropped.

    SIGINT too: a shell without job control starts background commands with it ignored.
    """

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)


def _benchmark(args: argparse.Namespace, names: list[str], options: Options, results: list[Result]) -> None:
    """Start the targets, compare them, stop them; a server's log is kept when it died on its own."""
    workdir = Path(tempfile.mkdtemp(prefix="pombo-bench-"))
    keep = args.keep_logs
    try:
        with contextlib.ExitStack() as stack:
            started = []
            for label, starter in _starters(args, workdir):
                say(f"starting {label}")
                started.append(stack.enter_context(starter()))
            uvloop.run(compare(started, options, names, results, args.rounds))
            keep = keep or any(server.exit_code is not None for server in started)
            say("stopping the servers")
    finally:
        if keep:
            say(f"server logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _print(results: list[Result], load_before: tuple[float, ...], compared: bool) -> None:
    report(results)
    if compared:
        print("\nRounds: each target's figures in the order run, the median, and median / the same")
        print("target's without a variant")
        print(rounds(results))
    if any(r.target == "baseline" for r in results):
        print("\nPombo / baseline (ratio > 1: Pombo's figure is the larger)")
        print(ratios(results, "baseline"))
    load = "/".join(f"{x:.2f}" for x in load_before)
    after = "/".join(f"{x:.2f}" for x in os.getloadavg())
    cores = os.cpu_count()
    print(f"\nmachine: {cores} cores shared by the servers and the load generator")
    print(f"load average (1/5/15 min): {load} before, {after} after")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--targets", type=_targets, default=list(TARGETS), help=f"comma-separated: {', '.join(TARGETS)}")
    add("--redis", default="redis://127.0.0.1:6379/0")
    add("--postgres", default="postgres://postgres@127.0.0.1:5432/postgres", help="an admin URL")
    setting = "a setting for the Pombo servers (repeatable)"
    add("--server-env", type=_setting, action="append", default=[], metavar="POMBO_X=VALUE", help=setting)
    add("--keep-logs", action="store_true", help="keep the servers' temporary directory")
    variant = 'also each Pombo target with these settings: "LABEL POMBO_X=V POMBO_Y=W" (repeatable)'
    add("--variant", type=_variant, action="append", default=[], metavar="SPEC", help=variant)
    add("--rounds", type=int, default=1, help="run the scenarios this many times, interleaved (A/B)")
    add_arguments(parser)
    return parser


def _setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name.startswith("POMBO_"):
        raise argparse.ArgumentTypeError(f"expected POMBO_NAME=VALUE, got {text!r}")
    return name, value


def _variant(text: str) -> tuple[str, dict[str, str]]:
    label, *given = text.split()
    if not label.replace("-", "").isalnum():
        raise argparse.ArgumentTypeError(
            f"a variant starts with its label (letters, digits, -), got {text!r}"
        )
    return label, dict(_setting(item) for item in given)


def _targets(text: str) -> list[str]:
    labels = [t.strip() for t in text.split(",") if t.strip()]
    if unknown := sorted(set(labels) - set(TARGETS)):
        raise argparse.ArgumentTypeError(f"unknown target {', '.join(unknown)}")
    return labels


def main() -> int:
    args = _parser().parse_args()
    names, options = chosen(args.scenario), Options.from_args(args)
    raise_open_files_limit()
    _stop_on_signals()
    load_before, results = os.getloadavg(), []
    compared = bool(args.variant) or args.rounds > 1
    try:
        _benchmark(args, names, options, results)
    except KeyboardInterrupt:
        say("interrupted: every server started here is stopped; partial results follow")
        _print(results, load_before, compared)
        return 130
    _print(results, load_before, compared)
    return 0


if __name__ == "__main__":
    sys.exit(main())
