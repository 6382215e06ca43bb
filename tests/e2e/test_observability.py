"""What an operator sees of a real agent (bin/nanogrid-supervisor): one trace from the
message's attributes to the result, the JSON log lines and the exported spans, on both
runners; and a dashboard and alert rules whose every expression names what /metrics has."""

from __future__ import annotations

import json
import re
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import wait_until
from otlpcollector import OtlpCollector
from prometheus_client.parser import text_string_to_metric_families
from supervised import ROOT, Agent

SHOW_TRACEPARENT = "import os\nprint(os.environ.get('TRACEPARENT', '-'))\n"
SPAN_KIND_CONSUMER = 5
DASHBOARD = ROOT / "deploy" / "grafana" / "nanogrid.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS_SERIES = {"up"}
"""Series Prometheus makes itself for every target it scrapes (not the agent's)."""
TARGET_LABELS = {"instance", "job"}
"""Labels Prometheus adds to every series it scrapes."""


@pytest.fixture
def collector() -> Iterator[OtlpCollector]:
    running = OtlpCollector()
    yield running
    running.close()


def traced_agent(agents: Any, runner: str, request: pytest.FixtureRequest, **settings: Any
                 ) -> Agent:
    """A one-worker agent on ``runner`` with JSON logs at DEBUG."""
    if runner == "docker":
        image = request.getfixturevalue("runtime_image")
        settings["runtimes"] = {"python": {"image": image, "warm": 1}}
    agent: Agent = agents(workers=1, runner=runner, **settings)
    agent.write_config(log={"level": "DEBUG", "file": str(agent.log), "json": True})
    if runner == "docker":
        agent.write_config(docker={"socket_dir": str(agent.base / "sandboxes")})
    return agent.start()


def send(agent: Agent, key: str, **attributes: Any) -> str:
    """Send a task with the trace attributes (``traceparent``, ``AWSTraceHeader``)."""
    task = agent.task(key)
    params: dict[str, Any] = {"QueueUrl": agent.queue_url, "MessageBody": json.dumps(task)}
    if "traceparent" in attributes:
        params["MessageAttributes"] = {
            "traceparent": {"DataType": "String", "StringValue": attributes["traceparent"]},
            "tracestate": {"DataType": "String", "StringValue": "nanogrid=test"},
        }
    if "aws_trace_header" in attributes:
        params["MessageSystemAttributes"] = {
            "AWSTraceHeader": {"DataType": "String", "StringValue": attributes["aws_trace_header"]}
        }
    agent.aws.sqs().send_message(**params)
    return task["requestId"]


def span_attributes(span: Any) -> dict[str, Any]:
    values = {}
    for attribute in span.attributes:
        value = attribute.value
        values[attribute.key] = getattr(value, value.WhichOneof("value"))
    return values


def log_lines(agent: Agent) -> list[dict[str, Any]]:
    return [json.loads(line) for line in agent.log.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("runner", ["process", pytest.param("docker", marks=pytest.mark.docker)])
def test_one_trace_from_the_message_to_the_result_the_logs_and_the_span(
    agents: Any, collector: OtlpCollector, runner: str, request: pytest.FixtureRequest
) -> None:
    agent = traced_agent(agents, runner, request, tracing={"otlp_endpoint": collector.endpoint})
    key = agent.deploy(SHOW_TRACEPARENT)
    sent = {}  # requestId -> (trace id, the producer's span id)
    for n in range(3 if runner == "process" else 2):
        trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
        if n == 1:  # X-Ray's header, as Lambda and the X-Ray SDKs send it
            header = f"Root=1-{trace_id[:8]}-{trace_id[8:]};Parent={parent};Sampled=1"
            request_id = send(agent, key, aws_trace_header=header)
        else:
            request_id = send(agent, key, traceparent=f"00-{trace_id}-{parent}-01")
        sent[request_id] = (trace_id, parent)
        agent.result(request_id)  # one at a time: the first is the function's first run

    queue = agent.queue_url.rsplit("/", 1)[-1]
    for n, (request_id, (trace_id, parent)) in enumerate(sent.items()):
        result = agent.result(request_id)
        assert result["status"] == "SUCCESS" and result["traceId"] == trace_id, result
        spans = wait_until(
            lambda t=trace_id: (found := collector.trace(t)) and any(
                s.name == f"{queue} process" for s in found) and found,
            timeout=20, what=f"the spans of trace {trace_id}")
        (process,) = [s for s in spans if s.name == f"{queue} process"]
        assert process.kind == SPAN_KIND_CONSUMER
        assert process.parent_span_id.hex() == parent  # a child of the controller's send
        assert [link.span_id.hex() for link in process.links] == [parent]
        facts = span_attributes(process)
        assert facts["faas.invocation_id"] == request_id
        assert facts["faas.coldstart"] is result["coldStart"]
        assert facts["faas.max_memory"] == result["memoryMb"] * 2**20
        assert facts["faas.mem_usage"] == result["peakMemoryBytes"]
        assert facts["messaging.destination.name"] == queue
        children = {s.name for s in spans if s.parent_span_id == process.span_id}
        assert {"claim", "fetch", "sandbox", "run", "end"} <= children
        if n == 0:
            assert "unpack" in children
        # The function's own spans would be children of the process span.
        assert result["stdout"] == f"00-{trace_id}-{process.span_id.hex()}-01\n"
        lines = [line for line in log_lines(agent) if line["requestId"] == request_id]
        assert len(lines) >= 4 and {line["traceId"] for line in lines} == {trace_id}
        messages = [line["msg"] for line in lines]
        assert any(m.startswith("[SQS] Received task") for m in messages), messages
        (report,) = [line for line in lines if line["msg"].startswith("REPORT RequestId")]
        assert report["maxMemoryBytes"] == result["peakMemoryBytes"]
        assert report["durationMs"] == result["durationMillis"]
        assert (report["status"], report["errorType"], report["functionId"]) == (
            "SUCCESS", None, "fn")
        assert report["coldStart"] is result["coldStart"] and report["role"] == "worker-0"


def test_without_an_endpoint_the_ids_still_go_through_and_no_span_is_made(
    agents: Any, collector: OtlpCollector, request: pytest.FixtureRequest
) -> None:
    agent = traced_agent(agents, "process", request)
    key = agent.deploy(SHOW_TRACEPARENT)
    traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
    request_id = send(agent, key, traceparent=traceparent)
    result = agent.result(request_id)
    assert result["traceId"] == traceparent.split("-")[1]
    assert result["stdout"] == traceparent + "\n"  # the producer's span is the parent
    assert result["tipCode"] == "OVER_PROVISIONED" and result["tipParams"]["currentMb"] == 256
    untraced = agent.result(send(agent, key))
    assert untraced["traceId"] is None and untraced["stdout"] == "-\n"
    assert "[TRACE]" not in agent.log.read_text()


def metric_series(text: str) -> dict[str, set[str]]:
    """Sample name -> the label names its series have, as prometheus_client parses /metrics."""
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and",
    "or", "unless", "inf", "nan",
}
_MATCHERS = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^{}]*)\}")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_LABEL_NAME = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")


def unknown_names(expr: str, series: dict[str, set[str]]) -> list[str]:
    """What ``expr`` names that /metrics does not have: metric names, and label names in its
    matchers and groupings (PromQL read just far enough for that)."""
    problems = []
    text = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana's variables ($__rate_interval, ...)
    named: set[str] = set()

    def matchers(match: re.Match[str]) -> str:
        metric, inside = match.group(1), re.sub(r'"(?:[^"\\]|\\.)*"', '""', match.group(2))
        for label in _LABEL_NAME.findall(inside):
            if metric and label not in series.get(metric, set()) | TARGET_LABELS:
                problems.append(f"label {label} on {metric}")
        return f" {metric or ''} "

    text = _MATCHERS.sub(matchers, text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    groupings = [g.split(",") for _, g in _GROUPING.findall(text)]
    text = _GROUPING.sub(" ", text)
    for name in re.findall(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", text):
        if name in KEYWORDS:
            continue
        named.add(name)
        if name not in series and name not in PROMETHEUS_SERIES:
            problems.append(f"metric {name}")
    labels_here = set().union(*(series.get(n, set()) for n in named)) | TARGET_LABELS | {"le"}
    for labels in groupings:
        problems += [f"label {lb.strip()}" for lb in labels if lb.strip() not in labels_here]
    if not named:
        problems.append("no metric at all")
    return problems


def expressions() -> list[tuple[str, str]]:
    """(where, expression) of every panel target, template query and alert rule."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = [(f"panel {p['title']!r}", t["expr"]) for p in dashboard["panels"]
             for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            found.append((f"variable {variable['name']}",
                          re.sub(r"label_values\((\w+),\s*\w+\)", r"\1", query)))
    rules = yaml.safe_load(ALERTS.read_text())
    found += [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]
    return found


def test_the_expression_check_catches_what_the_agent_does_not_export() -> None:
    series = {"nanogrid_x_total": {"runtime"}, "nanogrid_y_bucket": {"le", "phase"}}
    assert unknown_names('sum by (runtime) (rate(nanogrid_x_total{runtime="a"}[5m]))',
                         series) == []
    assert unknown_names(
        'histogram_quantile(0.99, sum by (le, phase) (rate(nanogrid_y_bucket[$__rate_interval])))'
        ' > 0.5', series) == []
    assert unknown_names("rate(nanogrid_z_total[5m])", series) == ["metric nanogrid_z_total"]
    assert unknown_names('nanogrid_x_total{status="x"}', series) == ["label status on "
                                                                     "nanogrid_x_total"]
    assert unknown_names("sum by (kind) (nanogrid_x_total)", series) == ["label kind"]
    assert unknown_names("up == 0", series) == []


def test_every_panel_and_alert_names_only_what_a_live_agent_exports(agents: Any) -> None:
    agent: Agent = agents(workers=1)
    agent.write_config(queue={**agent.settings["queue"], "max_attempts": 1})
    agent.start()
    hello = agent.deploy(SHOW_TRACEPARENT)
    assert agent.run(hello)["status"] == "SUCCESS"
    assert agent.run(agent.deploy("raise SystemExit(3)\n"))["errorType"] == "FUNCTION_ERROR"
    missing = agent.call(agent.task("functions/none/v1.zip"))
    assert missing["errorType"] == "CODE_NOT_FOUND"
    url = f"http://127.0.0.1:{agent.port}/metrics"

    def scraped() -> str | None:
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        # The results, and the sandboxes on the host's board.
        wanted = ("nanogrid_invocations_total{", 'tip_code="', "nanogrid_sandboxes{")
        return text if all(w in text for w in wanted) else None

    series = metric_series(wait_until(scraped, timeout=10, what="the results in /metrics"))
    found = expressions()
    assert len(found) >= 30
    problems = {where: p for where, expr in found if (p := unknown_names(expr, series))}
    assert problems == {}, problems
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"]
    titles = " ".join(p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]).lower()
    for wanted in ("status", "p50 / p99", "cold", "capacity", "degraded", "outbox",
                   "dead-lettered", "savings"):
        assert wanted in titles, wanted


def test_the_grafana_dashboard_is_importable_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
    assert Path(ALERTS).exists()
