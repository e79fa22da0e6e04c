"""``json.dumps(default=json_default)``: numpy scalars and arrays, and paths, as JSON.

Imports nothing heavy: the worker uses it before it blocks SIGTERM, and numpy's import would start
thread pools that do not block it (``serving.worker``)."""
from __future__ import annotations

import sys
from pathlib import Path


def json_default(o):
    np = sys.modules.get("numpy")  # a numpy object can only exist once numpy was imported
    if np is not None:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
