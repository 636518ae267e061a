"""Package exports loaded on first use (PEP 562 module `__getattr__`), so importing a package
does not import every module it re-exports.

    __all__, __getattr__, __dir__ = lazy_exports(__name__, globals(), {"module": ("name", ...)})
"""
from __future__ import annotations

import importlib
from typing import Callable, Mapping, Sequence


def lazy_exports(package: str, namespace: dict, exports: Mapping[str, Sequence[str]]
                 ) -> tuple[list[str], Callable[[str], object], Callable[[], list[str]]]:
    """`(__all__, __getattr__, __dir__)` for `package`: each name in `exports[module]` is read
    from `package.module` on first access and then cached in the package's `namespace`."""
    module_of = {name: module for module, names in exports.items() for name in names}
    public = sorted(module_of)

    def getattr_(name: str):
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(public))

    return public, getattr_, dir_
