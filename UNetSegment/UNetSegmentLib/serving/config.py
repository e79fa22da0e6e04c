"""What ``unetsegment serve`` is told: :class:`ServerConfig`, shared by the job manager, the upload
guards and the app."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..params import SegmentParams


@dataclass
class ServerConfig:
    """Everything the server needs; ``params`` are the defaults a job's fields override."""

    work_dir: Path | None = None
    token: str | None = None
    max_upload_bytes: int = 2 << 30
    max_queued: int = 32
    retention_s: float = 3600.0
    model: str | None = None
    params: SegmentParams = field(default_factory=SegmentParams)
    devices: tuple[str, ...] = ("auto",)
    cleanup_interval_s: float | None = None
    limit_concurrency: int = 512
    #: uploads read at the same time (503 beyond); they hold no queue slot until complete
    max_uploads: int = 64
    #: a request body must arrive within this time …
    upload_timeout_s: float = 3600.0
    #: … and, after ``upload_grace_s``, at this average rate or faster (bytes/s); else 408
    upload_min_rate: float = 16 << 10
    upload_grace_s: float = 30.0
    #: time spent reading (and dropping) a refused body so the client sees the answer
    drain_timeout_s: float = 5.0
