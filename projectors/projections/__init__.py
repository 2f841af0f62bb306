"""The projections: one module each, defining a module-level `projection`.

Modules here are found by `discover()`; adding a projection is adding a module.
"""

import importlib
import pkgutil

from projectors.framework import Projection


def discover() -> list[Projection]:
    """Every projection defined in this package, by name."""
    found: dict[str, Projection] = {}
    for module_info in pkgutil.iter_modules(__path__):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        projection = getattr(module, "projection", None)
        if not isinstance(projection, Projection):
            continue
        if projection.name in found:
            raise ValueError(f"two projections are called {projection.name}")
        found[projection.name] = projection
    return [found[name] for name in sorted(found)]
