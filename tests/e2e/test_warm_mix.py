"""bin/nanogrid-supervisor with 2 workers under a mix of functions, on both runners: warmth is
the host's, so a function starts cold at most once per host (issue 22; bench_warm_mix.py
measures the same at scale)."""

from __future__ import annotations

import random
import re
import time
from datetime import datetime
from typing import Any

import pytest
from helpers import wait_until
from supervised import Agent

pytestmark = pytest.mark.usefixtures("pids_limited_tests")

FUNCTIONS = 6
CALLS = 50
INTERVAL_S = 0.08


def span(result: dict[str, Any]) -> tuple[float, float]:
    """When the call was in the agent's hands (epoch seconds): from its receive to its end."""
    end = datetime.fromisoformat(result["finishedAt"].replace("Z", "+00:00")).timestamp()
    return end - result["timings"]["totalMs"] / 1000, end


@pytest.mark.parametrize("runner", ["process", "docker"])
def test_a_mix_of_functions_is_cold_at_most_once_per_host(
    agents: Any, runner: str, request: pytest.FixtureRequest
) -> None:
    python: dict[str, Any] = {"warm": 4}
    if runner == "docker":
        python["image"] = request.getfixturevalue("runtime_image")
        request.getfixturevalue("docker_engine")
    agent: Agent = agents(workers=2, runner=runner, runtimes={"python": python})
    if runner == "docker":
        agent.write_config(docker={"socket_dir": str(agent.base / "sandboxes")})
    agent.start()
    wait_until(lambda: agent.status()["warmUp"]["state"] == "warm", timeout=60,
               what="the generic sandboxes")
    keys = [agent.deploy(f"import time\ntime.sleep(0.02)\nprint({i})\n")
            for i in range(FUNCTIONS)]
    weights = [1 / (rank + 1) for rank in range(FUNCTIONS)]  # Zipf-like
    picks = random.Random(22).choices(range(FUNCTIONS), weights, k=CALLS)
    sent = []
    for pick in picks:
        sent.append((pick, agent.send(agent.task(keys[pick]))))
        time.sleep(INTERVAL_S)
    results = [(pick, agent.result(request_id)) for pick, request_id in sent]
    assert all(r["status"] == "SUCCESS" and r["stdout"] == f"{p}\n" for p, r in results)
    # A call cold though its function ran on the host before is a fault of the host's warmth
    # unless another call of its function overlapped it (all of the function's sandboxes may
    # then have been busy, and with no generic one idle a call waits for one to be made: cold,
    # as DESIGN.md says). Issue 22's target (at most 2% cold beyond the first, whatever the
    # cause) depends on how fast this host makes sandboxes: bench_warm_mix.py measures it.
    seen: set[int] = set()
    cold_alone = []
    for pick, result in results:
        if result["coldStart"] and pick in seen:
            start, end = span(result)
            if not any(span(r)[0] < end and start < span(r)[1]
                       for p, r in results if p == pick and r is not result):
                cold_alone.append(result["requestId"])
        seen.add(pick)
    assert cold_alone == []
    # Calls that ran in a sandbox the other worker made (the log: "worker-W | ... running
    # FUNCTION in python-wO-N" or "in nanogrid-wO-python-...").
    runs = re.findall(r"worker-(\d) +\|.* running \S+ in \S*w(\d)-", agent.log.read_text())
    assert len(runs) == CALLS, agent.log.read_text()[-3000:]
    assert any(taker != owner for taker, owner in runs)
