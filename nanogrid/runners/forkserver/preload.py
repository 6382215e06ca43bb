"""Import-warm (a run's ``"preload"``, python runs only): the server holds its function's
imports, so later calls do not pay for them.

The first run reports, over a pipe, the modules it imported from the standard library and
from its own directory; once the agent asks (after the reply: off the call's path, and out
of its peak), the server vets them in a forked helper (each must import without error,
within ``PRELOAD_BUDGET_S`` for the lot, without leaving a thread or a file descriptor
behind, without reading the environment or stdin, writing to stdout or stderr, or keeping a
reference to them: all of that belongs to the call) and imports the ones that pass itself,
with the function's directory on sys.path. Every later fork starts with them in memory, as
copies: what a run changes in a module never reaches the next run. A sandbox serves one
function@version (the agent's ``code_key``), so this happens once per sandbox; a run for
another key gets none of the function's modules.

The vetting cannot see everything a module may leave in the server (a thread started later,
a hook the server calls, a process it spawned), so the agent asks for preloading only of a
sandbox it freezes between runs (nanogrid/runners/freezer.py): what the function's modules left runs
only while a run of that function lasts.
"""

import _thread
import contextlib
import gc
import itertools
import json
import os
import select
import signal
import sys
import time

from .reaping import kill_group

PRELOAD_BUDGET_S = 2.0
"""How long the vetting of a function's imports may take, for all of them together."""
STDLIB = os.path.dirname(os.__file__)


class Preload:
    """The function's imports this server holds (see the module docstring)."""

    def __init__(self) -> None:
        self.key: str | None = None
        """The code_key whose modules are loaded; set once, after its first run."""
        self.path = ""
        """The function's directory, first on this server's sys.path once loaded."""
        self.own: list = []
        """Modules loaded from the function's directory."""
        self._pipe: tuple | None = None
        self._loaded = 0
        """How many modules the server had as it forked the reporting run."""
        self._asked: str | None = None
        self._todo: list = []
        """What the run reported that this server has not loaded yet (``gather``)."""

    def expect(self, request: dict) -> None:
        """Before the fork: open the pipe the run reports its imports on, if they are wanted."""
        key = request.get("preload")
        if key and request.get("python") and self.key is None:
            self._pipe = os.pipe2(os.O_CLOEXEC)
            self._loaded = len(sys.modules)
            self._asked = key

    def enter(self, key: str | None) -> None:
        """In the child: a run of another function must not find this one's modules."""
        if self._pipe is not None:
            os.close(self._pipe[0])
        if self.key is not None and key != self.key:
            for name in self.own:
                sys.modules.pop(name, None)
            if sys.path[:1] == [self.path]:
                del sys.path[0]

    def report(self, cwd: str) -> None:
        """In the child, after the run: name the modules it imported that may be preloaded.
        Only the entries the run added to sys.modules are read, the last ones of the dict:
        reading one of the server's modules takes a reference, a write that copies its page
        into this child (going through all of them cost a hello's first run ~0.9 ms). A run
        that took modules out may have some of its own left unnamed: they are not preloaded,
        and its later calls import them."""
        if self._pipe is None:
            return
        roots = (os.path.join(STDLIB, ""), os.path.join(cwd, ""))
        skip = tuple(os.path.join(STDLIB, d, "") for d in ("site-packages", "dist-packages"))
        added = list(itertools.islice(reversed(sys.modules),
                                      max(0, len(sys.modules) - self._loaded)))
        names = []
        for name in reversed(added):  # in import order: the vetting's budget goes to the first
            origin = getattr(getattr(sys.modules[name], "__spec__", None), "origin", None)
            if name == "__main__" or not isinstance(origin, str):
                continue
            if origin in ("built-in", "frozen") or (
                origin.startswith(roots) and not origin.startswith(skip)
            ):
                names.append(name)
        with contextlib.suppress(OSError):
            os.set_blocking(self._pipe[1], False)  # a list too long for the pipe is dropped
            os.write(self._pipe[1], json.dumps(names).encode())

    def pending(self) -> bool:
        """This run reports its imports (in the child) / reported them (in the server)."""
        return self._pipe is not None

    def gather(self, cwd: str) -> bool:
        """In the server, after the run: take its report. True when it names modules this
        server has not loaded (``load`` imports them, once the agent asks); else the key
        counts as loaded now, with nothing to import (and nothing for the agent to wait for)."""
        assert self._pipe is not None
        read, write = self._pipe
        self._pipe = None
        os.close(write)
        data = b""
        os.set_blocking(read, False)
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read, 65536):
                data += chunk
        os.close(read)
        try:
            names = [n for n in json.loads(data) if isinstance(n, str)] if data else []
        except ValueError:
            names = []
        self._todo = [name for name in names if name not in sys.modules]
        if self._todo:
            return True
        sys.path.insert(0, cwd)
        self._hold(cwd)
        return False

    def cancel(self) -> None:
        """In the server: what the run reported is not loaded (a later run of the key
        reports again)."""
        self._todo = []

    def load(self, cwd: str, keep_closed: list) -> dict:
        """In the server, once the agent asks: vet the modules ``gather`` found, import
        those that pass. Returns what was loaded and what was left out."""
        passed, left_out = vet(self._todo, cwd, keep_closed)
        self._todo = []
        sys.path.insert(0, cwd)
        for name in passed:
            try:
                __import__(name)
            except BaseException as exc:  # passed in the helper; keep the server serving
                left_out[name] = f"{type(exc).__name__} in the server"
        self._hold(cwd)
        gc.collect()
        gc.freeze()  # as warm_up: keeps the children's collector off these pages
        return {"preloaded": [n for n in passed if n not in left_out], "left_out": left_out}

    def _hold(self, cwd: str) -> None:
        """The server holds the key's modules now (its directory first on sys.path): which
        of them are the function's own."""
        self.key, self.path = self._asked, cwd
        own = os.path.join(cwd, "")
        self.own = [
            name
            for name, module in list(sys.modules.items())
            if str(getattr(module, "__file__", "") or "").startswith(own)
        ]


def vet(todo: list, cwd: str, keep_closed: list) -> tuple[list, dict]:
    """Import ``todo`` in a forked helper first: (those that passed, {left out: why})."""
    read, write = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read)
            for fd in keep_closed:
                os.close(fd)
            os.setsid()  # its group is killed with it: whatever an import started goes too
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            sys.path.insert(0, cwd)
            vet_in_helper(todo, write)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    deadline = time.monotonic() + PRELOAD_BUDGET_S
    data = b""
    timed_out = False
    while True:
        wait = deadline - time.monotonic()
        if wait <= 0 or not select_readable(read, wait):
            timed_out = True
            break
        chunk = os.read(read, 65536)
        if not chunk:
            break
        data += chunk
    os.close(read)
    kill_group(pid)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    verdicts = dict(json.loads(line) for line in data.decode().splitlines() if line)
    passed = [name for name in todo if verdicts.get(name) == "ok"]
    left_out = {name: why for name, why in verdicts.items() if why != "ok"}
    if timed_out:
        hung = next((name for name in todo if name not in verdicts), None)
        if hung is not None:
            left_out[hung] = f"took longer than {PRELOAD_BUDGET_S} s"
    return passed, left_out


def select_readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


class _Watched:
    """Stands in for stdin, stdout or stderr in the vetting helper: notes any use."""

    def __init__(self, used: list) -> None:
        self._used = used

    def __getattr__(self, name: str) -> object:
        self._used.append("stdio")
        raise OSError("not during a preload")


def side_effect(fds: int, tasks: int, used: list, streams: list, refs: list) -> str:
    """What an import left that belongs to the call, not the server ("ok": nothing)."""
    if "thread" in used or len(os.listdir("/proc/self/task")) > tasks:
        return "started a thread"
    if len(os.listdir("/proc/self/fd")) > fds:
        return "left a file descriptor open"
    if used or [sys.getrefcount(stream) for stream in streams] != refs:
        return "uses the environment, stdin, stdout or stderr at import"
    if any(a is not b for a, b in zip((sys.stdin, sys.stdout, sys.stderr), streams, strict=True)):
        return "replaced stdin, stdout or stderr"
    return "ok"


def vet_in_helper(names: list, out: int) -> None:
    """In the helper: import each name, write one JSON line ``[name, "ok" | why]`` each."""
    used: list = []
    environ = type(os.environ)

    class WatchedEnviron(environ):  # type: ignore[misc, valid-type]
        def __getitem__(self, key: object) -> object:
            used.append("environ")
            return super().__getitem__(key)

        def __iter__(self) -> object:
            used.append("environ")
            return super().__iter__()

    os.environ.__class__ = WatchedEnviron
    start_thread = _thread.start_new_thread

    def watched_start(*args: object, **kwargs: object) -> object:
        used.append("thread")  # noted even when the thread is over before it is looked for
        return start_thread(*args, **kwargs)

    # threading takes its starter from _thread when it is imported: watch both.
    _thread.start_new_thread = watched_start
    if "threading" in sys.modules:
        sys.modules["threading"]._start_new_thread = watched_start
    streams = [_Watched(used) for _ in range(3)]
    sys.stdin, sys.stdout, sys.stderr = streams
    for name in names:
        if name in sys.modules:  # came with an earlier one
            verdict = "ok"
        else:
            fds, tasks = len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))
            refs = [sys.getrefcount(stream) for stream in streams]
            used.clear()
            try:
                __import__(name)
                verdict = "ok"
            except BaseException as exc:
                verdict = f"import failed: {type(exc).__name__}"
            verdict = verdict if verdict != "ok" else side_effect(fds, tasks, used, streams, refs)
        os.write(out, (json.dumps([name, verdict]) + "\n").encode())
