"""One worker, end to end on the real peers: SQS (moto_server) -> S3 -> process sandbox -> Redis.

Covers every row of the DESIGN's SQS table and every errorType. The worker runs in a forked
child, as under the supervisor; the tests talk to it only through SQS, S3 and Redis.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from harness import HELLO, Agent
from helpers import wait_until

from nanogrid.worker.codestore import CodeStore


def test_hello_world_result_follows_the_contract(agent: Agent) -> None:
    task = agent.task(agent.deploy({"main.py": HELLO}), memoryMb=256)
    result = agent.call(task)
    assert result["status"] == "SUCCESS", result
    assert result["stdout"] == "Hello from NanoGrid!\n"
    assert (
        result["exitCode"] == 0 and result["errorType"] is None and result["errorMessage"] is None
    )
    assert result["requestId"] == task["requestId"] and result["functionId"] == "fn"
    assert result["runtime"] == "python" and result["memoryMb"] == 256 and result["attempt"] == 1
    assert 0 < result["peakMemoryBytes"] < 32 * 2**20
    assert result["peakMemoryMB"] == result["peakMemoryBytes"] // 2**20
    assert result["recommendedMemoryMb"] == 32
    assert "256MB" in result["optimizationTip"] and "32MB" in result["optimizationTip"]
    assert result["workerId"].endswith(f":{agent.process.pid}")
    assert result["finishedAt"].endswith("Z")
    assert not result["stdoutTruncated"] and not result["stderrTruncated"]
    assert result["durationMillis"] > 0
    stored = json.loads(agent.redis.get(f"result:{task['requestId']}"))
    assert stored == result
    assert 0 < agent.redis.ttl(f"result:{task['requestId']}") <= 600
    wait_until(lambda: agent.queue_depth() == 0, timeout=5, what="the message to be deleted")
    log = agent.log.read_text()
    report = [line for line in log.splitlines() if f"REPORT RequestId: {task['requestId']}" in line]
    assert len(report) == 1 and "[AUTO-TUNER]" in report[0] and "32MB" in report[0]


def test_timings_show_each_phase_first_call_and_warm_repeat(agent: Agent) -> None:
    key = agent.deploy({"main.py": HELLO})
    first = agent.call(agent.task(key))["timings"]
    warm = agent.call(agent.task(key))["timings"]
    for timings in (first, warm):
        assert set(timings) == {"queuedMs", "fetchMs", "unpackMs", "sandboxMs", "runMs", "totalMs"}
        assert all(isinstance(v, int | float) and v >= 0 for v in timings.values())
        phases = timings["fetchMs"] + timings["unpackMs"] + timings["sandboxMs"] + timings["runMs"]
        assert phases <= timings["totalMs"]
    assert first["fetchMs"] > 0 and first["unpackMs"] > 0  # downloaded, then unpacked
    assert warm["unpackMs"] == 0  # the sandbox already held this code
    assert warm["fetchMs"] > 0  # the cache check still happens
    log = agent.log.read_text()
    assert "Init Duration:" not in log.split("REPORT RequestId:")[-1]  # warm: no init


def test_queued_time_counts_the_wait_in_sqs(agent: Agent) -> None:
    task = agent.task(agent.deploy({"main.py": HELLO}))
    sent = time.monotonic()
    agent.aws.sqs().send_message(
        QueueUrl=agent.queue_url, MessageBody=json.dumps(task), DelaySeconds=1
    )
    result = agent.result(task["requestId"])
    seen_ms = (time.monotonic() - sent) * 1000
    timings = result["timings"]
    assert 1000 <= timings["queuedMs"] < 10_000
    # Total starts at the receive: the two add up to no more than the test saw (SentTimestamp
    # is whole milliseconds), whatever a loaded host makes of the run itself.
    assert timings["queuedMs"] + timings["totalMs"] <= seen_ms + 2, (timings, seen_ms)


def test_a_cold_start_reports_its_init_duration(aws: Any, redis_url: str, tmp_path: Path) -> None:
    agent = Agent(aws, redis_url, tmp_path, runtimes={"python": {"warm": 0}}).start()
    try:
        result = agent.call(agent.task(agent.deploy({"main.py": HELLO})))
    finally:
        assert agent.stop() == 0
    assert result["coldStart"] is True and result["timings"]["sandboxMs"] > 0
    report = next(line for line in agent.log.read_text().splitlines() if "REPORT RequestId" in line)
    init = float(report.split("Init Duration: ")[1].split(" ms")[0])
    assert init == pytest.approx(result["timings"]["sandboxMs"], abs=0.01)


def test_many_at_once_and_the_grown_pool_serves_the_next_burst_warm(agent: Agent) -> None:
    key = agent.deploy({"main.py": "import time\ntime.sleep(0.5)\n"})

    def burst() -> list[dict[str, Any]]:
        ids = agent.send_together([agent.task(key) for _ in range(6)])
        return [agent.result(request_id) for request_id in ids]

    began = time.monotonic()
    first = burst()
    took = time.monotonic() - began
    assert {r["status"] for r in first} == {"SUCCESS"}
    assert took < 2.5, f"6 x 0.5 s took {took:.1f}s: not run at once"  # one at a time: 3 s
    assert sum(r["coldStart"] for r in first) >= 5  # warm: 1, the rest made on demand
    second = burst()
    assert [r["coldStart"] for r in second] == [False] * 6  # the pool kept what it grew to


def test_input_data_reaches_stdin_and_warm_sandbox_is_reused(agent: Agent) -> None:
    key = agent.deploy(
        {"main.py": "import json,sys\nd=json.load(sys.stdin)\nprint(d['a']+d['b'])\n"}
    )
    first = agent.call(agent.task(key, inputData={"a": 2, "b": 3}))
    second = agent.call(agent.task(key, inputData={"a": 10, "b": 5}))
    assert (first["stdout"], second["stdout"]) == ("5\n", "15\n")
    assert second["coldStart"] is False


def test_function_error(agent: Agent) -> None:
    key = agent.deploy({"main.py": "import sys\nprint('oops', file=sys.stderr)\nsys.exit(3)\n"})
    result = agent.call(agent.task(key))
    assert (result["status"], result["errorType"], result["exitCode"]) == (
        "FAILED",
        "FUNCTION_ERROR",
        3,
    )
    assert result["stderr"] == "oops\n" and "exited with code 3" in result["errorMessage"]


def test_uncaught_exception_shows_a_python_traceback(agent: Agent) -> None:
    result = agent.call(agent.task(agent.deploy({"main.py": "raise ValueError('bad input')\n"})))
    assert result["errorType"] == "FUNCTION_ERROR" and result["exitCode"] == 1
    assert 'File "main.py", line 1' in result["stderr"]
    assert result["stderr"].rstrip().endswith("ValueError: bad input")
    assert "forkserver" not in result["stderr"]


def test_timeout_kills_the_function_tree(agent: Agent) -> None:
    code = "import os,time\nos.fork()\ntime.sleep(30)\n"
    result = agent.call(agent.task(agent.deploy({"main.py": code}), timeoutMs=500))
    assert (result["status"], result["errorType"]) == ("TIMEOUT", "TIMEOUT")
    assert 450 <= result["durationMillis"] < 3000


def test_out_of_memory(agent: Agent) -> None:
    code = "b = bytearray(300 * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
    result = agent.call(agent.task(agent.deploy({"main.py": code}), memoryMb=64))
    assert (result["status"], result["errorType"]) == ("FAILED", "OUT_OF_MEMORY"), result
    assert result["recommendedMemoryMb"] > 64 and "out of memory" in result["optimizationTip"]


def test_peak_memory_is_per_invocation(agent: Agent) -> None:
    key = agent.deploy(
        {
            "main.py": "import json,sys\nmb=json.load(sys.stdin)['mb']\n"
            "b=bytearray(mb*2**20)\nfor i in range(0,len(b),4096): b[i]=1\n"
        }
    )
    big = agent.call(agent.task(key, inputData={"mb": 100}, memoryMb=512))
    small = agent.call(agent.task(key, inputData={"mb": 0}, memoryMb=512))
    assert 100 <= big["peakMemoryMB"] <= 164, big
    assert small["peakMemoryMB"] < 16 and small["coldStart"] is False, small
    assert "based on the last 2 runs" in small["optimizationTip"]
    assert small["recommendedMemoryMb"] >= 128  # the 100 MiB run is remembered


def test_output_flood_is_capped(aws: Any, redis_url: str, tmp_path: Path) -> None:
    agent = Agent(aws, redis_url, tmp_path, limits={"max_output_bytes": 1000}).start()
    try:
        code = "import sys\nfor _ in range(200000): print('x' * 99)\nsys.stderr.write('e'*5000)\n"
        result = agent.call(agent.task(agent.deploy({"main.py": code})))
    finally:
        assert agent.stop() == 0
    assert result["status"] == "SUCCESS"
    assert len(result["stdout"]) == 1000 and result["stdoutTruncated"] is True
    assert len(result["stderr"]) == 1000 and result["stderrTruncated"] is True


def test_environment_is_only_the_contract(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    code = "import json,os\nprint(json.dumps(dict(os.environ)))\nprint(os.getuid())\n"
    result = agent.call(agent.task(agent.deploy({"main.py": code}), memoryMb=128))
    env_line, uid_line = result["stdout"].splitlines()
    env = json.loads(env_line)
    assert set(env) == {
        "NANOGRID_REQUEST_ID",
        "NANOGRID_FUNCTION_ID",
        "NANOGRID_MEMORY_MB",
        "PATH",
        "HOME",
        "LANG",
    }
    assert env["NANOGRID_MEMORY_MB"] == "128" and env["NANOGRID_FUNCTION_ID"] == "fn"
    assert not any("AWS" in value or value == "testing" for value in env.values())
    if os.geteuid() == 0:
        assert int(uid_line) != 0


def test_missing_code_is_retried_then_failed_and_dead_lettered(agent: Agent) -> None:
    task = agent.task("functions/none/v1.zip")
    result = agent.call(task, timeout=40)
    assert (result["status"], result["errorType"], result["attempt"]) == (
        "FAILED",
        "CODE_NOT_FOUND",
        2,
    )
    assert result["exitCode"] is None
    assert "[RETRY]" in agent.log.read_text()
    letters = agent.dead_letters()
    assert [json.loads(m["Body"])["requestId"] for m in letters] == [task["requestId"]]
    wait_until(lambda: agent.queue_depth() == 0, timeout=5, what="the message to be deleted")


def test_missing_code_then_uploaded_succeeds_on_retry(agent: Agent) -> None:
    key = "functions/late/v1.zip"
    task = agent.task(key)
    agent.send_raw(json.dumps(task))
    wait_until(lambda: "[RETRY]" in agent.log.read_text(), timeout=15, what="a first attempt")
    agent.deploy({"main.py": HELLO}, key=key)
    result = agent.result(task["requestId"])
    assert result["status"] == "SUCCESS" and result["attempt"] == 2


@pytest.mark.parametrize(
    ("body", "request_id", "needle"),
    [
        ("this is not json", None, "not JSON"),
        ('["a list"]', None, "JSON object"),
        ('{"requestId": "r-missing", "runtime": "python"}', "r-missing", "functionId"),
        (
            '{"requestId": "r-mem", "functionId": "f", "runtime": "python", "s3Bucket": "b",'
            ' "s3Key": "k", "memoryMb": 999999}',
            "r-mem",
            "memoryMb",
        ),
        ('{"requestId": "bad id!", "functionId": "f"}', None, "requestId"),
    ],
)
def test_invalid_messages_are_failed_dead_lettered_and_deleted(
    agent: Agent, body: str, request_id: str | None, needle: str
) -> None:
    agent.send_raw(body)
    letters = wait_until(agent.dead_letters, timeout=15, what="a dead letter")
    assert letters[0]["Body"] == body
    assert needle in letters[0]["MessageAttributes"]["nanogridError"]["StringValue"]
    wait_until(lambda: agent.queue_depth() == 0, timeout=5, what="the message to be deleted")
    if request_id is not None:
        result = json.loads(agent.redis.get(f"result:{request_id}"))
        assert (result["status"], result["errorType"]) == ("FAILED", "INVALID_MESSAGE")
        assert needle in result["errorMessage"] and "\n" not in result["errorMessage"]
        assert "timings" not in result  # it never parsed


def test_unknown_runtime(agent: Agent) -> None:
    result = agent.call(agent.task(agent.deploy({"main.py": HELLO}), runtime="cobol"))
    assert (result["status"], result["errorType"]) == ("FAILED", "RUNTIME_NOT_SUPPORTED")
    assert "cobol" in result["errorMessage"]
    assert result["timings"]["runMs"] == 0 and result["timings"]["totalMs"] >= 0
    assert len(agent.dead_letters()) == 1


@pytest.mark.parametrize(
    ("files", "needle"),
    [
        ({"../evil.py": "x", "main.py": HELLO}, ".."),
        ({"/etc/evil": "x", "main.py": HELLO}, "absolute"),
    ],
)
def test_bad_code_packages(agent: Agent, files: dict[str, str], needle: str) -> None:
    result = agent.call(agent.task(agent.deploy(files)))
    assert (result["status"], result["errorType"]) == ("FAILED", "INVALID_CODE_PACKAGE"), result
    assert needle in result["errorMessage"]
    assert agent.dead_letters() == []


def test_corrupt_zip(agent: Agent) -> None:
    key = "functions/corrupt/v1.zip"
    agent.aws.s3().put_object(Bucket=agent.bucket, Key=key, Body=b"PK\x03\x04 definitely not a zip")
    result = agent.call(agent.task(key))
    assert (result["status"], result["errorType"]) == ("FAILED", "INVALID_CODE_PACKAGE")


def test_duplicate_delivery_republishes_without_running_again(agent: Agent) -> None:
    key = agent.deploy({"main.py": "import uuid\nprint(uuid.uuid4())\n"})
    task = agent.task(key)
    first = agent.call(task)
    pubsub = agent.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(f"result:{task['requestId']}")
    agent.send_raw(json.dumps(task))
    message = wait_until(
        lambda: pubsub.get_message(timeout=0.5), timeout=15, what="the re-published result"
    )
    pubsub.close()
    assert json.loads(message["data"]) == first
    assert agent.log.read_text().count("[DUPLICATE]") == 1
    assert agent.log.read_text().count("[PROCESS] running") == 1
    wait_until(lambda: agent.queue_depth() == 0, timeout=5, what="the message to be deleted")


def test_redis_outage_keeps_results_in_the_outbox_and_takes_no_new_work(
    agent: Agent, redis_server: Any
) -> None:
    slow = agent.task(agent.deploy({"main.py": "import time\ntime.sleep(1.5)\nprint('ok')\n"}))
    later = agent.task(agent.deploy({"main.py": HELLO}))
    agent.send_raw(json.dumps(slow))
    wait_until(lambda: "[PROCESS] running" in agent.log.read_text(), timeout=15, what="the run")
    redis_server.stop()  # mid-run: its result can only go to the outbox
    try:
        outbox = Path(agent.config.paths.outbox_dir)
        wait_until(lambda: any(outbox.iterdir()), timeout=20, what="the result in the outbox")
        wait_until(lambda: agent.queue_depth() == 0, timeout=10, what="the message to be deleted")
        agent.send_raw(json.dumps(later))
        time.sleep(3)  # a worker taking work would have run it by now
        assert agent.queue_depth() == 1  # left for a worker (or host) that can publish
        assert agent.log.read_text().count("[PROCESS] running") == 1
        assert "[DEGRADED] redis: results cannot be written" in agent.log.read_text()
    finally:
        redis_server.start()
    assert agent.result(slow["requestId"])["stdout"] == "ok\n"
    assert agent.result(later["requestId"])["status"] == "SUCCESS"
    assert agent.log.read_text().count("[PROCESS] running") == 2
    assert "[DEGRADED] over: redis works again" in agent.log.read_text()


def test_metrics_reach_cloudwatch(agent: Agent) -> None:
    agent.call(agent.task(agent.deploy({"main.py": HELLO})))

    def names() -> set[str]:
        metrics = agent.aws.cloudwatch().list_metrics(
            Namespace="NanoGrid", Dimensions=[{"Name": "FunctionId", "Value": "fn"}]
        )["Metrics"]
        return {m["MetricName"] for m in metrics}

    found = wait_until(
        lambda: {"PeakMemoryBytes", "Duration", "Invocations"} <= names() and names(),
        timeout=10,
        what="metrics in CloudWatch",
    )
    assert "ColdStarts" in found


def test_a_damaged_zip_in_the_hosts_cache_is_downloaded_again(
    aws: Any, redis_url: str, tmp_path: Path
) -> None:
    """The cache does not fsync its zips: one a crash left short fails to unpack, and the
    call downloads it again instead of failing (INVALID_CODE_PACKAGE before)."""
    agent = Agent(aws, redis_url, tmp_path)
    key = agent.deploy({"main.py": HELLO})
    store = CodeStore(Path(agent.config.paths.code_cache_dir), 1 << 20, aws.s3())
    cached = store.fetch(agent.bucket, key)  # as an earlier agent of this host left it
    whole = cached.zip_path.read_bytes()
    cached.zip_path.write_bytes(whole[: len(whole) // 2])
    agent.start()
    try:
        result = agent.call(agent.task(key))
    finally:
        assert agent.stop() == 0
    assert result["status"] == "SUCCESS", result
    assert result["stdout"] == "Hello from NanoGrid!\n"
    assert cached.zip_path.read_bytes() == whole
    assert "is damaged; downloading it again" in agent.log.read_text()
