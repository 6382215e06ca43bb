"""Faults, on the real peers: poison bodies, a Redis failover, duplicate deliveries, a
dead-letter queue that refuses the copy, a full cache disk or work dir, a download cut off
mid-body.

Workers run in forked children, as under the supervisor; the tests talk to them only
through SQS, S3 and Redis, and read their logs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultproxy import Forwarder
from harness import HELLO, Agent, fork_worker, make_zip, runs_per_request, stop
from helpers import RedisServer, free_port, wait_until
from poison import POISON

from nanogrid.common.errors import HostFault
from nanogrid.worker.codestore import CodeStore

VISIBILITY_S = 2
"""The Agent's visibility timeout: a message that ends within it never came back."""


# -- poison -----------------------------------------------------------------------------------

def test_poison_bodies_end_on_their_first_receive_and_the_worker_lives_on(
    aws: Any, redis_url: str, tmp_path: Path
) -> None:
    agent = Agent(aws, redis_url, tmp_path).start()
    try:
        started = time.monotonic()
        for body, _ in POISON.values():
            agent.send_raw(body)
        good = agent.task(agent.deploy({"main.py": HELLO}))
        agent.send_raw(json.dumps(good))
        assert agent.result(good["requestId"])["status"] == "SUCCESS"  # it lives on
        wait_until(lambda: agent.queue_depth() == 0, timeout=10, what="an empty task queue")
        letters: list[dict[str, Any]] = []
        wait_until(
            lambda: letters.extend(agent.dead_letters()) or len(letters) >= len(POISON),
            timeout=20,
            what="a dead-letter copy of every poison body",
        )
        elapsed = time.monotonic() - started
    finally:
        assert agent.stop() == 0  # never crashed: it drained and exited cleanly
    assert sorted(m["Body"] for m in letters) == sorted(body for body, _ in POISON.values())
    assert {m["MessageAttributes"]["receiveCount"]["StringValue"] for m in letters} == {"1"}
    for name, (_, request_id) in POISON.items():
        if request_id is not None:
            result = json.loads(agent.redis.get(f"result:{request_id}"))
            expected = "RUNTIME_NOT_SUPPORTED" if name == "unknown-runtime" else "INVALID_MESSAGE"
            assert (result["status"], result["errorType"], result["attempt"]) == (
                "FAILED", expected, 1), name
    log = agent.log.read_text()
    assert "Traceback" not in log and "[RETRY]" not in log
    print(f"{len(POISON)} poison bodies + 1 good task ended in {elapsed:.2f}s, all on attempt 1")


# -- Redis failover -----------------------------------------------------------------------------


class Replica(RedisServer):
    """A second redis-server, started as a replica of ``primary``."""

    def __init__(self, workdir: Path, primary: RedisServer) -> None:
        super().__init__(workdir)
        self.primary = primary

    def command(self) -> list[str]:
        return [*super().command(), "--replicaof", "127.0.0.1", str(self.primary.port)]


@pytest.fixture
def two_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    primary = RedisServer(tmp_path / "a")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    primary.start()
    replica = Replica(tmp_path / "b", primary)
    replica.start()
    try:
        wait_until(
            lambda: replica.client().info("replication")["master_link_status"] == "up",
            timeout=10,
            what="the replica in sync",
        )
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


def failover(old: RedisServer, new: RedisServer, proxy: Forwarder) -> None:
    """What Sentinel does: pause writes on the old primary until the replica has them all,
    promote the replica, point the name at it, make the old primary its replica. Writes that
    waited on the old primary's open connections then meet a replica: READONLY."""
    old_client, new_client = old.client(), new.client()
    old_client.execute_command("CLIENT", "PAUSE", 5000, "WRITE")
    offset = old_client.info("replication")["master_repl_offset"]
    wait_until(lambda: new_client.info("replication")["slave_repl_offset"] >= offset,
               timeout=5, interval=0.01, what="the replica caught up")
    new_client.execute_command("REPLICAOF", "NO", "ONE")
    proxy.switch(new.port)
    old_client.execute_command("REPLICAOF", "127.0.0.1", new.port)
    old_client.execute_command("CLIENT", "UNPAUSE")


def test_failover_every_result_reaches_the_new_primary_none_stranded(
    aws: Any, tmp_path: Path, two_redis: tuple[RedisServer, RedisServer]
) -> None:
    old, new = two_redis
    proxy = Forwarder(old.port)  # what the name resolves to: the primary of the moment
    agent = Agent(aws, f"redis://127.0.0.1:{proxy.port}/0", tmp_path / "agent").start()
    second = fork_worker(agent.config, 1)
    try:
        key = agent.deploy({"main.py": "import time\ntime.sleep(0.05)\nprint('ok')\n"})
        ids = []
        for i in range(60):
            ids.append(agent.send(agent.task(key)))
            time.sleep(0.04)
            if i == 30:
                failover(old, new, proxy)
                failed_over = time.monotonic()
        new_client = new.client()
        wait_until(lambda: all(new_client.exists(f"result:{r}") for r in ids), timeout=20,
                   what="every result on the new primary")
        reached_s = time.monotonic() - failed_over
        outbox = Path(agent.config.paths.outbox_dir)
        wait_until(lambda: not outbox.exists() or not list(outbox.iterdir()), timeout=10,
                   what="an empty outbox")
    finally:
        assert stop(second) == 0
        assert agent.stop() == 0
        proxy.close()
    results = [json.loads(new_client.get(f"result:{r}")) for r in ids]
    assert {r["status"] for r in results} == {"SUCCESS"}
    assert set(runs_per_request(agent.log.read_text()).values()) == {1}
    assert "read only replica" in agent.log.read_text()  # the old connections met READONLY
    print(f"failover: all {len(ids)} results on the new primary {reached_s:.2f}s after it")
    assert reached_s <= 10


# -- SQS out of reach ---------------------------------------------------------------------------

def test_a_worker_booting_while_sqs_is_out_of_reach_waits_degraded_then_serves(
    aws: Any, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = Forwarder(free_port())  # nothing listens there: every connection is dropped
    agent = Agent(aws, redis_url, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", f"http://127.0.0.1:{proxy.port}")  # the worker's
    try:
        agent.start()
        log = agent.log.read_text()
        assert re.search(r"\[SQS\] SQS get_queue_attributes failed: .* \(booting anyway", log), log
        assert "dead_letter_url" not in log  # not checked: it would only fail the same way
        wait_until(lambda: "[DEGRADED] sqs: tasks cannot be received (" in agent.log.read_text(),
                   timeout=10, what="the worker saying it is degraded")
        proxy.switch(int(aws.endpoint.rsplit(":", 1)[1]))  # SQS is back
        assert agent.call(agent.task(agent.deploy({"main.py": HELLO})))["status"] == "SUCCESS"
        assert "[DEGRADED] over: queue works again" in agent.log.read_text()
    finally:
        assert agent.stop() == 0
        proxy.close()


# -- duplicates ---------------------------------------------------------------------------------


def test_concurrent_duplicates_run_once_per_request_id(
    aws: Any, redis_url: str, tmp_path: Path
) -> None:
    agent = Agent(aws, redis_url, tmp_path).start()
    second = fork_worker(agent.config, 1)
    try:
        key = agent.deploy({"main.py": HELLO})
        wait_until(lambda: agent.log.read_text().count(" ready (pid ") == 2, timeout=20,
                   what="two workers")
        tasks = [agent.task(key) for _ in range(100)]
        sqs = agent.aws.sqs()
        for start in range(0, len(tasks), 5):  # each batch holds both copies of 5 tasks
            entries = [
                {"Id": f"{i}-{copy}", "MessageBody": json.dumps(t)}
                for i, t in enumerate(tasks[start:start + 5]) for copy in (0, 1)
            ]
            sqs.send_message_batch(QueueUrl=agent.queue_url, Entries=entries)
        for t in tasks:
            assert agent.result(t["requestId"], timeout=60)["status"] == "SUCCESS"
        wait_until(lambda: agent.queue_depth() == 0, timeout=30, what="an empty task queue")
    finally:
        assert stop(second) == 0
        assert agent.stop() == 0
    runs = runs_per_request(agent.log.read_text())
    assert sorted(runs) == sorted(t["requestId"] for t in tasks)
    assert set(runs.values()) == {1}, [r for r, n in runs.items() if n > 1]
    log = agent.log.read_text()
    print(f"duplicates: 100 pairs, 100 runs; {log.count('[DUPLICATE]')} duplicate lines")


# -- dead-letter queue refusing the copy --------------------------------------------------------


@pytest.mark.parametrize("dlq", ["missing", "fifo"])
def test_a_dead_letter_queue_that_refuses_the_copy_does_not_keep_the_message(
    aws: Any, redis_url: str, tmp_path: Path, dlq: str
) -> None:
    if dlq == "fifo":
        name = f"dlq-{uuid.uuid4().hex[:8]}.fifo"
        url = aws.sqs().create_queue(QueueName=name, Attributes={"FifoQueue": "true"})["QueueUrl"]
    else:
        url = aws.new_queue("gone")
        aws.sqs().delete_queue(QueueUrl=url)
    agent = Agent(aws, redis_url, tmp_path, queue={"dead_letter_url": url}).start()
    try:
        agent.send_raw('{"requestId": "r-refused", "functionId": "f"}')
        result = agent.result("r-refused", timeout=10)
        wait_until(lambda: agent.queue_depth() == 0, timeout=10, what="the message deleted")
        wait_until(lambda: "dead-letter copy of message" in agent.log.read_text(), timeout=5)
    finally:
        assert agent.stop() == 0
    assert (result["errorType"], result["attempt"]) == ("INVALID_MESSAGE", 1)
    log = agent.log.read_text()
    boot_warning = "is a FIFO queue" if dlq == "fifo" else "cannot be used"
    assert f"queue.dead_letter_url {url} {boot_warning}" in log
    assert "the message is deleted all the same" in log
    # The result came first, then the refused copy.
    assert log.index("published result:r-refused") < log.index("dead-letter copy of message")


def test_boot_warns_when_the_redrive_policy_undercuts_max_attempts(
    aws: Any, redis_url: str, tmp_path: Path
) -> None:
    agent = Agent(aws, redis_url, tmp_path, queue={"max_attempts": 3})
    arn = aws.sqs().get_queue_attributes(QueueUrl=agent.dlq_url, AttributeNames=["QueueArn"])
    redrive = {"deadLetterTargetArn": arn["Attributes"]["QueueArn"], "maxReceiveCount": 2}
    aws.sqs().set_queue_attributes(
        QueueUrl=agent.queue_url, Attributes={"RedrivePolicy": json.dumps(redrive)}
    )
    agent.start()
    assert agent.stop() == 0
    assert "after 2 receives, before queue.max_attempts (3)" in agent.log.read_text()


# -- host faults --------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: the code cache of a host whose disk is full."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_cache_disk_hands_the_message_back_untried_until_space_is_back(
    aws: Any, redis_url: str, tmp_path: Path, tiny_disk: Path
) -> None:
    agent = Agent(aws, redis_url, tmp_path, queue={"max_attempts": 2},
                  paths={"code_cache_dir": str(tiny_disk / "cache"), "min_free_mb": 0}).start()
    try:
        big = {"main.py": HELLO, "data.bin": os.urandom(200_000)}  # does not compress
        task = agent.task(agent.deploy(big))
        agent.send_raw(json.dumps(task))
        wait_until(lambda: "[DEGRADED] disk: " in agent.log.read_text(), timeout=15,
                   what="the worker degraded for its disk")
        time.sleep(12)  # longer than a hand-back: it comes back, and is not taken here
        log = agent.log.read_text()
        assert log.count("not counted as a try") == 1  # taken once, then no new work
        # The operator frees space; a probe write works again, and so does the task.
        subprocess.run(["mount", "-o", "remount,size=16m", str(tiny_disk)], check=True)
        result = agent.result(task["requestId"], timeout=30)
    finally:
        assert agent.stop() == 0
    assert (result["status"], result["attempt"]) == ("SUCCESS", 1)  # no attempt burned
    log = agent.log.read_text()
    assert "[DEGRADED] over: disk works again" in log and "gave up" not in log
    (deferred,) = [line for line in log.splitlines() if "not counted as a try" in line]
    assert f"code cache {tiny_disk / 'cache'}: No space left on device" in deferred
    assert "WARNING" in deferred and "handed back for " in deferred


@pytest.fixture
def small_work_dir() -> Iterator[Path]:
    """A 12 MiB tmpfs that sandbox users can reach: the work dir of a host whose disk is
    small."""
    mount = Path(tempfile.mkdtemp(prefix="nanogrid-small-"))
    os.chmod(mount, 0o711)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m,mode=0711", "tmpfs", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
        mount.rmdir()


def test_idle_sandboxes_code_is_shed_when_the_work_dir_runs_short(
    aws: Any, redis_url: str, tmp_path: Path, small_work_dir: Path
) -> None:
    """Three functions of 4 MB each do not fit beside one another with 4 MB kept free:
    the idle sandboxes' code goes instead of the worker going DEGRADED."""
    agent = Agent(aws, redis_url, tmp_path, runtimes={"python": {"warm": 0}},
                  paths={"work_dir": str(small_work_dir), "min_free_mb": 4}).start()
    try:
        results = []
        for _ in range(3):
            key = agent.deploy({"main.py": HELLO, "data.bin": os.urandom(4 * 2**20)})
            results.append(agent.call(agent.task(key), timeout=30))
            time.sleep(1.5)  # the worker looks at its disks before its next receive
    finally:
        assert agent.stop() == 0
    assert [r["status"] for r in results] == ["SUCCESS"] * 3
    log = agent.log.read_text()
    assert "idle sandboxes to free disk space" in log
    assert "[DEGRADED]" not in log
def test_a_full_work_dir_hands_the_message_back_untried_until_space_is_back(
    aws: Any, redis_url: str, tmp_path: Path, small_work_dir: Path
) -> None:
    """The work dir's own disk fills (with paths.min_free_mb 0, nothing is trimmed ahead of
    it): unpacking the code meets ENOSPC, the worker is DEGRADED and takes no new work while
    probe writes fail, the message comes back untried, and runs at attempt 1 once space is
    freed."""
    agent = Agent(aws, redis_url, tmp_path, queue={"max_attempts": 2},
                  runtimes={"python": {"warm": 0}},
                  paths={"work_dir": str(small_work_dir), "min_free_mb": 0}).start()
    ballast = small_work_dir / "ballast"
    try:
        task = agent.task(agent.deploy({"main.py": HELLO, "data.bin": os.urandom(2 * 2**20)}))
        room = os.statvfs(small_work_dir).f_bavail * os.statvfs(small_work_dir).f_frsize
        with open(ballast, "wb") as f:  # everything but 512 KiB: less than the code
            f.write(b"\1" * (room - 512 * 2**10))
        agent.send(task)
        wait_until(lambda: "[DEGRADED] disk: " in agent.log.read_text(), timeout=10,
                   what="the worker degraded for its disk")
        time.sleep(11)  # longer than a hand-back: it comes back, and is not taken here
        assert agent.log.read_text().count("not counted as a try") == 1
        ballast.unlink()  # the operator frees space; a probe write works again
        result = agent.result(task["requestId"], timeout=15)
    finally:
        assert agent.stop() == 0
    assert (result["status"], result["attempt"]) == ("SUCCESS", 1)  # no attempt burned
    log = agent.log.read_text()
    assert "[DEGRADED] over: disk works again" in log and "gave up" not in log
    (deferred,) = [line for line in log.splitlines() if "not counted as a try" in line]
    assert f"work dir {small_work_dir}/" in deferred and "No space left on device" in deferred
    assert re.search(r"\[DEGRADED\] disk: a probe write to .* failed: No space left", log)


def test_a_download_cut_off_mid_body_is_a_host_fault(aws: Any, tmp_path: Path) -> None:
    import boto3
    from botocore.config import Config as BotoConfig

    bucket = aws.new_bucket("cut")
    aws.s3().put_object(Bucket=bucket, Key="big.zip",
                        Body=make_zip({"main.py": HELLO, "data.bin": os.urandom(300_000)}))
    proxy = Forwarder(int(aws.endpoint.rsplit(":", 1)[1]), cut_after=100_000)
    try:
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{proxy.port}",
                          config=BotoConfig(retries={"max_attempts": 1}))
        store = CodeStore(tmp_path / "cache", 10 * 2**20, s3_client=s3)
        with pytest.raises(HostFault, match=r"download of s3://.*/big.zip cut off after \d+ bytes"):
            store.fetch(bucket, "big.zip")
    finally:
        proxy.close()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no partial file left
