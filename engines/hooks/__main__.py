"""``python engines/hooks --install`` (or the same folder copied anywhere): the standalone install, nothing else needed.

Run as a folder this file is ``__main__`` outside any package, so it first loads the folder as a package under a
private name (the relative imports between the hook's modules then work) and drops the folder from ``sys.path``.
``python -m engines.hooks`` works too.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

if __package__:
    from .install import standalone_main
else:
    _here = Path(__file__).resolve().parent
    if sys.path and Path(sys.path[0] or ".").resolve() == _here:
        del sys.path[0]
    _name = "_prefixgate_hook_installer"
    _init = _here / "__init__.py"
    _spec = importlib.util.spec_from_file_location(_name, _init, submodule_search_locations=[str(_here)])
    assert _spec is not None and _spec.loader is not None
    _package = importlib.util.module_from_spec(_spec)
    sys.modules[_name] = _package
    _spec.loader.exec_module(_package)
    standalone_main = importlib.import_module(f"{_name}.install").standalone_main

sys.exit(standalone_main())
