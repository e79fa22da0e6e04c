"""A plain-Python signal (Qt-like connect/emit): signals defined in Python with ``qt.Signal`` crash Slicer."""
from __future__ import annotations

from itertools import count
from typing import Callable


class Signal:
    def __init__(self, *type_info: str) -> None:
        self._ids = count()
        self._slots: dict[int, Callable] = {}
        self._blocked = False
        self.type_info = type_info

    def connect(self, slot: Callable) -> int:
        if not callable(slot):
            raise TypeError("slot must be callable")
        i = next(self._ids)
        self._slots[i] = slot
        return i

    def disconnect(self, connection_id: int) -> bool:
        return self._slots.pop(connection_id, None) is not None

    def disconnect_all(self) -> None:
        self._slots.clear()

    def block(self, blocked: bool) -> None:
        self._blocked = blocked

    def emit(self, *args, **kwargs) -> None:
        if self._blocked:
            return
        for slot in list(self._slots.values()):
            slot(*args, **kwargs)

    __call__ = emit
