"""One error hierarchy for the whole core; the CLI maps each class to an exit code."""
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


class ModelError(UNetSegmentError):
    exit_code = 4


class DeviceError(UNetSegmentError):
    exit_code = 5


class OutputError(UNetSegmentError):
    exit_code = 6


class CancelledError(UNetSegmentError):
    exit_code = 130
