"""`python main.py work QUEUE -- COMMAND`: run a command once per message.

Each slot claims up to `batch` messages at a time and runs the command for each in turn. The body
goes to the command's stdin and the metadata to `POMBO_*` environment variables, the message's
trace as `POMBO_TRACEPARENT` (W3C Trace Context, with this run as the parent span). Exit 0 acks
(a batch's successes in one request when it is done); anything else nacks with the command's
last stderr line. The leases of a batch are extended until its messages are settled. The first
SIGINT/SIGTERM stops claiming, lets running commands finish and gives back messages not yet
run; a second one stops the commands and releases their messages for another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loguru import logger

import tracing
from client import PomboClient, PomboError, body_text
from schemas import HEADER_NAME_PATTERN
from tracing import TraceParent

# Long enough to be cheap when idle, short enough that a stop is quick.
CLAIM_WAIT_SECONDS = 2.0
ERROR_PAUSE_SECONDS = 1.0
STOP_GRACE_SECONDS = 5.0
STDERR_GRACE_SECONDS = 1.0


class WorkerError(Exception):
    """The worker cannot go on (its command cannot be started)."""


@dataclass(frozen=True)
class WorkerOptions:
    queue: str
    command: Sequence[str]
    concurrency: int = 1
    visibility_timeout: float = 30.0
    # Messages per claim: a batch costs a claim and an ack instead of two requests per message.
    # 1 suits long commands, whose queued messages other workers could otherwise be running.
    batch: int = 10


class Worker:
    def __init__(self, client: PomboClient, options: WorkerOptions) -> None:
        self._client = client
        self._options = options
        self._stopping = asyncio.Event()
        self._aborting = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal)
        logger.info(
            "working on {} with {} slot(s), claiming up to {} at a time: {}",
            self._options.queue,
            self._options.concurrency,
            self._options.batch,
            " ".join(self._options.command),
        )
        await asyncio.gather(*(self._slot() for _ in range(self._options.concurrency)))

    def _on_signal(self) -> None:
        if self._stopping.is_set():
            logger.warning("stopping now: running commands are stopped and their messages released")
            self._aborting.set()
        else:
            logger.info("stopping: finishing running commands (signal again to stop them)")
            self._stopping.set()

    async def _slot(self) -> None:
        options = self._options
        while not self._stopping.is_set():
            try:
                claimed = await self._client.claim(
                    options.queue, CLAIM_WAIT_SECONDS, options.visibility_timeout, options.batch
                )
            except PomboError as error:
                if error.status in (401, 403, 404):  # no retry will fix a token, a scope or a name
                    raise WorkerError(f"cannot claim from {options.queue}: {error}") from None
                logger.error("claim failed: {}", error)
                await asyncio.sleep(ERROR_PAUSE_SECONDS)
                continue
            if claimed:
                await self._work_through(claimed)

    async def _work_through(self, claimed: list[dict[str, Any]]) -> None:
        """Run each message in turn, then ack the successes together; leases are kept meanwhile."""
        held = list(claimed)  # leased to this slot until acked, nacked or released
        succeeded: list[dict[str, Any]] = []
        keeper = asyncio.create_task(self._keep_leases(held))
        ran = 0
        try:
            for message in claimed:
                if await self._handle(message):
                    succeeded.append(message)
                else:
                    held.remove(message)
                ran += 1
        finally:
            keeper.cancel()
            await self._ack(succeeded)
            for message in claimed[ran + 1 :]:  # the command cannot be run: the rest go back now
                await self._release(message, "worker stopped before running it")

    async def _handle(self, message: dict[str, Any]) -> bool:
        """Run the command for `message`; True when it succeeded (the ack comes with its batch)."""
        if self._stopping.is_set():
            await self._release(message, "worker stopped before running it")
            return False
        own = own_span(message)
        with logger.contextualize(trace_id=own.trace_id):  # what the worker says of it, traced
            code, error = await self._execute(message, own)
            if code is None:
                await self._release(message, "worker stopped while running it")
            elif code != 0:
                await self._settle(
                    self._client.nack(self._options.queue, message["id"], message["lease_id"], error)
                )
        return code == 0

    async def _ack(self, succeeded: list[dict[str, Any]]) -> None:
        if len(succeeded) <= 1:
            for message in succeeded:
                await self._settle(self._client.ack(self._options.queue, message["id"], message["lease_id"]))
            return
        try:
            await self._client.ack_many(self._options.queue, succeeded)
        except PomboError as error:
            if error.status != 409:
                logger.warning("could not settle {} messages: {}", len(succeeded), error)
                return
            # A batch ack is all or nothing: one lost lease must not cost the others their ack.
            for message in succeeded:
                await self._settle(self._client.ack(self._options.queue, message["id"], message["lease_id"]))

    async def _execute(self, message: dict[str, Any], own: TraceParent) -> tuple[int | None, str]:
        """Run the command; (exit status, last stderr line), or (None, …) when aborted."""
        try:
            process = await asyncio.create_subprocess_exec(
                *self._options.command,
                stdin=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, **message_environment(message, own)},
                start_new_session=True,  # so a stop reaches the command's own children too
            )
        except OSError as error:
            # Every message would fail the same way: give this one back and stop.
            await self._release(message, f"cannot run the command: {error}")
            raise WorkerError(f"cannot run {self._options.command[0]!r}: {error.strerror}") from None
        feeding = asyncio.create_task(_feed(process, body_text(message).encode()))
        errors = asyncio.create_task(_last_line(process))
        finished = asyncio.create_task(process.wait())
        aborted = asyncio.create_task(self._aborting.wait())
        done, _ = await asyncio.wait({finished, aborted}, return_when=asyncio.FIRST_COMPLETED)
        stopped = finished not in done
        if stopped:
            await _stop(process)
        aborted.cancel()
        await asyncio.gather(feeding, return_exceptions=True)
        # A child the command left behind may hold stderr open: do not wait for it long.
        last = ""
        with contextlib.suppress(TimeoutError):
            last = await asyncio.wait_for(errors, STDERR_GRACE_SECONDS)
        return (None if stopped else process.returncode), last or f"exit status {process.returncode}"

    async def _keep_leases(self, held: list[dict[str, Any]]) -> None:
        every = max(self._options.visibility_timeout / 3, 0.1)
        while True:
            await asyncio.sleep(every)
            for message in list(held):
                try:
                    await self._client.extend(
                        self._options.queue,
                        message["id"],
                        message["lease_id"],
                        self._options.visibility_timeout,
                    )
                except PomboError as error:
                    logger.warning("could not extend the lease of {}: {}", message["id"], error)

    async def _release(self, message: dict[str, Any], reason: str) -> None:
        await self._settle(
            self._client.nack(self._options.queue, message["id"], message["lease_id"], reason, delay=0)
        )

    async def _settle(self, call: Any) -> None:
        try:
            await call
        except PomboError as error:
            # The lease may have expired meanwhile: the server hands the message out again.
            logger.warning("could not settle a message: {}", error)


async def _stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM to the command's process group, SIGKILL if it lingers."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_SECONDS)
            return
        except TimeoutError:
            continue


async def _feed(process: asyncio.subprocess.Process, body: bytes) -> None:
    assert process.stdin is not None
    try:
        process.stdin.write(body)
        await process.stdin.drain()
        process.stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the command did not read its input: that is its business


async def _last_line(process: asyncio.subprocess.Process) -> str:
    """Pass the command's stderr through, remembering its last non-empty line."""
    assert process.stderr is not None
    last = ""
    async for raw in process.stderr:
        sys.stderr.buffer.write(raw)
        line = raw.decode(errors="replace").strip()
        last = line or last
    sys.stderr.flush()
    return last


def message_environment(message: dict[str, Any], own: TraceParent) -> dict[str, str]:
    env = {
        "POMBO_QUEUE": str(message["queue"]),
        "POMBO_MESSAGE_ID": str(message["id"]),
        "POMBO_MESSAGE_TYPE": str(message["type"]),
        "POMBO_PRIORITY": str(message["priority"]),
        "POMBO_ATTEMPTS": str(message["attempts"]),
        "POMBO_CONTENT_TYPE": str(message["content_type"]),
        "POMBO_CREATED_AT": str(message["created_at"]),
        "POMBO_TRACEPARENT": str(own),
    }
    for name, value in message.get("headers", {}).items():
        # Stored before the server checked header names: one would stop every command starting.
        if re.fullmatch(HEADER_NAME_PATTERN, name) and "\x00" not in str(value):
            env[f"POMBO_HEADER_{name.upper().replace('-', '_')}"] = str(value)
    return env


def own_span(message: dict[str, Any]) -> TraceParent:
    """This run of the command as a span of the message's trace, under its publish (a trace of
    its own for a message stored without one). Each run is a new span: attempts are distinct."""
    publish = tracing.parse(message.get("traceparent") or "")
    return publish.child() if publish is not None else tracing.new_trace()
