"""The idle process inside every sandbox: forks a function run on request.

Paying interpreter start-up once per sandbox instead of once per call is what makes a warm
invocation cost a fork (about a millisecond) instead of a ``docker exec`` or a fresh
``python3`` (tens of milliseconds).

The agent never imports it: this directory is run as a program, ``python3 -I -S
<this directory> SOCKET [OPTIONS]`` (see ``__main__``), bind-mounted read-only into Docker
containers or started on the host by the process runner. So it is stdlib only, and its
modules import each other relatively and import everything at the top: after dropping root
the sandbox's uid may not be able to read this directory or the stdlib of the interpreter
that started it (a pyenv in /root).

    server.py   its start (the sandbox's set-up, then serving) and the protocol
    child.py    the forked child of one run: becomes the function
    preload.py  import-warm: holds a function's imports after vetting them
    sandbox.py  namespaces, mounts, cgroups, rlimits, uid; an exec'd server; --probe
    reaping.py  ending what a run leaves behind
    sysvipc.py  removing the SysV objects a run leaves in the sandbox's IPC namespace
"""
