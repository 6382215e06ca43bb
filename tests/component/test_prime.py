"""A generic process sandbox made ahead of calls is primed (one empty run: its server, forked
from a template, is slow on its first run), a container is not (its server is not forked from
one), and a function's first call in either finds nothing of it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import MAX_PIDS
from harness import start_runner as start
from helpers import RUNTIME_IMAGE, put_code

from nanogrid.runners.base import Invocation
from nanogrid.runners.pooled import PooledRunner

pytestmark = pytest.mark.usefixtures("containers_agent")

MAIN = (
    "import os, sys\n"
    "print(sorted(os.listdir('.')), sys.stdin.read(), os.environ['NANOGRID_REQUEST_ID'])\n"
)


@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker)])
def runner(request: pytest.FixtureRequest) -> Iterator[PooledRunner]:
    if request.param == "docker":
        request.getfixturevalue("runtime_image")
    r = start(request.param, {"python": {"image": RUNTIME_IMAGE, "warm": 1}})
    yield r
    r.close()


def test_a_generic_sandbox_ran_once_and_its_first_call_finds_nothing_of_it(
    runner: PooledRunner,
) -> None:
    sandbox = runner.acquire("python", "first@1")
    try:
        assert not sandbox.cold_start and sandbox.code_key is None
        assert sandbox.runs == (runner.name == "process") and list(sandbox.code_dir.iterdir()) == []
        put_code(sandbox, {"main.py": MAIN, "data.txt": "x"}, "first@1")
        invocation = Invocation("req-1", "fn", ("python3", "main.py"), b"in", 256, 10_000,
                                10_000, MAX_PIDS)
        out = runner.run(sandbox, invocation)
    finally:
        runner.release(sandbox)
    assert out.exit_code == 0 and out.stderr == b""
    assert out.stdout == b"['data.txt', 'main.py'] in req-1\n"
