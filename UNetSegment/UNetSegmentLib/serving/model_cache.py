"""Models kept between the runs of a long-lived process (the warm worker, :mod:`.worker`'s ``--serve``).

:meth:`ModelCache.get` loads the bundle every time — cheap, and it checks the weights' sha256 — and
reuses the network built for that bundle folder and ``model.json`` (which holds the weights' sha256),
so a bundle whose weights or architecture changed on disk is built afresh. The few most recently used networks are kept.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any

from ..models.bundle import Bundle, default_model_name, load_bundle

#: networks kept (the most recently used); the bundled models are 2 M parameters (8 MB) each
MAX_MODELS = 3


class ModelCache:
    def __init__(self, max_models: int = MAX_MODELS) -> None:
        self.max_models = max_models
        self._networks: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.builds = 0  # networks built so far (the rest were reused)

    def get(self, model: str | None) -> tuple[Bundle, Any]:
        """The bundle named ``model`` (a name, folder or zip; None: the default) and its network (CPU, eval)."""
        bundle = load_bundle(model or default_model_name())
        key = (str(bundle.root), hashlib.sha256(json.dumps(bundle.meta, sort_keys=True, default=str).encode()).hexdigest())
        if key in self._networks:
            self._networks.move_to_end(key)
        else:
            self._networks[key] = bundle.build_network()
            self.builds += 1
            while len(self._networks) > self.max_models:
                self._networks.popitem(last=False)
        return bundle, self._networks[key]
