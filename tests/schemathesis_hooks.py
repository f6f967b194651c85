"""Schemathesis hooks for tests/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

A claim long-polls up to `wait` seconds (at most 20) on an empty queue: fuzzed as generated, the
run would spend most of its time waiting. Every other value of every field goes out as generated.
"""

from __future__ import annotations

from typing import Any

import schemathesis

# Long enough to take the long-poll path, short enough for a thousand cases.
MAX_WAIT_SECONDS = 0.05


@schemathesis.hook
def map_body(context: Any, body: Any) -> Any:
    wait = body.get("wait") if isinstance(body, dict) else None
    long_poll = isinstance(wait, int | float) and not isinstance(wait, bool) and wait > MAX_WAIT_SECONDS
    if context.operation.path.endswith("/claim") and long_poll:
        return {**body, "wait": MAX_WAIT_SECONDS}
    return body
