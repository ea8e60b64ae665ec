"""Old module names that still import, with a DeprecationWarning, after their modules moved.

`import peftkit.adapted` gives the very module `peftkit.core.adapted` (one module object, so its
classes and state are shared), and warns once per old name. Remove an entry a release after its move.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED = {
    "peftkit.adapted": "peftkit.core.adapted",
    "peftkit.adapter_checks": "peftkit.core.checks",
    "peftkit.inject": "peftkit.core.inject",
    "peftkit.layer_types": "peftkit.core.layer_types",
    "peftkit.prefix": "peftkit.core.kv_prefix",
    "peftkit.routing": "peftkit.core.rows",
    "peftkit.saved_modules": "peftkit.core.saved_modules",
    "peftkit.weights": "peftkit.core.weights",
    "peftkit.combine": "peftkit.tools.combine",
    "peftkit.info": "peftkit.tools.info",
    "peftkit.merge": "peftkit.tools.merge",
    "peftkit.serve.routing": "peftkit.serve.routes",
    "peftkit.argparsing": "peftkit.cli.argparsing",
    "peftkit.demo": "peftkit.cli.demo",
    "peftkit.tour": "peftkit.cli.tour",
}
"""Old module name -> where it lives now."""


class _OldName(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        self._spec = module.__spec__  # the import system sets __spec__ to the old name's; put it back
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec


def install() -> None:
    """Let the old names import (idempotent)."""
    if not any(isinstance(finder, _OldName) for finder in sys.meta_path):
        sys.meta_path.append(_OldName())
