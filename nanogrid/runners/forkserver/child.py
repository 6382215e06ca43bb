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
import types

from .preload import Preload
from .script import run_compiled

DEFAULT_SIGNALS = tuple(
    int(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE)
)
"""What a run starts with at the default, as plain ints for ``_signal`` (see child)."""


class Signals:
    """What the child must undo of the server's signal set-up, worked out once: each call in
    the child copies pages of the server."""

    def __init__(self, wakeup: bool) -> None:
        # The server needs no SIGPIPE ignored: a reply to an agent that went away ends the
        # server either way (killed, or the uncaught BrokenPipeError; as PID 1 it is immune
        # and gets the error).
        _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
        self.wakeup = wakeup
        # What the server's own start left: SIG_IGN survives exec, so whatever its starter
        # ignored would reach every run. SIGXFSZ stays ignored, as Python's own start leaves
        # it in any python program (a write past RLIMIT_FSIZE fails with EFBIG).
        inherited = []
        for sig in range(1, _signal.NSIG):
            if sig == _signal.SIGXFSZ:
                continue
            try:
                if _signal.getsignal(sig) not in (_signal.SIG_DFL, None):
                    inherited.append(sig)
            except (OSError, ValueError):  # not a signal that has a disposition
                continue
        self.reset = tuple(sorted(set(DEFAULT_SIGNALS) | set(inherited)))


def child(
    request: dict,
    fds: list,
    keep_closed: list,
    preload: Preload,
    signals: Signals,
    code: types.CodeType | None = None,
    stdio: tuple | None = None,
) -> None:
    """In the forked child: become the function (``code``: its script, compiled by the
    server; ``stdio``: its stdin, stdout and stderr, made by the server and already fds 0-2
    and sys.stdin, sys.stdout and sys.stderr). Never returns."""
    status = 127
    try:
        preload.enter(request.get("preload"))
        os.setsid()
        if signals.wakeup:
            _signal.set_wakeup_fd(-1)  # the function's own handlers must not write into it
        # The C module: signal.signal wraps its result in an enum, whose machinery touches
        # (and so copies) ~80 of the server's pages in every child. The defaults whatever
        # the server set up later, and what it inherited: a few syscalls.
        for sig in signals.reset:
            _signal.signal(sig, _signal.SIG_DFL)
        if stdio is None:  # else the server made them fds 0-2 already (Stdio.for_run)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            keep_closed = fds + keep_closed
        for fd in keep_closed:
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
            status = run_python(argv, request["cwd"], code, stdio or wrap_stdio())
            preload.report(request["cwd"])
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


def wrap_stdio() -> tuple:
    """sys.stdin, sys.stdout and sys.stderr over fds 0-2, as ``python3 main.py`` has them
    with a pipe on each."""
    return (  # surrogateescape: what python picks for stdin and stdout in a C.UTF-8 locale
        open(0, encoding="utf-8", errors="surrogateescape", closefd=False),  # noqa: SIM115
        open(1, "w", encoding="utf-8", errors="surrogateescape", closefd=False),  # noqa: SIM115
        io.TextIOWrapper(
            open(2, "wb", buffering=0, closefd=False),  # noqa: SIM115
            encoding="utf-8",
            errors="backslashreplace",
            line_buffering=True,
        ),
    )


class Stdio:
    """The run's stdin, stdout and stderr as python objects, made once by the server.

    Made in the child, the three wrappers (and the codec machinery behind them) copied ~60 of
    the server's pages in every run; made before each fork, they cost the server a dozen
    objects and ten syscalls a run. They are made at start over a pipe on each of fds 0-2,
    the kind of file every run's are, and are the server's own sys.stdin, sys.stdout and
    sys.stderr from then on, so a child has nothing to set; the server writes nothing to
    them (it has no stdout to write, and what an error of its own writes to stderr goes
    straight to fd 2), so each child finds them as new. For the moment of the fork the
    run's pipes are the server's fds 0-2; the server's own are kept aside and put back at
    once after.
    """

    def __init__(self) -> None:
        self.saved = [_kept(fd) for fd in range(3)]
        self.wrappers = self._over_a_pipe()
        self.own = (sys.stdin, sys.stdout, sys.stderr)
        """Python's own objects, held: were the child to drop their last reference, their
        deallocation would touch (copy) pages in every run."""
        if self.wrappers is not None:
            sys.stdin = sys.__stdin__ = self.wrappers[0]
            sys.stdout = sys.__stdout__ = self.wrappers[1]
            sys.stderr = sys.__stderr__ = self.wrappers[2]

    def for_run(self, fds: list) -> tuple | None:
        """In the server, before the fork: the run's pipes as fds 0-2 (the received ones are
        closed and ``fds`` emptied) and their wrappers; None: the child makes its own."""
        if self.wrappers is None:
            return None
        try:
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
        except OSError:
            self.restore()
            return None
        for fd in fds:
            os.close(fd)
        fds.clear()
        return self.wrappers

    def restore(self) -> None:
        """In the server, after the fork: its own fds 0-2 again (it keeps no end of a pipe)."""
        for target, fd in enumerate(self.saved):
            os.dup2(fd, target)

    def _over_a_pipe(self) -> tuple | None:
        try:
            read, write = os.pipe()
        except OSError:
            return None
        try:
            for target, fd in enumerate((read, write, write)):
                os.dup2(fd, target)
            return wrap_stdio()
        except OSError:
            return None
        finally:
            os.close(read)
            os.close(write)
            self.restore()


def _kept(fd: int) -> int:
    """A copy of the server's ``fd`` (/dev/null where it has none)."""
    try:
        return os.dup(fd)
    except OSError:
        return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)


def run_python(argv: list, cwd: str, code: types.CodeType | None, stdio: tuple) -> int:
    """Run argv[1] as ``python3 argv[1] argv[2:]`` would, in this (forked) interpreter;
    ``code`` is argv[1] compiled already (else runpy reads and compiles it), ``stdio`` the
    wrappers of fds 0-2 (see Stdio)."""
    script = argv[1]
    sys.argv = list(argv[1:])
    if sys.path[:1] != [cwd]:  # a server that preloaded the function's modules has it there
        sys.path.insert(0, cwd)
    if sys.stdout is not stdio[1]:  # the server's own are the run's already (Stdio)
        sys.stdin = sys.__stdin__ = stdio[0]
        sys.stdout = sys.__stdout__ = stdio[1]
        sys.stderr = sys.__stderr__ = stdio[2]
    status = 0
    try:
        if code is None and not os.path.isfile(script):
            # What python3 says, not runpy's traceback through this server's own files.
            print(f"python3: can't open file {os.path.abspath(script)!r}: "
                  "[Errno 2] No such file or directory", file=sys.stderr)
            return 2
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
        # Python's own display (C), as ``python3 main.py`` prints it, from the script's frame
        # on: the server keeps no traceback module (nor its linecache, tokenize, textwrap) in
        # the memory every fork copies. No frame of the script (it does not compile): no
        # traceback, only the error, as python3 shows a SyntaxError of its script.
        sys.__excepthook__(type(exc), exc.with_traceback(tb), None)
        status = 1
    # Not imported by the server (its fork hook costs every child ~0.4 ms): only a function
    # that imported it can have threads to wait for, as python waits at exit.
    threading = sys.modules.get("threading")
    if threading is not None:
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):  # as python's exit: each one, unless closed
        with contextlib.suppress(BaseException):
            if not stream.closed:
                stream.flush()
    return status


def exit_code_of(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1
