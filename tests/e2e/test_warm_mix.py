"""bin/nanogrid-supervisor with 2 workers under a mix of functions, on both runners: warmth is
the host's, so a function starts cold at most once per host (issue 22; bench_warm_mix.py
measures the same at scale)."""

from __future__ import annotations

import random
import re
import time
from typing import Any

import pytest
from helpers import wait_until
from supervised import Agent

pytestmark = pytest.mark.usefixtures("pids_limited_tests")

FUNCTIONS = 6
CALLS = 50
INTERVAL_S = 0.08
COLD_AGAIN_MAX = 0.02
"""Issue 22's target: calls cold beyond their function's first, at most 2% of all calls. A
call of a function whose sandboxes are all busy, when no generic one is idle, waits for one
to be made: cold (DESIGN.md), though its function ran on the host before."""


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
    seen: set[int] = set()
    cold_again = []
    for pick, result in results:
        if result["coldStart"] and pick in seen:
            cold_again.append(result["requestId"])
        seen.add(pick)
    assert len(cold_again) <= CALLS * COLD_AGAIN_MAX, cold_again
    # Calls that ran in a sandbox the other worker made (the log: "worker-W | ... running
    # FUNCTION in python-wO-N" or "in nanogrid-wO-python-...").
    runs = re.findall(r"worker-(\d) +\|.* running \S+ in \S*w(\d)-", agent.log.read_text())
    assert len(runs) == CALLS, agent.log.read_text()[-3000:]
    assert any(taker != owner for taker, owner in runs)
