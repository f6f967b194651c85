"""deploy/'s Grafana dashboard and Prometheus alert rules: they load, the alerts fire when they
should, and every metric they name is one a real server's `/metrics` exports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import ADMIN, ROOT, Server, free_port, mint, need_tool
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus-alerts.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
# Series Prometheus makes itself for every scrape target, not the target's.
PROMETHEUS_OWN = {"up"}
# What PromQL's grammar names besides metrics: operators written as words, and label lists.
_WORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
}
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    need_tool("promtool")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=ROOT)


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def rules_in_file() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or Grafana's `label_values(...)`) reads.

    Rough but sound for what these files hold: strings, label matchers, ranges, `by (...)` lists
    and `offset`s are cut out first; then every identifier that is not a function being called
    nor one of PromQL's words is a metric name.
    """
    expr = re.sub(r"label_values\(\s*([A-Za-z_:][\w:]*)?[^,)]*,\s*\w+\s*\)", r" \1 ", expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', " ", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\boffset\s+\S+", " ", expr)
    names = set()
    for found in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", expr):
        if expr[found.end() :].lstrip().startswith("(") or found.group() in _WORDS:
            continue
        names.add(found.group())
    return names


def exported(text: str) -> set[str]:
    """Every series name `/metrics` offers: each sample's, and each family's by its type (so a
    labelled family with no series yet still counts)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
        names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
    return names


def dashboard_queries() -> list[str]:
    board = dashboard()
    targets = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
    variables = [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return targets + variables


def test_the_alert_rules_pass_promtool_and_promtool_refuses_a_broken_one(tmp_path: Path) -> None:
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules_in_file())} rules found" in checked.stdout
    broken = tmp_path / "broken.yml"
    broken.write_text(ALERTS.read_text().replace("> 900", "> > 900", 1))
    assert promtool("check", "rules", str(broken)).returncode != 0


def test_the_alerts_fire_on_the_series_they_watch(tmp_path: Path) -> None:
    """promtool's own rule tests, a minute a sample: Redis lost, a message waiting ever longer,
    messages going dead, half the answers 503; and what must stay quiet stays quiet."""
    replica = 'job="pombo",instance="a:8000"'
    series = {
        "pombo_broker_connected": "1 0x5",
        'pombo_queue_oldest_pending_seconds{queue="jobs",': "0+60x25",
        'pombo_messages_total{queue="jobs",transition="dead",': "0 0 3x20",
        'pombo_http_requests_total{status="503",': "0+60x10",
        'pombo_http_requests_total{status="201",': "0+60x10",
        "pombo_ready": "1x10",
    }
    instance, jobs = {"instance": "a:8000"}, {"queue": "jobs"}
    # (when, alert, its labels, its summary); None: it must not fire then.
    expected: list[tuple[str, str, dict[str, str] | None, str]] = [
        (
            "3m",
            "PomboBrokerDown",
            {"severity": "ticket", "job": "pombo", **instance},
            "Pombo replica a:8000 has lost Redis",
        ),
        (
            "25m",
            "PomboOldestPendingTooOld",
            {"severity": "ticket", **jobs},
            "Queue jobs: a claimable message has waited 25m 0s",
        ),
        (
            "5m",
            "PomboDeadLettersGrowing",
            {"severity": "ticket", **jobs},
            "Messages of queue jobs went dead in the last 15 minutes",
        ),
        (
            "8m",
            "PomboUnavailableAnswers",
            {"severity": "page", **instance},
            "Pombo replica a:8000 answers 503 to 50% of requests",
        ),
        ("8m", "PomboReplicaNotReady", None, ""),
        ("8m", "PomboInternalErrors", None, ""),
        ("1m", "PomboOldestPendingTooOld", None, ""),
    ]
    described = {rule["alert"]: rule["annotations"]["description"] for rule in rules_in_file()}
    suite = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": f"{name}{replica}}}" if "{" in name else f"{name}{{{replica}}}",
                        "values": values,
                    }
                    for name, values in series.items()
                ],
                "alert_rule_test": [
                    {
                        "eval_time": at,
                        "alertname": alert,
                        "exp_alerts": _fired(labels, summary, described[alert]),
                    }
                    for at, alert, labels, summary in expected
                ],
            }
        ],
    }
    path = tmp_path / "alerts-test.yml"
    path.write_text(yaml.safe_dump(suite))
    tested = promtool("test", "rules", str(path))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def _fired(labels: dict[str, str] | None, summary: str, description: str) -> list[dict[str, Any]]:
    if labels is None:
        return []
    return [{"exp_labels": labels, "exp_annotations": {"summary": summary, "description": description}}]


def test_the_dashboard_is_grafana_json_with_panels_and_targets() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [panel for panel in board["panels"] if panel["type"] != "row"]
    assert len(graphs) >= 12
    for panel in graphs:
        assert panel["type"] in {"timeseries", "stat"} and panel["title"], panel
        assert (
            set(panel["gridPos"]) == {"h", "w", "x", "y"}
            and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        )
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)) and all(target["expr"].strip() for target in panel["targets"])
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    titles = " ".join(panel["title"].lower() for panel in graphs)
    for topic in ("published", "latency", "pending", "dead", "streams", "lag", "errors"):
        assert topic in titles, topic


def test_the_name_check_finds_names_and_misses_none() -> None:
    expr = 'histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="y"}[$__rate_interval])))'
    expr += " / b_total offset 5m > 1e3"
    assert metric_names(expr) == {"a_bucket", "b_total"}
    assert metric_names('label_values(pombo_ready{job=~"$job"}, instance)') == {"pombo_ready"}
    assert metric_names("sum(rate(c[5m])) by (queue) and on (queue) d == bool 0") == {"c", "d"}


async def test_every_metric_the_dashboard_and_the_alerts_name_is_exported(sqlite_server: Server) -> None:
    async with httpx.AsyncClient(base_url=sqlite_server.url, headers=ADMIN) as http:
        answer = await http.get("/metrics")
    assert answer.status_code == 200, answer.text
    offered = exported(answer.text) | PROMETHEUS_OWN
    named_by = {"dashboard": dashboard_queries(), "alerts": [rule["expr"] for rule in rules_in_file()]}
    for source, queries in named_by.items():
        names = set().union(*map(metric_names, queries))
        assert len(names) >= 8, (source, names)
        assert names <= offered, f"{source} names what /metrics does not export: {sorted(names - offered)}"
    assert not metric_names("rate(pombo_no_such_thing_total[5m])") <= offered


@pytest.fixture
def prometheus(tmp_path: Path, sqlite_server: Server) -> Iterator[str]:
    """A real Prometheus with deploy/prometheus.yml, scraping the test server every second."""
    need_tool("prometheus")
    config = yaml.safe_load(PROMETHEUS.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ALERTS)]
    [job] = config["scrape_configs"]
    job["static_configs"] = [{"targets": [sqlite_server.url.removeprefix("http://")]}]
    (tmp_path / job["authorization"]["credentials_file"]).write_text(mint("prometheus", "metrics"))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    command = ["prometheus", "--config.file=prometheus.yml", f"--web.listen-address={address}"]
    command.append(f"--storage.tsdb.path={tmp_path / 'data'}")
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=log)
    try:
        yield f"http://{address}"
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_prometheus_scrapes_with_the_example_config_and_evaluates_every_rule(prometheus: str) -> None:
    async with httpx.AsyncClient(base_url=prometheus) as http:
        for _ in range(150):
            # Until it is ready, Prometheus answers 503 in plain text, then no rules for a moment.
            with contextlib.suppress(httpx.HTTPError, ValueError, LookupError):
                rules = (await http.get("/api/v1/rules")).json()["data"]["groups"][0]["rules"]
                ready = (await http.get("/api/v1/query", params={"query": 'pombo_ready{job="pombo"}'})).json()
                if ready["data"]["result"] and all(
                    rule.get("lastEvaluation", "0001").startswith("20") for rule in rules
                ):
                    break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("Prometheus never scraped the server and evaluated the rules")
    assert ready["data"]["result"][0]["value"][1] == "1"
    assert len(rules) == len(rules_in_file()) and {rule["health"] for rule in rules} == {"ok"}
    assert [rule["name"] for rule in rules if rule["state"] != "inactive"] == []
