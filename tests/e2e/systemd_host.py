"""A worker host with systemd as PID 1: a container of nanogrid/systemd:bookworm.

`SystemdHost` boots the image (bin/nanogrid-build-images builds it), installs the agent the
way docs/systemd.md says (the agent's wheel into a venv at /opt/nanogrid, its dependencies
offline from the wheelhouse dev/setup builds, the unit file unchanged; no checkout in the
container) and drives it with systemctl. The
container shares the host's network, so the agent reaches the tests' redis-server and
moto_server on loopback and the tests reach its HTTP port.
"""

from __future__ import annotations

import shlex
import subprocess
import time
import uuid
from pathlib import Path

from wheelbuild import WHEELHOUSE

ROOT = Path(__file__).resolve().parents[2]
UNIT_FILE = ROOT / "systemd" / "nanogrid-supervisor.service"
IMAGE = "nanogrid/systemd:bookworm"
UNIT = "nanogrid-supervisor"
CONFIG = "/etc/nanogrid/worker.yaml"
RUN_FLAGS = [
    "--cap-add", "SYS_ADMIN",
    "--security-opt", "seccomp=unconfined",
    "--tmpfs", "/run", "--tmpfs", "/run/lock",
    "-v", "/sys/fs/cgroup:/sys/fs/cgroup",
    "--network", "host",
    "--stop-signal", "SIGRTMIN+3",
    "-v", f"{WHEELHOUSE}:{WHEELHOUSE}:ro",
]  # fmt: skip
# Processes of the agent: the supervisor and workers (the venv's python) and their fork
# servers (in its site-packages).
AGENT_PROCESSES = "/opt/nanogrid/"


class HostError(Exception):
    """A command in the container failed; the message is one line with its output's end."""


class SystemdHost:
    """One container booted with systemd; `close()` removes it whatever state it is in."""

    def __init__(self) -> None:
        self.name = f"nanogrid-systemd-{uuid.uuid4().hex[:10]}"
        self.started = False

    def boot(self, timeout: float = 30) -> float:
        """Start the container and wait for systemd to finish booting; returns the seconds."""
        began = time.monotonic()
        _run(["docker", "run", "-d", "--name", self.name, *RUN_FLAGS, IMAGE], timeout=60)
        self.started = True
        # `is-system-running --wait` ends with "running" or "degraded" (a unit that does not
        # fit a container); either way the boot is over. Before systemd listens it fails
        # at once ("Failed to connect to bus").
        deadline = began + timeout
        while True:
            state = self.sh("systemctl is-system-running --wait", check=False, timeout=timeout)
            if state.stdout.strip() in {"running", "degraded"}:
                return time.monotonic() - began
            if time.monotonic() > deadline:
                said = f"{state.stdout.strip()} {state.stderr.strip()}".strip()
                raise HostError(f"systemd did not boot within {timeout:.0f}s: {said}")
            time.sleep(0.1)

    def install(self, wheel: Path) -> None:
        """docs/systemd.md's install, offline: the wheel into a venv at /opt/nanogrid (its
        dependencies from the wheelhouse), the unit file."""
        _run(["docker", "cp", str(wheel), f"{self.name}:/tmp/{wheel.name}"], timeout=60)
        self.sh(
            "python3 -m venv /opt/nanogrid && /opt/nanogrid/bin/pip install -q "
            f"--no-index --find-links {WHEELHOUSE} /tmp/{wheel.name}",
            timeout=180,
        )
        self.sh("install -d -m 0750 /etc/nanogrid")
        self.write(f"/etc/systemd/system/{UNIT}.service", UNIT_FILE.read_text(), "0644")
        self.sh("systemctl daemon-reload")

    def write(self, path: str, text: str, mode: str = "0640") -> None:
        self.sh(f"install -D -m {mode} /dev/stdin {shlex.quote(path)}", stdin=text)

    def sh(
        self, script: str, *, check: bool = True, stdin: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell script in the container as root."""
        cmd = ["docker", "exec", *(["-i"] if stdin is not None else []), self.name, "sh", "-c"]
        return _run([*cmd, script], check=check, stdin=stdin, timeout=timeout)

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.sh(shlex.join(["systemctl", *args]), check=check, timeout=90)

    def show(self, *properties: str) -> dict[str, str]:
        """`systemctl show` of the unit: property -> value."""
        out = self.systemctl("show", UNIT, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self) -> str:
        return self.sh(f"journalctl -u {UNIT} --no-pager -o cat", check=False).stdout

    def agent_processes(self) -> list[str]:
        """`pid: command line` of every live process running the agent's code."""
        script = (
            "import os\n"
            "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
            "    try:\n"
            "        cmd = open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\\0', b' ')\n"
            "        state = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0]\n"
            "    except OSError:\n"
            "        continue\n"
            f"    if {AGENT_PROCESSES!r}.encode() in cmd and state != 'Z':\n"
            "        print(pid + ': ' + cmd.decode(errors='replace'))\n"
        )
        # On stdin, so that the scan's own command line does not match.
        return self.sh("python3 -", stdin=script).stdout.splitlines()

    def close(self) -> None:
        if self.started:
            _run(["docker", "rm", "-f", "-v", self.name], check=False, timeout=60)


def _run(
    cmd: list[str], *, check: bool = True, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
        raise HostError(f"{shlex.join(cmd)[:200]} exited {done.returncode}: {' | '.join(tail)}")
    return done
