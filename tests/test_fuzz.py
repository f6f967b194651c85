"""Schemathesis against the live OpenAPI of a real server: no input reaches a 5xx, and every
answer's status, content type, headers and body are what /openapi.json says.

The CLI in a subprocess rather than schemathesis's pytest integration: it runs all four phases
(examples, coverage, fuzzing, stateful) with one seed, its hypothesis and warnings stay out of
this process (warnings are errors here), and its JSON report gives the case counts, printed in
the terminal summary. `--workers 1`: more crash on Python 3.11.7.

Streams are fuzzed too, on a server whose streams live 0.3 s (`POMBO_STREAM_LIFETIME_SECONDS`):
each ends by itself with `stream.expired`, as every stream does at its lifetime. Claims' long
polls are shortened to 0.05 s (tests/schemathesis_hooks.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import REDIS_URL, SUMMARY_LINES, Server, mint, need_service, postgres_database, unique

HERE = Path(__file__).resolve().parent
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance"
)
SEED = 20261203
FUZZ_SETTINGS = {"POMBO_STREAM_LIFETIME_SECONDS": "0.3"}


@dataclass(frozen=True)
class Run:
    label: str
    token: str | None
    max_examples: int
    minimum_cases: int
    phases: str = "examples,coverage,fuzzing,stateful"


def fuzz(server: Server, run: Run, report_dir: Path) -> dict[str, Any]:
    """One `st run` against the server's live /openapi.json; its JSON report."""
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{server.url}/openapi.json",
        "--workers=1",
        f"--seed={SEED}",
        "--generation-database=none",
        f"--max-examples={run.max_examples}",
        f"--phases={run.phases}",
        f"--checks={CHECKS}",
        "--request-timeout=10",
        "--report=json",
        f"--report-dir={report_dir}",
        "--no-color",
    ]
    if run.token is not None:
        command.append(f"--header=Authorization: Bearer {run.token}")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": str(HERE)}
    began = time.monotonic()
    # In the report's folder: schemathesis keeps a crash cache in its working directory, which a
    # later run would replay first (neither reproducible nor wanted in the checkout).
    done = subprocess.run(
        command, cwd=report_dir, env=env, capture_output=True, text=True, timeout=150, check=False
    )
    seconds = time.monotonic() - began
    [path] = report_dir.glob("*.json")
    report: dict[str, Any] = json.loads(path.read_text())
    report["seconds"], report["output"] = seconds, done.stdout[-6000:] + done.stderr[-2000:]
    return report


def check(report: dict[str, Any], run: Run, config: pytest.Config) -> None:
    cases = report["test_cases"]
    line = (
        f"schemathesis {run.label}: {cases['generated']} cases, {cases['with_failures']} failing, "
        f"{cases['errored']} errored, in {report['seconds']:.0f} s (seed {SEED})"
    )
    config.stash.setdefault(SUMMARY_LINES, []).append(line)
    print(line)
    assert not report["failures"] and not report["errors"], report["output"]
    assert cases["generated"] >= run.minimum_cases, line


@pytest.fixture(scope="module")
def fuzzed_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("fuzz-sqlite"), dict(FUZZ_SETTINGS)).start()
    yield server
    server.stop()


# At least 1,000 cases on SQLite across the three callers (the admin's alone has more).
SQLITE_RUNS = [
    Run("SQLite, admin token", mint("fuzz-admin"), 5, 800),
    Run("SQLite, no token", None, 1, 100, "examples,coverage,fuzzing"),
    Run("SQLite, narrow token", mint("fuzz-narrow", "publish:q* subscribe:q* consume:a*"), 2, 100),
]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("run", SQLITE_RUNS, ids=lambda run: run.label)
def test_fuzzing_finds_nothing_on_sqlite(
    fuzzed_sqlite: Server, run: Run, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    check(fuzz(fuzzed_sqlite, run, tmp_path), run, request.config)
    assert "unhandled error" not in fuzzed_sqlite.log()


@pytest.mark.timeout(200)
def test_fuzzing_finds_nothing_on_postgres_and_redis(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    need_service("PostgreSQL", 5432)
    need_service("Redis", 6379)
    run = Run("PostgreSQL + Redis, admin token", mint("fuzz-admin"), 2, 300)
    with postgres_database() as url:
        env = {
            **FUZZ_SETTINGS,
            "POMBO_DATABASE_URL": url,
            "POMBO_REDIS_URL": REDIS_URL,
            "POMBO_REDIS_PREFIX": unique("fuzz"),
        }
        server = Server(tmp_path / "server", env).start()
        report = tmp_path / "report"
        report.mkdir()
        try:
            check(fuzz(server, run, report), run, request.config)
            assert "unhandled error" not in server.log()
        finally:
            server.stop()
