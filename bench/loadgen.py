"""Load generator for a running Pombo server (or the baseline): prints a table, then JSON lines.

    .venv/bin/python bench/loadgen.py --url http://127.0.0.1:8000 --token $TOKEN --scenario publish
    .venv/bin/python bench/loadgen.py --scenario fanout --subscribers 100 --duration 5 --token $TOKEN
    .venv/bin/python bench/loadgen.py --scenario connections --streams 10000 --server-pid $PID ...

Every scenario stops by itself: each measurement sends for at most --duration seconds (and at
most the given count), then waits at most --drain seconds for late deliveries.
See bench/README.md for what each scenario measures.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable

import fanout
import reads
import throughput
import uvloop
from options import Options, add_arguments, chosen
from results import Result, table
from wire import Target

Scenario = Callable[[Target, Options], Awaitable[list[Result]]]
SCENARIOS: dict[str, Scenario] = {
    "publish": throughput.publish,
    "batch": throughput.batch,
    "fanout": fanout.fanout,
    "connections": fanout.connections,
    "claim": throughput.claim,
    "reads": reads.reads,
}


def raise_open_files_limit() -> int:
    """Every stream is a socket: lift the soft limit to the hard one and say what we have."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def say(text: str) -> None:
    """Progress goes to stderr, so stdout stays the table and the JSON lines."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


async def run_scenarios(target: Target, options: Options, names: list[str], label: str) -> list[Result]:
    """Each named scenario in turn; one that fails is reported and the others still run."""
    results: list[Result] = []
    for name in names:
        say(f"{label}: {name}")
        try:
            found = await SCENARIOS[name](target, options)
        except Exception as error:  # noqa: BLE001 - one broken scenario must not hide the others
            found = [Result(name, {}, {}, notes=[f"failed: {type(error).__name__}: {error}"])]
        for result in found:
            result.target = label
            say(f"{label}: {result.as_json()}")
        results += found
    return results


def report(results: list[Result]) -> None:
    print(table(results))
    for result in results:
        print(result.as_json())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=os.environ.get("POMBO_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--token", default=os.environ.get("POMBO_TOKEN"), help="default: $POMBO_TOKEN")
    parser.add_argument("--label", default="server", help="the target's name in the output")
    add_arguments(parser)
    args = parser.parse_args()
    names, options = chosen(args.scenario), Options.from_args(args)
    limit = raise_open_files_limit()
    if "connections" in names and options.streams + 100 > limit:
        parser.error(f"--streams {options.streams} needs more open files than the hard limit {limit}")
    target = Target.parse(args.url, args.token)
    report(uvloop.run(run_scenarios(target, options, names, args.label)))


if __name__ == "__main__":
    main()
