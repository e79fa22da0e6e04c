"""The server's one error shape: ``{"error": problem, "fix": fix}`` with an HTTP status.

Every module of the server raises :class:`HTTPProblem`; the app (and the auth middleware, which
answers before the app) renders it with :func:`problem_response`.
"""
from __future__ import annotations


class HTTPProblem(Exception):
    """An answer ``{"error": problem, "fix": fix}`` with ``status``; ``drained``: the request body needs no more reading."""

    drained = False

    def __init__(self, status: int, problem: str, fix: str = "", headers: dict | None = None):
        super().__init__(problem)
        self.status, self.problem, self.fix, self.headers = status, problem, fix, headers or {}


def problem_response(status: int, problem: str, fix: str, headers: dict | None = None):
    """The JSON response of a problem (a Starlette ``JSONResponse``, usable by the app and by ASGI middleware)."""
    from starlette.responses import JSONResponse

    return JSONResponse({"error": problem, "fix": fix}, status_code=status, headers=headers)
