"""One error hierarchy for the whole core (the CLI maps each class to an exit code), and the
one-line error for a missing optional extra (:func:`require_extra`)."""
from __future__ import annotations


class UNetSegmentError(Exception):
    """Base class. ``str(err)`` is one line naming the problem and the fix."""

    exit_code = 1

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)


class UsageError(UNetSegmentError):
    exit_code = 2


class InputError(UNetSegmentError):
    exit_code = 3


class UnusualInputError(InputError):
    """The input does not look like what the model reads (another modality or body part): refused
    unless the user runs anyway (``--allow-unusual-input``); ``seen`` is what the check saw."""

    def __init__(self, seen: str, fix: str):
        self.seen = seen
        super().__init__(seen, f"{fix}; or run anyway with --allow-unusual-input (every output is then marked)")


class ModelError(UNetSegmentError):
    exit_code = 4


class DeviceError(UNetSegmentError):
    exit_code = 5


class OutputError(UNetSegmentError):
    exit_code = 6


class CancelledError(UNetSegmentError):
    exit_code = 130


# --------------------------------------------------------------------------------------------
# Optional dependency groups (the pyproject.toml extras)
# --------------------------------------------------------------------------------------------
# The core install (segment, demo, models, evaluate, the Slicer module) needs none of them: they are
# imported lazily inside the commands that use them, and each such command calls require_extra()
# first, so a lean install says which extra to add instead of a ModuleNotFoundError deep inside.

#: extra → the modules (import names) its commands import
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("yaml", "nilearn"),
    "batch": ("dask", "distributed"),
    "serve": ("fastapi", "uvicorn", "python_multipart"),
}
#: import name → the distribution that provides it, where they differ
_DISTRIBUTION = {"yaml": "pyyaml", "python_multipart": "python-multipart"}


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent failed to import, or sys.modules[name] is None
        return False


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (empty when the extra is installed)."""
    return [m for m in EXTRAS[extra] if not _installed(m)]


def require_extra(extra: str, command: str) -> None:
    """Raise :class:`UsageError` (exit 2) naming ``pip install 'unetsegment[EXTRA]'`` when ``extra`` is missing."""
    missing = missing_modules(extra)
    if missing:
        names = ", ".join(_DISTRIBUTION.get(m, m) for m in missing)
        raise UsageError(f"{command} needs the optional '{extra}' dependencies ({names} not installed)",
                         f"pip install 'unetsegment[{extra}]'")
