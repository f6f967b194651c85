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
from pathlib import Path
from types import FrameType

import servers
import uvloop
from loadgen import raise_open_files_limit, report, run_scenarios, say
from options import Options, add_arguments, chosen
from results import Result, ratios
from servers import Server
from wire import Target

TARGETS = ("baseline", "pombo-sqlite", "pombo-postgres")
# pombo-sqlite again with the --variant-env settings: an A/B of a setting within one run.
VARIANT = "pombo-sqlite-variant"


def _starters(
    args: argparse.Namespace, workdir: Path
) -> dict[str, Callable[[], contextlib.AbstractContextManager[Server]]]:
    settings = dict(args.server_env)
    variant = {**settings, **dict(args.variant_env)}
    return {
        "baseline": lambda: servers.baseline(workdir, args.redis),
        "pombo-sqlite": lambda: servers.pombo_sqlite(workdir, settings),
        VARIANT: lambda: servers.pombo_sqlite(workdir, variant, label=VARIANT),
        "pombo-postgres": lambda: servers.pombo_postgres(workdir, settings, args.postgres, args.redis),
    }


async def compare(started: list[Server], options: Options, names: list[str], results: list[Result]) -> None:
    """Each scenario on every target in turn; results land in `results` as they come."""
    for name in names:
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
            starters = _starters(args, workdir)
            started = []
            for label in args.targets:
                say(f"starting {label}")
                started.append(stack.enter_context(starters[label]()))
            uvloop.run(compare(started, options, names, results))
            keep = keep or any(server.exit_code is not None for server in started)
            say("stopping the servers")
    finally:
        if keep:
            say(f"server logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _print(results: list[Result], load_before: tuple[float, ...]) -> None:
    report(results)
    if any(r.target == "baseline" for r in results):
        print("\nPombo / baseline (ratio > 1: Pombo's figure is the larger)")
        print(ratios(results, "baseline"))
    if any(r.target == VARIANT for r in results):
        print(f"\n{VARIANT} / pombo-sqlite (ratio > 1: the variant's figure is the larger)")
        print(ratios([r for r in results if r.target in ("pombo-sqlite", VARIANT)], "pombo-sqlite"))
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
    variant = f"also run {VARIANT}, pombo-sqlite with this setting too, right after it (repeatable)"
    add("--variant-env", type=_setting, action="append", default=[], metavar="POMBO_X=VALUE", help=variant)
    add("--keep-logs", action="store_true", help="keep the servers' temporary directory")
    add_arguments(parser)
    return parser


def _setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name.startswith("POMBO_"):
        raise argparse.ArgumentTypeError(f"expected POMBO_NAME=VALUE, got {text!r}")
    return name, value


def _targets(text: str) -> list[str]:
    labels = [t.strip() for t in text.split(",") if t.strip()]
    if unknown := sorted(set(labels) - {*TARGETS, VARIANT}):
        raise argparse.ArgumentTypeError(f"unknown target {', '.join(unknown)}")
    return labels


def main() -> int:
    args = _parser().parse_args()
    if args.variant_env and VARIANT not in args.targets:
        at = args.targets.index("pombo-sqlite") + 1 if "pombo-sqlite" in args.targets else len(args.targets)
        args.targets.insert(at, VARIANT)
    names, options = chosen(args.scenario), Options.from_args(args)
    raise_open_files_limit()
    _stop_on_signals()
    load_before, results = os.getloadavg(), []
    try:
        _benchmark(args, names, options, results)
    except KeyboardInterrupt:
        say("interrupted: every server started here is stopped; partial results follow")
        _print(results, load_before)
        return 130
    _print(results, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
