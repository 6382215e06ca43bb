"""``python3 -I -S <this directory> SOCKET [OPTIONS]`` (or ``--probe SETTINGS``): load the
server and run it.

Python puts this directory first on sys.path to find this file, even with ``-I``. It is
taken off again before anything else, and the server's modules are loaded from it as the
package ``_nanogrid_forkserver``, a name no function's module has: the functions forked from
this process search the same sys.path, and a function's own ``server.py`` or ``preload.py``
must be the one it imports (child.forget_server also drops the server's modules from
sys.modules before a run).
"""

import importlib.util  # already loaded: python runs this file through runpy
import os
import sys
from types import ModuleType

PACKAGE = "_nanogrid_forkserver"


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
    return importlib.import_module(f"{PACKAGE}.server")


if __name__ == "__main__":
    sys.exit(load().main(sys.argv))
