"""Backends: one module or package each (sdpa, triton, cupy).

`flashdispatch.backends` is both this package and the public call `flashdispatch.backends()`
(the API the design fixes): the module's class gets a `__call__`, so neither shadows the other.
"""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self):  # type: ignore[no-untyped-def]
        """Every registered implementation, whether it is available here, and if not, why."""
        from flashdispatch.registry import REGISTRY

        return REGISTRY.status()


sys.modules[__name__].__class__ = _CallableModule
