"""The forked child of one run: it becomes the function.

With ``"python": true`` it runs ``argv[1]`` with runpy as ``python3 argv[1]`` would
(``__main__``, ``sys.argv``, ``sys.path[0]``, exit codes, tracebacks), without exec'ing a
new interpreter; otherwise it exec's ``argv``. The function finds none of the server's own
modules: their directory is not on sys.path (``__main__`` takes it off) and they leave
sys.modules before the function runs, so a function's ``preload.py`` or ``server.py`` is its
own.
"""

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

SERVER_MODULES = (
    __package__,  # ``_nanogrid_forkserver`` in a sandbox (see ``__main__``)
    *(f"{__package__}.{name[:-3]}" for name in os.listdir(os.path.dirname(__file__))
      if name.endswith(".py") and not name.startswith("__")),
)
"""The server's modules, named once in the server: going through sys.modules in every child
would write to the pages of all its keys (their reference counts), about 0.1 ms a call."""


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
        signal.set_wakeup_fd(-1)  # the function's own handlers must not write into a stale fd
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
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
        os.environ.clear()
        os.environ.update(request["env"])
        argv = request["argv"]
        if request.get("python"):
            forget_server()
            before = set(sys.modules) if preload.pending() else set()
            status = run_python(argv, request["cwd"], code)
            preload.report(before, request["cwd"])
        else:
            os.execvpe(argv[0], argv, request["env"])
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(2, f"nanogrid: cannot start {request.get('argv')}: {exc}\n".encode())
    os._exit(status)


def forget_server() -> None:
    """Take the server's modules out of sys.modules: an import of the same name by the
    function must find the function's module. The server's code in this process keeps
    running: its functions hold their modules' globals."""
    for name in SERVER_MODULES:
        sys.modules.pop(name, None)


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
