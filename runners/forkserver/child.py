"""The forked child of one run: it becomes the function.

With ``"python": true`` it runs ``argv[1]`` with runpy as ``python3 argv[1]`` would
(``__main__``, ``sys.argv``, ``sys.path[0]``, exit codes, tracebacks), without exec'ing a
new interpreter; otherwise it exec's ``argv``. The function finds none of the server's own
modules: their directory is not on sys.path and they are not in sys.modules (``__main__``
takes both out), so a function's ``preload.py`` or ``server.py`` is its own.
"""

import _signal
import atexit
import contextlib
import io
import os
import resource
import runpy
import signal
import sys
import traceback
import types

from .preload import Preload
from .script import run_compiled

DEFAULT_SIGNALS = tuple(int(sig) for sig in (
    signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE
))

def child(
    request: dict,
    fds: list,
    keep_closed: list,
    preload: Preload,
    code: types.CodeType | None = None,
) -> None:
    """In the forked child: become the function (``code``: its script, compiled by the
    server). Never returns."""
    status = 127
    try:
        preload.enter(request.get("preload"))
        os.setsid()
        _signal.set_wakeup_fd(-1)  # the function's own handlers must not write into a stale fd
        # The C module: signal.signal wraps its result in an enum, whose machinery touches
        # (and so copies) ~80 of the server's pages in every child.
        for sig in DEFAULT_SIGNALS:
            _signal.signal(sig, _signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds + keep_closed:
            if fd > 2:
                os.close(fd)
        limits = request.get("rlimits") or {}
        if limits.get("as"):
            resource.setrlimit(resource.RLIMIT_AS, (limits["as"], limits["as"]))
        if limits.get("nproc"):
            resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"], limits["nproc"]))
        os.umask(0o022)
        os.chdir(request["cwd"])
        argv = request["argv"]
        if request.get("python"):
            before = set(sys.modules) if preload.pending() else set()
            status = run_python(argv, request["cwd"], code)
            preload.report(before, request["cwd"])
        else:
            os.execvpe(argv[0], argv, request["env"])
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(2, f"nanogrid: cannot start {request.get('argv')}: {exc}\n".encode())
    os._exit(status)


def adopt_environment(env: dict) -> None:
    """In the server, before the fork: make os.environ (and the C environ) the run's ``env``,
    writing only what changed since the last run (mostly the request id). Done in the child,
    clearing and refilling os.environ copied ~80 of the server's pages in every run."""
    environ = os.environ
    for key in [key for key in environ if key not in env]:
        del environ[key]
    for key, value in env.items():
        if environ.get(key) != value:
            environ[key] = value


def run_python(argv: list, cwd: str, code: types.CodeType | None = None) -> int:
    """Run argv[1] as ``python3 argv[1] argv[2:]`` would, in this (forked) interpreter;
    ``code`` is argv[1] compiled already (else runpy reads and compiles it)."""
    script = argv[1]
    sys.argv = list(argv[1:])
    if sys.path[:1] != [cwd]:  # a server that preloaded the function's modules has it there
        sys.path.insert(0, cwd)
    sys.stdin = sys.__stdin__ = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        open(2, "wb", buffering=0, closefd=False),  # noqa: SIM115
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )
    status = 0
    try:
        if code is None:
            runpy.run_path(script, run_name="__main__")
        else:
            run_compiled(code, script)
    except SystemExit as exc:
        status = exit_code_of(exc)
    except BaseException as exc:  # the function's own error, reported as python would
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != script:
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb or exc.__traceback__)
        status = 1
    # Not imported by the server (its fork hook costs every child ~0.4 ms): only a function
    # that imported it can have threads to wait for, as python waits at exit.
    threading = sys.modules.get("threading")
    if threading is not None:
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    return status


def exit_code_of(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1
