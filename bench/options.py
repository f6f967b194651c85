"""What a run asks for: the scenarios' sizes and limits, shared by loadgen.py and run.py."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

# The order they run in: connections first, while the server's memory has not yet grown for other
# streams (freed memory is seldom returned to the OS, so a later RSS growth would understate).
SCENARIOS = ("connections", "publish", "batch", "fanout", "claim", "reads")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class Options:
    duration: float = 10.0
    drain: float = 5.0
    clients: int = 16
    messages: int = 20_000
    batch_sizes: tuple[int, ...] = (100, 1000)
    batch_clients: int = 2
    batch_messages: int = 50_000
    subscribers: tuple[int, ...] = (1, 100, 1000)
    rate: float = 20.0
    streams: int = 1000
    hold: float = 5.0
    open_concurrency: int = 100
    workers: int = 8
    claim_messages: int = 5000
    claim_batch: tuple[int, ...] = (1, 10)
    read_queues: int = 10
    read_messages: int = 10_000
    readers: int = 16
    read_rate: float = 20.0
    reads: int = 200_000
    server_pid: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scenario options, with the defaults above, for any command line that runs scenarios."""
    d = Options()
    add = parser.add_argument
    add("--scenario", default="all", help=f"all, or a comma-separated list of: {', '.join(SCENARIOS)}")
    add("--duration", type=float, default=d.duration, help="most seconds one measurement may send for")
    add("--drain", type=float, default=d.drain, help="seconds to wait for late deliveries")
    add("--clients", type=int, default=d.clients, help="publish: concurrent clients")
    add("--messages", type=int, default=d.messages, help="publish: at most this many messages")
    add("--batch-sizes", type=_ints, default=d.batch_sizes, help="batch: messages per request")
    add("--batch-clients", type=int, default=d.batch_clients, help="batch: concurrent clients")
    add("--batch-messages", type=int, default=d.batch_messages, help="batch: at most this many per size")
    add("--subscribers", type=_ints, default=d.subscribers, help="fanout: subscriber counts to try")
    add("--rate", type=float, default=d.rate, help="fanout: messages per second")
    add("--streams", type=int, default=d.streams, help="connections: idle streams to hold")
    add("--hold", type=float, default=d.hold, help="connections: seconds to hold them before publishing")
    add("--open-concurrency", type=int, default=d.open_concurrency, help="streams being opened at once")
    add("--workers", type=int, default=d.workers, help="claim: concurrent workers")
    add("--claim-messages", type=int, default=d.claim_messages, help="claim: messages to work through")
    add(
        "--claim-batch",
        type=_ints,
        default=d.claim_batch,
        help="claim: max messages per claim, each size in turn; 1 acks each alone, more in one batch ack",
    )
    add("--read-queues", type=int, default=d.read_queues, help="reads: queues to seed and read")
    add("--read-messages", type=int, default=d.read_messages, help="reads: messages seeded per queue")
    add("--readers", type=int, default=d.readers, help="reads: concurrent reading clients")
    add("--read-rate", type=float, default=d.read_rate, help="reads: messages/s published meanwhile")
    add("--reads", type=int, default=d.reads, help="reads: at most this many reads")
    add("--server-pid", type=int, default=None, help="connections: read this process's RSS")


def chosen(text: str) -> list[str]:
    """The named scenarios (or all), in the order above."""
    names = set(SCENARIOS) if text == "all" else {n.strip() for n in text.split(",") if n.strip()}
    if unknown := sorted(names - set(SCENARIOS)):
        raise SystemExit(f"unknown scenario {', '.join(unknown)}: choose from {', '.join(SCENARIOS)}")
    return [name for name in SCENARIOS if name in names]
