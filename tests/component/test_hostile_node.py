"""Hostile node functions against both runners: the cheap probes of test_hostile.py, in node.

A node function runs inside its sandbox's long-lived node server (a worker thread), not in a
fork of it, so what the python probes show for a forked child is checked here for the server
itself: it must be as confined (network, other processes' environ, the code dir, /tmp's cap,
/proc) as python's fork server.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from harness import CONTRACT_ENV, MAX_OUTPUT, MAX_PIDS, SECRET, MiB
from harness import hostile_config as make_config
from helpers import RedisServer, put_code, unreached_listener, wait_until

from nanogrid.common.config import Config, RuntimeConfig
from nanogrid.common.errors import SandboxError
from nanogrid.runners.base import Invocation, Runner
from nanogrid.runners.docker import DockerRunner
from nanogrid.runners.docker import cleanup as container_cleanup
from nanogrid.runners.process import ProcessRunner

pytestmark = pytest.mark.usefixtures("pids_limited_tests")


class NodeHarness:
    """One runner with a warm node sandbox, used as a worker uses it."""

    def __init__(self, kind: str, runner: Runner, config: Config) -> None:
        self.kind = kind
        self.runner = runner
        self.config = config

    def probe(self, code: str, key: str = "probe", stdin: bytes = b"{}", **kw: Any) -> Any:
        """Run a probe that prints one JSON document; return it."""
        sandbox = self.runner.acquire("node", key)
        try:
            put_code(sandbox, {"main.js": code}, key)
            invocation = Invocation(
                "req-hostile", "fn", ("node", "main.js"), stdin, kw.get("memory_mb", 128),
                kw.get("timeout_ms", 5000), MAX_OUTPUT, MAX_PIDS,
            )
            out = self.runner.run(sandbox, invocation)
        finally:
            self.runner.release(sandbox)
        assert out.exit_code == 0, out.stderr.decode()
        return json.loads(out.stdout)

    @property
    def tmpfs_mb(self) -> int:
        settings = self.config.docker if self.kind == "docker" else self.config.process
        return settings.tmpfs_mb


@pytest.fixture(params=["process", "docker"])
def hostile_node(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[NodeHarness]:
    """A warm node runner of each kind, started by an agent whose environment holds secrets."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    base = tempfile.mkdtemp(prefix="ng-hnode-")  # short: Docker socket paths have 107 bytes
    os.chmod(base, 0o711)  # sandbox users must reach work_dir
    node = RuntimeConfig(command=("node", "main.js"), warm=1)
    runner: Runner
    if request.param == "docker":
        node = dataclasses.replace(node, image=request.getfixturevalue("node_image"))
        agent = f"test-{uuid.uuid4().hex[:10]}"
        monkeypatch.setattr(container_cleanup, "agent_id", lambda: agent)
    config = dataclasses.replace(make_config(request.param, base), runtimes={"node": node})
    runner = DockerRunner(config, 0) if request.param == "docker" else ProcessRunner(config, 0)
    try:
        wait_until(lambda: runner.pool_stats()["node"]["warm"] == 1, timeout=30, what="warm pool")
        yield NodeHarness(request.param, runner, config)
    finally:
        runner.close()
        shutil.rmtree(base, ignore_errors=True)


NETWORK = r"""
const net = require('net');
const os = require('os');
const ports = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const attempt = (port) => new Promise((resolve) => {
  const sock = net.connect({ host: '127.0.0.1', port, timeout: 1000 });
  sock.on('connect', () => { sock.destroy(); resolve('connected'); });
  sock.on('timeout', () => { sock.destroy(); resolve('timeout'); });
  sock.on('error', (e) => resolve(e.code));
});
Promise.all(ports.map(attempt)).then(async (seen) => {
  const out = net.connect({ host: '192.0.2.1', port: 9, timeout: 500 });  // TEST-NET-1
  const far = await new Promise((resolve) => {
    out.on('connect', () => resolve('connected'));
    out.on('timeout', () => { out.destroy(); resolve('timeout'); });
    out.on('error', (e) => resolve(e.code));
  });
  console.log(JSON.stringify({
    ports: seen, egress: far, interfaces: Object.keys(os.networkInterfaces()),
  }));
});
"""


def test_node_reaches_neither_host_loopback_nor_redis_nor_out(
    hostile_node: NodeHarness, redis_server: RedisServer
) -> None:
    with unreached_listener() as port:
        ports = [port, redis_server.port]
        seen = hostile_node.probe(NETWORK, stdin=json.dumps(ports).encode())
    assert seen["ports"] == ["ECONNREFUSED", "ECONNREFUSED"]
    assert seen["egress"] == "ENETUNREACH" and seen["interfaces"] == ["lo"]


ENVIRON = r"""
const fs = require('fs');
const pids = fs.readdirSync('/proc').filter((p) => /^\d+$/.test(p));
const leaked = pids.filter((p) => {
  try {
    const data = fs.readFileSync(`/proc/${p}/environ`, 'latin1');
    return data.includes('AWS_') || data.includes('nanogrid-hostile');
  } catch (e) {
    return false;
  }
});
const cmdlines = pids.map((p) => fs.readFileSync(`/proc/${p}/cmdline`, 'latin1'));
console.log(JSON.stringify({ leaked, cmdlines, own: Object.keys(process.env).sort() }));
"""


def test_node_sees_only_its_sandbox_and_no_aws_credentials(hostile_node: NodeHarness) -> None:
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET  # the agent has them
    seen = hostile_node.probe(ENVIRON)
    assert seen["leaked"] == [] and set(seen["own"]) == CONTRACT_ENV
    # process: the node server alone (PID 1); docker: docker-init and the server.
    assert len(seen["cmdlines"]) == (1 if hostile_node.kind == "process" else 2), seen
    assert not any("pytest" in cmdline for cmdline in seen["cmdlines"])


FILES = r"""
const fs = require('fs');
const attempt = (f) => { try { f(); return 'ok'; } catch (e) { return e.code; } };
const seen = {
  overwrite: attempt(() => fs.writeFileSync('main.js', 'hacked')),
  create: attempt(() => fs.writeFileSync('new.js', 'x')),
  mkdir: attempt(() => fs.mkdirSync('sub')),
};
let written = 0;
let error = null;
const chunk = Buffer.alloc(2 ** 20, 120);
try {
  for (let n = 0; written < 256 * 2 ** 20; n++) {
    const fd = fs.openSync(`/tmp/fill-${n}`, 'w');
    try {
      for (let i = 0; i < 4; i++) { fs.writeSync(fd, chunk); written += chunk.length; }
    } finally {
      fs.closeSync(fd);
    }
  }
} catch (e) {
  error = e.code;
}
console.log(JSON.stringify({ ...seen, written, error }));
"""


def test_node_cannot_write_its_code_and_tmp_stops_at_its_cap(hostile_node: NodeHarness) -> None:
    seen = hostile_node.probe(FILES, timeout_ms=20_000)
    for name in ("overwrite", "create", "mkdir"):
        assert seen[name] in ("EROFS", "EACCES", "EPERM"), seen
    assert seen["error"] == "ENOSPC" and seen["written"] <= hostile_node.tmpfs_mb * MiB


FLOOD = r"""
const fs = require('fs');
// The agent's connection is a socket of this process (the node server's): write on every one.
const link = (fd) => {
  try { return fs.readlinkSync(`/proc/self/fd/${fd}`); } catch { return ''; }
};
const fds = fs.readdirSync('/proc/self/fd');
const sockets = fds.filter((fd) => link(fd).startsWith('socket:')).map(Number);
const frame = (type, length, body) => {
  const header = Buffer.alloc(5);
  header.write(type, 0, 'latin1');
  header.writeUInt32BE(length, 1);
  return Buffer.concat([header, body]);
};
const huge = JSON.parse(fs.readFileSync(0, 'utf8')).huge;
const first = huge ? frame('O', 2 ** 30, Buffer.alloc(0)) : Buffer.alloc(0);
const chunk = huge ? Buffer.alloc(2 ** 20, 120) : frame('O', 16, Buffer.alloc(16, 120));
const until = Date.now() + 8000;
for (const fd of sockets) try { fs.writeSync(fd, first); } catch {}
while (Date.now() < until) for (const fd of sockets) try { fs.writeSync(fd, chunk); } catch {}
"""
HELLO = "console.log('hello');\n"

FORGED_END = """
const { parentPort } = require('worker_threads');
for (const nonce of [undefined, '0'.repeat(32), 'guess']) {
  parentPort.postMessage({ nonce, ended: 1n, exitCode: 0, reusable: true, loaded: null });
}
setTimeout(() => { console.log('still running'); process.exitCode = 7; }, 200);
"""


def test_a_run_cannot_end_itself_with_a_forged_message(hostile_node: NodeHarness) -> None:
    """The server takes a run's end only from a message carrying the run's nonce (random,
    read from /dev/urandom per run): one the function posts to its parent is ignored, and
    the run ends when it does."""
    sandbox = hostile_node.runner.acquire("node", "forger")
    try:
        put_code(sandbox, {"main.js": FORGED_END}, "forger")
        out = hostile_node.runner.run(sandbox, node_invocation(b"{}", 5000))
    finally:
        hostile_node.runner.release(sandbox)
    assert out.exit_code == 7 and out.stdout == b"still running\n"
    assert out.duration_ms >= 150


def rss_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("huge", [True, False], ids=["a 1 GiB frame", "small frames"])
def test_a_frame_flood_ends_its_run_and_costs_the_agent_no_memory(
    hostile_node: NodeHarness, huge: bool
) -> None:
    """Frames forged on the server's socket end the run as a sandbox error at once, the agent
    holds no more than a frame of them, and a hello in another sandbox goes on as before."""
    runner = hostile_node.runner
    neighbour = runner.acquire("node", "hello")
    put_code(neighbour, {"main.js": HELLO}, "hello")
    flooder = runner.acquire("node", "flood")
    put_code(flooder, {"main.js": FLOOD}, "flood")
    hellos: list[float] = []
    peak = baseline = rss_bytes()
    outcome: list[BaseException | float] = []

    def flood() -> None:
        started = time.monotonic()
        try:
            runner.run(flooder, node_invocation(json.dumps({"huge": huge}).encode(), 10_000))
        except BaseException as exc:  # noqa: BLE001  examined below
            outcome.append(exc)
        outcome.append(time.monotonic() - started)

    thread = threading.Thread(target=flood)
    thread.start()
    while thread.is_alive() or len(hellos) < 3:
        started = time.monotonic()
        out = runner.run(neighbour, node_invocation(b"{}", 5000))
        hellos.append(time.monotonic() - started)
        assert (out.exit_code, out.stdout) == (0, b"hello\n"), out.stderr
        peak = max(peak, rss_bytes())
    thread.join()
    runner.release(neighbour)
    runner.release(flooder)
    error, took = outcome
    assert took < 4, f"the flood's run lasted {took:.1f} s"  # it writes for 8 s if not cut
    assert peak - baseline < 5 * MiB, f"the agent grew by {(peak - baseline) / MiB:.1f} MiB"
    assert isinstance(error, SandboxError) and "past the output cap" in str(error), error
    assert not flooder.healthy
    # The hellos beside the flood go on (20-70 ms each; one of 0.53 s on a loaded host): none
    # waits for the flood's run, which writes for 8 s if not cut.
    assert statistics.median(hellos) < 0.25 and max(hellos) < 1.5, hellos
    wait_until(lambda: runner.pool_stats()["node"]["warm"] >= 1, timeout=30, what="a new sandbox")
    assert hostile_node.probe("console.log(JSON.stringify(1));\n", key="after") == 1


def node_invocation(stdin: bytes, timeout_ms: int) -> Invocation:
    return Invocation(
        "req-hostile", "fn", ("node", "main.js"), stdin, 128, timeout_ms, MAX_OUTPUT, MAX_PIDS
    )
