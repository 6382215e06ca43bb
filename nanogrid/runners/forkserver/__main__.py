"""``python3 -I -S <this directory> SOCKET [OPTIONS]`` (or ``--probe SETTINGS``): load the
server and run it.

Python puts this directory first on sys.path to find this file, even with ``-I``. It is
taken off again before anything else, and the server's modules are loaded from it as the
package ``_nanogrid_forkserver``, a name no function's module has: the functions forked from
this process search the same sys.path, and a function's own ``server.py`` or ``preload.py``
must be the one it imports. Once loaded, the server's modules leave sys.modules too (this
file keeps them): taken out here, once, rather than in every fork, they cost a run nothing.
"""

import importlib.util  # already loaded: python runs this file through runpy
import os
import sys
from types import ModuleType

PACKAGE = "_nanogrid_forkserver"
_LOADED: list[ModuleType] = []
"""The server's modules, held here once they are out of sys.modules."""


def load() -> ModuleType:
    """The server's module, imported from this directory as ``PACKAGE.server``."""
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path[:1] == [here]:
        del sys.path[0]
    spec = importlib.util.spec_from_file_location(
        PACKAGE, os.path.join(here, "__init__.py"), submodule_search_locations=[here]
    )
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
    server = importlib.import_module(f"{PACKAGE}.server")  # imports every other module
    for name in [name for name in sys.modules if name.partition(".")[0] == PACKAGE]:
        _LOADED.append(sys.modules.pop(name))
    return server


if __name__ == "__main__":
    sys.exit(load().main(sys.argv))
