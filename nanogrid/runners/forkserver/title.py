"""The server's process title, as ``ps`` and ``top`` show it: ``nanogrid: sandbox python
F@V SOCKET`` once it serves function F at code version V (the first 8 hex of its code key),
``nanogrid: sandbox python SOCKET`` while generic. Stdlib only (the server runs under
``-I -S``, without setproctitle): the kernel's short name by prctl(PR_SET_NAME), and the
command line by writing over the memory of the process's original argv, whose bounds
/proc/self/stat gives (setproctitle does the same; python copied argv at its start).
"""

import ctypes

PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)
_shown = None


def title_for(request: dict, socket_path: str) -> str:
    """The title of a server that serves ``request``'s function (generic before any)."""
    function = (request.get("env") or {}).get("NANOGRID_FUNCTION_ID")
    version = request.get("preload")
    what = f"{function}@{version[:8]} " if function and version else (
        f"{function} " if function else "")
    return f"nanogrid: sandbox python {what}{socket_path}"


def set_title(title: str) -> None:
    """Show this process as ``title`` (cut to what its original command line held)."""
    global _shown
    if title == _shown:
        return
    _shown = title
    data = title.encode("utf-8", "replace")
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(data[:15]), 0, 0, 0)
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48, 49)
    except (OSError, IndexError, ValueError):
        return
    if end - start < 2:
        return
    data = data[: end - start - 1]
    ctypes.memmove(start, data, len(data))
    ctypes.memset(start + len(data), 0, end - start - len(data))
