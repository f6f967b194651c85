"""A minimal SSE client on a raw socket: cheap enough to open a thousand at once, and able to
stop reading (with a small receive buffer) the way a stuck browser tab does.

It records the sequence number of each logged event (frames with an `id:` that are not control
events) and nothing else; `httpx-sse` clients in `load.py` do the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

from conftest import CONTROL_EVENTS

_CONTROL = {event.encode() for event in CONTROL_EVENTS}


class RawStream:
    def __init__(
        self, port: int, path: str, token: str, last_event_id: int, rcvbuf: int | None = None
    ) -> None:
        self.port, self.path, self.token, self.cursor, self.rcvbuf = port, path, token, last_event_id, rcvbuf
        self.status: int | None = None
        self.seqs: list[int] = []
        self.controls: list[bytes] = []
        self.eof = False
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._raw, self._text = bytearray(), bytearray()
        self._chunked, self._left, self._skip = False, 0, 0

    @property
    def last(self) -> int:
        return self.seqs[-1] if self.seqs else self.cursor

    async def open(self) -> int:
        """Connect and read the response head; returns the status."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        except OSError:
            sock.close()
            raise
        self._reader, self._writer = await asyncio.open_connection(sock=sock, limit=2**16)
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nAccept: text/event-stream\r\n"
            f"Authorization: Bearer {self.token}\r\nLast-Event-ID: {self.cursor}\r\nConnection: close\r\n\r\n"
        )
        self._writer.write(request.encode())
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *headers = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self._chunked = any(h.lower().replace(" ", "") == "transfer-encoding:chunked" for h in headers)
        return self.status

    async def read_until(self, seq: int, deadline: float) -> bool:
        """Read until `seq` has arrived (True), or the stream ends or the deadline passes (False)."""
        assert self._reader is not None
        while self.last < seq:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.eof:
                return False
            try:
                data = await asyncio.wait_for(self._reader.read(2**16), remaining)
            except (TimeoutError, OSError):
                return False
            self._feed(data)
        return True

    async def read_to_end(self, deadline: float) -> bool:
        """Read everything until the server closes (True) or the deadline passes (False)."""
        await self.read_until(2**62, deadline)
        return self.eof

    def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self._writer.transport.abort()

    def _feed(self, data: bytes) -> None:
        if not data:
            self.eof = True
            return
        self._text += self._dechunk(data) if self._chunked else data
        *frames, rest = self._text.split(b"\n\n")
        self._text = bytearray(rest)
        for frame in frames:
            self._frame(bytes(frame))

    def _frame(self, frame: bytes) -> None:
        seq, event = None, b"message"
        for line in frame.split(b"\n"):
            if line.startswith(b"id: "):
                seq = int(line[4:])
            elif line.startswith(b"event: "):
                event = line[7:]
        if event in _CONTROL:
            self.controls.append(frame)
        elif seq is not None:
            self.seqs.append(seq)

    def _dechunk(self, data: bytes) -> bytes:
        """HTTP/1.1 chunked transfer coding, incrementally."""
        raw, out = self._raw, bytearray()
        raw += data
        while raw:
            if self._skip:  # the CRLF after a chunk
                taken = min(self._skip, len(raw))
                del raw[:taken]
                self._skip -= taken
            elif self._left == 0:
                end = raw.find(b"\r\n")
                if end < 0:
                    break
                size = int(bytes(raw[:end]).split(b";")[0] or b"0", 16)
                del raw[: end + 2]
                if size == 0:
                    self.eof = True
                    break
                self._left = size
            else:
                taken = min(self._left, len(raw))
                out += raw[:taken]
                del raw[:taken]
                self._left -= taken
                self._skip = 2 if self._left == 0 else 0
        return bytes(out)
