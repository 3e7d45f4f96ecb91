"""The lab: real services and synthetic data for tests and the demo.

`SambaDC` (a throwaway Samba AD DC), `EmbeddedPostgres`, the synthetic PKI (`certsync_lab.pki`) and the
seeded user population. Names are imported lazily so that using one part does not load the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EmbeddedPostgres": "certsync_lab.postgres",
    "SambaDC": "certsync_lab.samba",
    "SeedUser": "certsync_lab.population",
    "generate_population": "certsync_lab.population",
    "load_population": "certsync_lab.population",
    "load_population_offline": "certsync_lab.population",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'certsync_lab' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
