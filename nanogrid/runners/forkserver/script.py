"""The function's script, compiled once per sandbox instead of once per call.

A sandbox serves one function@version, so its ``main.py`` does not change: the server
compiles it once (in the timed window of the call that first runs it) and each later fork
executes that code object, as ``python3 main.py`` would: a ``__main__`` module with
``__file__``, ``sys.argv[0]`` and tracebacks naming the script. The file's size, mtime and
inode are checked on every call, so code put in anew is compiled anew. Whatever this does not
handle exactly as python does is left to runpy in the child: a script that does not compile
(its SyntaxError is the call's to report), one whose compiling shows a warning (the warning
is the call's stderr; what python3 would not show under its default filters, such as the
DeprecationWarning of an invalid escape sequence, does not count), or one that is not
source (a zip or a pyc named main.py). runpy's lazy imports (pkgutil, typing: ~4 ms) are
not kept in the server, whose every fork maps them: such a script's first call pays them,
later ones find them preloaded with the function's own imports (preload.py).
"""

import os
import sys
import types
import warnings


class Scripts:
    """Compiled scripts of this server, by path."""

    def __init__(self) -> None:
        self._compiled: dict[str, tuple[tuple[int, int, int], types.CodeType | None]] = {}
        self._server_main = sys.modules.get("__main__")
        """Held: a run replaces ``__main__``, and freeing the server's would copy pages in
        every child."""

    def code_for(self, cwd: str, script: str) -> types.CodeType | None:
        """The compiled ``script`` (relative to ``cwd``), or None: run it with runpy."""
        path = os.path.join(cwd, script)
        try:
            st = os.stat(path)
        except OSError:
            return None
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        known = self._compiled.get(path)
        if known is not None and known[0] == stamp:
            return known[1]
        self._compiled[path] = (stamp, compiled(path, script))
        return self._compiled[path][1]


def compiled(path: str, script: str) -> types.CodeType | None:
    try:
        with open(path, "rb") as f:
            source = f.read()
        with warnings.catch_warnings(record=True) as warned:  # those python would show
            code = compile(source, script, "exec", dont_inherit=True)
    except (OSError, SyntaxError, ValueError):
        return None
    return None if warned else code


def run_compiled(code: types.CodeType, script: str) -> None:
    """Execute ``code`` as the ``__main__`` module of ``script``."""
    main = types.ModuleType("__main__")
    main.__dict__.update(
        __file__=script, __cached__=None, __loader__=None, __package__="", __spec__=None
    )
    sys.modules["__main__"] = main
    exec(code, main.__dict__)
