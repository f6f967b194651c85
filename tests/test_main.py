"""`main.py serve` as a person runs it in a terminal."""

from __future__ import annotations

import signal
from typing import Any

import httpx


def test_ctrl_c_stops_the_server_cleanly_without_a_traceback(make_server: Any) -> None:
    server = make_server().start()
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert server.process is not None
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=15) == 130  # a shell's status for a command Ctrl-C ended
    log = server.log()
    assert "Application shutdown complete" in log
    assert "Traceback" not in log, log[-3000:]
