"""Inference server: ``unetsegment serve`` (FastAPI + uvicorn) in front of the same ``segment`` core.

Endpoints (JSON; errors are ``{"error": problem, "fix": fix}``):

* ``GET /health`` — status, version, the devices inference runs on (``cuda:0`` and its name, or
  ``cpu``), queued/running jobs, uploads in progress and the server's limits.
* ``GET /openapi.json``, ``GET /docs`` — the OpenAPI schema and its browsable page (token required).
* ``GET /models`` — models clients may name, and the default.
* ``POST /jobs`` — ``multipart/form-data``: one file per model channel, as a field named after the
  channel (``CT``, ``CBF`` …) or as repeated ``input`` fields in the bundle's channel order; files
  are NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``), MHA (``.mha``) or a ``.zip`` of one DICOM
  series. Other fields are run parameters named like the ``segment`` flags (``model``,
  ``threshold``, ``min-lesion-ml`` or ``min_lesion_ml``, ``heatmap``, ``tta`` …), parsed by the
  same argparse definitions; ``device`` and ``threads`` belong to the server. → ``202 {"id", …}``.
* ``GET /jobs/{id}`` — ``status`` (queued, running, done, failed, cancelled), ``stage``, ``stages`` (every
  stage the job has been through, in order), ``fraction``, ``message``, ``error``, ``queue_position``,
  and when done ``files``, ``n_lesions``, ``total_volume_ml``.
* ``GET /jobs/{id}/files/{name}`` — one file of the ``segment`` file set (only those names), as
  ``text/csv``, ``image/png``, ``application/json`` … by its kind.
* ``DELETE /jobs/{id}`` — cancels a queued or running job (the run stops between windows) or
  deletes a finished one; its files are removed.

Design: uploads are streamed to disk under a byte cap (413), a deadline for the whole body and a
minimum rate after a grace period (408: a stalled or trickling client is cut off); a queue slot is
taken only once an upload is complete, and a bounded queue (429 when full) feeds one inference
thread per device, each running :func:`.job.segment_files` with a :class:`.inference.CancelToken`;
a cleanup thread removes finished jobs after the retention time.

Storage: without ``--work-dir`` the server works in a per-process folder under
``$XDG_CACHE_HOME/unetsegment/server`` (``~/.cache/…``) holding ``server.lock``, an advisory lock
(``flock``) held for the server's life with its pid inside; on start, folders whose lock nobody
holds (a killed server) are removed with their uploads. Folders are 0700 and uploads 0600: the
scans are patient data. Errors and the served ``summary.json`` never show server-side paths.
With a token file every request must carry ``Authorization: Bearer TOKEN`` (compared in constant
time). The server binds to 127.0.0.1 unless told otherwise, and refuses other addresses without a
token. Client file names never reach the file system: uploads are stored as ``inputN.<suffix>``.
"""

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import queue
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

try:
    import fcntl
except ImportError:  # Windows: no flock; stale folders of killed servers are then left for the admin
    fcntl = None  # type: ignore[assignment]

from .. import __version__
from ..errors import CancelledError, InputError, ModelError, UNetSegmentError, UsageError
from ..engine.inference import CancelToken
from ..io.outputs import CONTRACT_FILES
from ..params import SegmentParams

#: suffixes accepted for uploads (detached headers like .nhdr/.mhd cannot come as one file)
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".zip")
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_POSITIONAL_FIELDS = ("input", "inputs", "file", "files")
#: bytes of a refused body still read (so the client sees the 413 rather than a reset connection)
DRAIN_LIMIT = 16 << 20
MAX_FORM_PARTS = 64
MAX_FIELD_BYTES = 4096
MAX_ZIP_MEMBERS = 20000
LOOPBACK = ("127.0.0.1", "::1", "localhost")
#: the advisory lock file a live server holds in its work folder
LOCK_NAME = "server.lock"
#: prefix of the per-process work folders under :func:`server_cache_root`
WORK_PREFIX = "srv-"
#: a lock-less work folder younger than this may belong to a server that is starting
STARTING_GRACE_S = 60.0
#: media types of the served files (the rest are application/octet-stream)
MEDIA_TYPES = {".csv": "text/csv; charset=utf-8", ".tsv": "text/tab-separated-values; charset=utf-8", ".png": "image/png",
               ".json": "application/json", ".dcm": "application/dicom"}
_ABS_PATH = re.compile(r"(?<![\w.~-])(?:[A-Za-z]:\\|/)(?:[^\s'\"/\\:]+[/\\])+([^\s'\"/\\:]*)")
log = logging.getLogger("unetsegment.server")


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


class HTTPProblem(Exception):
    """An answer ``{"error": problem, "fix": fix}`` with ``status``; ``drained``: the request body needs no more reading."""

    drained = False

    def __init__(self, status: int, problem: str, fix: str = "", headers: dict | None = None):
        super().__init__(problem)
        self.status, self.problem, self.fix, self.headers = status, problem, fix, headers or {}


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------
@dataclass
class Job:
    id: str
    dir: Path
    model: str
    params: SegmentParams
    inputs: list[Path]
    channels: list[str]
    #: the client's file name of each input (what the served summary.json shows instead of server paths)
    client_names: list[str] = field(default_factory=list)
    status: str = "queued"
    stage: str = ""
    #: every stage the job went through, in order (a poller may miss short ones; this does not)
    stages: list[str] = field(default_factory=list)
    fraction: float = 0.0
    message: str = ""
    error: str = ""
    error_type: str = ""
    device: str = ""
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    files: list[str] = field(default_factory=list)
    result: dict = field(default_factory=dict)
    cancel: CancelToken = field(default_factory=CancelToken)
    deleted: bool = False

    @property
    def out_dir(self) -> Path:
        return self.dir / "out"

    def public(self, queue_position: int | None) -> dict:
        d = {"id": self.id, "status": self.status, "stage": self.stage, "stages": list(self.stages), "fraction": round(self.fraction, 4),
             "message": self.message, "error": self.error, "error_type": self.error_type, "model": self.model,
             "channels": self.channels, "device": self.device, "created": self.created, "started": self.started,
             "finished": self.finished, "queue_position": queue_position}
        if self.status == "done":
            d["files"] = list(self.files)
            d.update(self.result)
        return d


# --------------------------------------------------------------------------------------------
# The work folder: owned, locked, private
# --------------------------------------------------------------------------------------------
def server_cache_root() -> Path:
    """Parent of the servers' own work folders: ``$XDG_CACHE_HOME/unetsegment/server`` (``~/.cache/…``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "unetsegment" / "server"


class DirLock:
    """``flock`` on ``DIR/server.lock`` (with the pid inside, for people): held while the server lives,
    released by the kernel when it dies however it dies — unlike a pid, which can be reused."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> bool:
        """True when this process now holds the lock; False when another live process does."""
        if fcntl is None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _private_dir(path: Path) -> Path:
    """``path`` created as 0700 (patient data inside); an existing folder is left as it is."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def remove_stale_work_dirs(root: Path) -> list[Path]:
    """Remove the work folders under ``root`` whose server is gone (nobody holds their lock); returns them."""
    removed = []
    if fcntl is None or not root.is_dir():
        return removed
    for d in root.iterdir():
        if not d.name.startswith(WORK_PREFIX) or not d.is_dir() or d.is_symlink():
            continue
        lock = DirLock(d)
        if not lock.path.exists():  # a server between creating its folder and locking it, or killed right there
            try:
                if time.time() - d.stat().st_mtime < STARTING_GRACE_S:
                    continue
            except OSError:
                continue
        try:
            if not lock.acquire():
                continue  # a live server
        except OSError:
            continue
        try:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        finally:
            lock.release()
    return removed


def _claim_work_dir(given: Path | None) -> tuple[Path, DirLock, bool]:
    """(work folder, its held lock, whether the server owns it and removes it at the end)."""
    if given is None:
        root = _private_dir(server_cache_root())
        removed = remove_stale_work_dirs(root)
        if removed:
            log.warning("removed %d work folder(s) of servers that are gone (with their uploads) in %s", len(removed), root)
        d = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=root))  # 0700
        lock = DirLock(d)
        lock.acquire()
        return d, lock, True
    d = Path(given)
    if d.exists() and not d.is_dir():
        raise UsageError(f"work folder {d} exists and is not a folder", "give a folder path for --work-dir")
    try:
        _private_dir(d)
    except OSError as e:
        raise UsageError(f"cannot create the work folder {d}: {e.strerror}", "give a writable --work-dir") from None
    lock = DirLock(d)
    try:
        held = lock.acquire()
    except OSError as e:
        raise UsageError(f"cannot lock the work folder {d}: {e.strerror}", "give a writable --work-dir") from None
    if not held:
        raise UsageError(f"another unetsegment server uses the work folder {d}",
                         "give each server its own --work-dir, or leave it out (each server then gets its own)")
    return d, lock, False


class JobManager:
    """Bounded queue + one inference thread per device + a retention cleanup thread."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.work_dir, self._dir_lock, self._own_work_dir = _claim_work_dir(Path(cfg.work_dir) if cfg.work_dir else None)
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.queue: queue.Queue[str] = queue.Queue()
        self._uploading = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._bundles: dict[str, Any] = {}
        self._devices: list[dict] | None = None
        self._hardware: dict | None = None
        #: called with (job, stage) when a job starts ("started") and at every progress report, on its
        #: inference thread; for metrics, embedding, and tests that must hold a job at a known point
        self.on_stage: Callable[[Job, str], None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._remove_stale_dirs()
        self.devices(), self.hardware()  # torch's device probe once, not inside a request
        try:
            self.bundle(self.default_model())  # load and verify once, not in the first request
        except (UNetSegmentError, HTTPProblem):
            pass  # reported per request
        for dev in self.cfg.devices:
            t = threading.Thread(target=self._worker, args=(dev,), name=f"unetsegment-infer-{dev}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._cleaner, name="unetsegment-cleanup", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        with self.lock:
            for j in self.jobs.values():
                j.cancel.cancel()
        for t in self._threads:
            t.join(timeout=30)
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        self._dir_lock.release()

    def _remove_stale_dirs(self) -> None:
        """Job folders left by an earlier server in a given --work-dir."""
        for p in self.work_dir.iterdir():
            if _JOB_ID.match(p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    # --- models ------------------------------------------------------------------------------
    def bundle(self, name: str):
        """A loaded bundle by model name (clients may only name models; the server's --model may be a path)."""
        from ..models.bundle import available_models, load_bundle

        allowed = dict(available_models())
        default = self.default_model()
        if name == default or name in allowed:
            path = str(allowed.get(name, name))
        else:
            known = ", ".join(sorted(set(allowed) | {default}))
            raise HTTPProblem(400, f"unknown model {name!r}", f"use one of: {known} (GET /models)")
        key = f"{path}:{_mtime(Path(path) / 'model.json')}"
        b = self._bundles.get(key)
        if b is None:
            try:
                b = load_bundle(path)
            except ModelError as e:
                raise HTTPProblem(500, f"model {name} cannot be loaded on the server: {e.problem}", e.fix or "") from None
            self._bundles[key] = b
        return b

    def default_model(self) -> str:
        from ..models.bundle import default_model_name

        return self.cfg.model or default_model_name()

    # --- queue -------------------------------------------------------------------------------
    def new_job_dir(self) -> tuple[str, Path]:
        """A fresh job folder (0700) with its private ``inputs`` and ``out`` folders."""
        jid = secrets.token_hex(16)
        d = self.work_dir / jid
        d.mkdir(mode=0o700)
        (d / "inputs").mkdir(mode=0o700)
        (d / "out").mkdir(mode=0o700)
        return jid, d

    def _queue_full(self) -> HTTPProblem | None:
        waiting = sum(j.status == "queued" for j in self.jobs.values())
        if waiting >= self.cfg.max_queued:
            return HTTPProblem(429, f"the server has {waiting} jobs waiting (limit {self.cfg.max_queued})",
                               "retry later (see Retry-After)", {"Retry-After": "30"})
        return None

    def check_room(self) -> None:
        """Refuse before reading an upload when the queue is full now (no slot is held: see :meth:`enqueue`)."""
        with self.lock:
            problem = self._queue_full()
        if problem is not None:
            raise problem

    def begin_upload(self) -> None:
        """Count an upload in progress; 503 when ``max_uploads`` are already being read."""
        with self.lock:
            if self._uploading >= self.cfg.max_uploads:
                raise HTTPProblem(503, f"the server is receiving {self._uploading} uploads (limit {self.cfg.max_uploads})",
                                  "retry later (see Retry-After)", {"Retry-After": "10"})
            self._uploading += 1

    def end_upload(self) -> None:
        with self.lock:
            self._uploading -= 1

    def enqueue(self, job: Job) -> int:
        """Take a queue slot for a completely received job (429 when the queue filled meanwhile)."""
        with self.lock:
            problem = self._queue_full()
            if problem is None:
                self.jobs[job.id] = job
                pos = self._position(job)
        if problem is not None:
            raise problem
        self.queue.put(job.id)
        return pos

    def _position(self, job: Job) -> int | None:
        if job.status != "queued":
            return None
        return sum(1 for j in self.jobs.values() if j.status == "queued" and j.created < job.created)

    def get(self, jid: str) -> Job:
        with self.lock:
            job = self.jobs.get(jid) if _JOB_ID.match(jid or "") else None
        if job is None or job.deleted:
            raise HTTPProblem(404, f"no job {jid[:40]!r}", "it finished more than the retention time ago, was deleted, or never existed")
        return job

    def describe(self, job: Job) -> dict:
        with self.lock:
            return job.public(self._position(job))

    def delete(self, jid: str) -> dict:
        job = self.get(jid)
        with self.lock:
            if job.status in ("queued", "running"):
                job.cancel.cancel()
                if job.status == "queued":  # never started: gone now
                    job.status, job.finished, job.message = "cancelled", time.time(), "cancelled before it started"
                    shutil.rmtree(job.dir, ignore_errors=True)
                return {"id": jid, "status": "cancelled"}
            job.deleted = True
            self.jobs.pop(jid, None)
        shutil.rmtree(job.dir, ignore_errors=True)
        return {"id": jid, "status": "deleted"}

    def counts(self) -> dict:
        """Jobs by status, and ``uploading``: uploads being received."""
        with self.lock:
            c: dict[str, int] = {"uploading": self._uploading}
            for j in self.jobs.values():
                c[j.status] = c.get(j.status, 0) + 1
        return c

    def hardware(self) -> dict:
        """``{"cuda_available", "gpus"}`` of this machine (see :func:`cuda_report`)."""
        if self._hardware is None:
            self._hardware = cuda_report()
        return self._hardware

    def devices(self) -> list[dict]:
        """What each inference thread really runs on: ``{"worker", "device", "name"}`` (``cpu`` without CUDA)."""
        if self._devices is None:
            self._devices = [describe_device(d) for d in self.cfg.devices]
        return self._devices

    def redact(self, text: str, job: Job | None = None) -> str:
        """``text`` without server-side paths: job files by their own names, bundles by model name, the rest by base name."""
        pairs = []
        if job is not None:
            pairs += [(str(job.dir / "inputs") + os.sep, ""), (str(job.dir) + os.sep, ""), (str(job.dir), "job folder")]
        pairs += [(str(b.root), b.name) for b in list(self._bundles.values())]
        pairs.append((str(self.work_dir), "work folder"))
        for old, new in sorted(pairs, key=lambda p: -len(p[0])):
            text = text.replace(old, new)
        return _ABS_PATH.sub(lambda m: m.group(1) or "…", text)

    # --- threads -----------------------------------------------------------------------------
    def _worker(self, device: str) -> None:
        from .job import segment_files

        while not self._stop.is_set():
            try:
                jid = self.queue.get(timeout=0.25)
            except queue.Empty:
                continue
            with self.lock:
                job = self.jobs.get(jid)
                if job is None or job.status != "queued":
                    continue
                job.status, job.started, job.device = "running", time.time(), device

            def progress(stage: str, fraction: float, message: str = "", job=job) -> None:
                job.stage, job.fraction, job.message = stage, float(fraction), message
                if not job.stages or job.stages[-1] != stage:
                    job.stages.append(stage)
                if self.on_stage is not None:
                    self.on_stage(job, stage)

            status, error, etype = "failed", "", ""
            try:
                if self.on_stage is not None:
                    self.on_stage(job, "started")
                job.cancel.check()
                summary = segment_files([str(p) for p in job.inputs], job.out_dir, job.model,
                                        dataclasses.replace(job.params, device=device), overwrite=False, progress=progress,
                                        cancel=job.cancel)
                self._publishable_summary(job)
                job.files = [f for f in CONTRACT_FILES if (job.out_dir / f).is_file()]
                job.result = {"n_lesions": int(summary["n_lesions"]), "total_volume_ml": float(summary["total_volume_ml"]),
                              "warnings": list(summary.get("warnings", [])), "timings_s": summary.get("timings_s", {})}
                status = "done"
            except CancelledError:
                status = "cancelled"
            except UNetSegmentError as e:
                error, etype = self.redact(str(e), job), type(e).__name__
            except Exception as e:  # noqa: BLE001 - a job's crash must not kill the worker
                log.exception("job %s failed", job.id)
                error, etype = self.redact(f"internal error: {type(e).__name__}: {e}", job), "InternalError"
            finally:
                shutil.rmtree(job.dir / "inputs", ignore_errors=True)
                if job.cancel.cancelled:  # DELETE or shutdown while it ran: its files go, even if it just finished
                    status, error, etype = "cancelled", "", ""
                with self.lock:
                    job.status, job.error, job.error_type, job.finished = status, error, etype, time.time()
                    if status == "done":
                        job.stage, job.fraction = "done", 1.0
                    remove = status == "cancelled" or job.deleted
                if remove:
                    shutil.rmtree(job.dir, ignore_errors=True)

    def _publishable_summary(self, job: Job) -> None:
        """Rewrite the job's summary.json for its client: inputs by the client's file names, the model by
        name, no other server path (the local ``segment`` records real paths; they mean nothing remotely)."""
        path = job.out_dir / "summary.json"
        summary = json.loads(path.read_text(encoding="utf-8"))
        for i, entry in enumerate(summary.get("inputs", [])):
            entry["path"] = job.client_names[i] if i < len(job.client_names) else Path(entry.get("path", "")).name
        if isinstance(summary.get("model"), dict):
            summary["model"]["path"] = summary["model"].get("name", "")

        def clean(v):
            if isinstance(v, str):
                return self.redact(v, job)
            if isinstance(v, list):
                return [clean(x) for x in v]
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v

        from ..io.writers import write_json

        write_json(clean(summary), path)

    def _cleaner(self) -> None:
        interval = self.cfg.cleanup_interval_s or max(0.5, min(60.0, self.cfg.retention_s / 4))
        while not self._stop.wait(interval):
            self.cleanup()

    def cleanup(self, now: float | None = None) -> int:
        """Remove finished jobs older than the retention time; returns how many."""
        now = now or time.time()
        with self.lock:
            old = [j for j in self.jobs.values() if j.finished is not None and now - j.finished >= self.cfg.retention_s]
            for j in old:
                self.jobs.pop(j.id, None)
        for j in old:
            shutil.rmtree(j.dir, ignore_errors=True)
        return len(old)


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _prepare_input(p: Path, max_bytes: int, label: str | None = None) -> Path:
    """Uploaded file → readable input: a .zip becomes its DICOM series folder (extracted safely, 0600
    files in 0700 folders). ``label`` names the upload in errors (the client's file name)."""
    if p.suffix.lower() != ".zip":
        return p
    name = label or p.name
    dest = p.with_suffix("")
    fix = "upload a .zip of one DICOM series folder"
    try:
        with zipfile.ZipFile(p) as z:
            members = [m for m in z.infolist() if not m.is_dir()]
            if not members:
                raise InputError(f"{name} is an empty zip (no files in it)", fix)
            if len(members) > MAX_ZIP_MEMBERS:
                raise InputError(f"{name}: the zip holds {len(members)} files (limit {MAX_ZIP_MEMBERS})", "zip one DICOM series")
            if sum(m.file_size for m in members) > max_bytes:
                raise InputError(f"{name}: the zip unpacks to more than {max_bytes} bytes", "zip one DICOM series")
            _private_dir(dest)
            root = dest.resolve()
            written = 0
            for m in members:
                parts = Path(m.filename.replace("\\", "/")).parts
                if m.filename.startswith(("/", "\\")) or ".." in parts or not parts or ":" in parts[0]:
                    raise InputError(f"{name} holds an unsafe path {m.filename[:80]!r}", "zip the series folder's files only")
                target = (dest / Path(*parts)).resolve()
                if root not in target.parents:
                    raise InputError(f"{name} holds an unsafe path {m.filename[:80]!r}", "zip the series folder's files only")
                try:
                    for d in reversed([q for q in target.parents if root in q.parents]):
                        d.mkdir(mode=0o700, exist_ok=True)
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except OSError:  # a name that is a file and a folder, or a file twice
                    raise InputError(f"{name} holds {m.filename[:80]!r} twice or as both a file and a folder",
                                     "zip one DICOM series folder as it is on disk") from None
                with z.open(m) as src, os.fdopen(fd, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise InputError(f"{name} unpacks to more than {max_bytes} bytes", "zip one DICOM series")
                        dst.write(chunk)
    except zipfile.BadZipFile as e:
        raise InputError(f"{name} is not a valid zip ({e})", fix) from None
    except (zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, zlib.error) as e:  # encrypted, odd compression, corrupt data
        raise InputError(f"{name} cannot be unpacked ({type(e).__name__}: {e})", fix + " (plain deflate, no password)") from None
    p.unlink(missing_ok=True)
    folder = dest
    while True:  # descend through single wrapper folders (series/…)
        entries = [e for e in folder.iterdir() if not e.name.startswith((".", "__MACOSX"))]
        if not entries:
            raise InputError(f"{name} holds only hidden or system files", fix)
        if len(entries) == 1 and entries[0].is_dir():
            folder = entries[0]
        else:
            return folder


# --------------------------------------------------------------------------------------------
# Uploads
# --------------------------------------------------------------------------------------------
def _upload_suffix(filename: str) -> str | None:
    low = filename.lower()
    for s in UPLOAD_SUFFIXES:
        if low.endswith(s):
            return s
    return None


class _MultipartSink:
    """python-multipart callbacks: file parts go straight to ``folder/inputN.<suffix>``, fields to memory."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: list[tuple[str, Path, str]] = []  # (field name, stored path, client file name)
        self.fields: list[tuple[str, str]] = []
        self._hname = bytearray()
        self._hvalue = bytearray()
        self._headers: dict[str, bytes] = {}
        self._fh = None
        self._value = bytearray()
        self._cur: tuple[str, str | None] | None = None
        self._size = 0
        self.parts = 0

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._begin, "on_header_field": self._hf, "on_header_value": self._hv,
            "on_header_end": self._hend, "on_headers_finished": self._hdone, "on_part_data": self._data,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_FORM_PARTS:
            raise HTTPProblem(400, f"too many form parts (limit {MAX_FORM_PARTS})", "send one file per channel and the parameters")
        self._headers, self._cur, self._value, self._size = {}, None, bytearray(), 0

    def _hf(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def _hv(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _hend(self) -> None:
        self._headers[bytes(self._hname).decode("latin-1").lower()] = bytes(self._hvalue)
        self._hname, self._hvalue = bytearray(), bytearray()

    def _hdone(self) -> None:
        from python_multipart.multipart import parse_options_header

        disp, opts = parse_options_header(self._headers.get("content-disposition", b""))
        name = opts.get(b"name")
        if disp != b"form-data" or name is None:
            raise HTTPProblem(400, "a form part has no name", "send multipart/form-data with named fields")
        fname = opts.get(b"filename")
        self._cur = (name.decode("utf-8", "replace"), None if fname is None else fname.decode("utf-8", "replace"))
        if fname is not None:
            client_name = self._cur[1] or ""
            suffix = _upload_suffix(client_name)
            if suffix is None:
                raise HTTPProblem(400, f"upload {client_name[:80]!r} ({self._cur[0]}) is not a supported file type",
                                  "upload NIfTI (.nii, .nii.gz), NRRD (.nrrd), MHA (.mha) or a .zip of one DICOM series")
            path = self.folder / f"input{len(self.files)}{suffix}"
            self._fh = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")  # patient data
            self.files.append((self._cur[0], path, client_name))

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._fh is not None:
            self._fh.write(data[start:end])
            self._size += end - start
            return
        self._value += data[start:end]
        if len(self._value) > MAX_FIELD_BYTES:
            raise HTTPProblem(400, f"form field {self._cur[0] if self._cur else ''!r} is longer than {MAX_FIELD_BYTES} bytes",
                              "send parameters as short text values")

    def _end(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            if self._size == 0:
                raise HTTPProblem(400, f"upload {self.files[-1][2][:80]!r} ({self.files[-1][0]}) is empty", "send the volume's bytes")
        elif self._cur is not None:
            self.fields.append((self._cur[0], self._value.decode("utf-8", "replace")))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class UploadTooSlow(HTTPProblem):
    """408: the body did not arrive in time; the connection is closed, nothing more is read."""

    drained = True


async def body_chunks(request, cfg: ServerConfig):
    """``request.stream()`` under the body deadline: the whole body within ``upload_timeout_s``, and after
    ``upload_grace_s`` at least ``upload_min_rate`` bytes/s on average — a stalled or trickling client
    (slow loris) is cut off with :class:`UploadTooSlow` instead of holding the server."""
    it = request.stream().__aiter__()
    t0 = time.monotonic()
    n = 0
    while True:
        by_rate = n / cfg.upload_min_rate if cfg.upload_min_rate > 0 else float("inf")
        deadline = t0 + min(cfg.upload_timeout_s, max(cfg.upload_grace_s, by_rate))
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(it.__anext__(), timeout=left)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            elapsed = time.monotonic() - t0
            if elapsed >= cfg.upload_timeout_s:
                problem = f"upload not complete after {elapsed:.0f} s (limit {cfg.upload_timeout_s:.0f} s)"
            else:
                problem = (f"upload too slow: {n} bytes in {elapsed:.1f} s (the server needs at least "
                           f"{cfg.upload_min_rate / 1024:.0f} KiB/s after the first {cfg.upload_grace_s:.0f} s)")
            raise UploadTooSlow(408, problem, "send the whole request at once over a faster link (or ask the admin about the "
                                              "upload limits)", {"Connection": "close"}) from None
        n += len(chunk)
        yield chunk


async def receive_multipart(request, folder: Path, max_bytes: int, cfg: ServerConfig | None = None) -> _MultipartSink:
    """Stream a multipart body into ``folder`` (files) and memory (fields), at most ``max_bytes``,
    under ``cfg``'s body deadline (see :func:`body_chunks`)."""
    from python_multipart.multipart import MultipartParser, parse_options_header
    from starlette.requests import ClientDisconnect

    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not opts.get(b"boundary"):
        raise HTTPProblem(415, "POST /jobs takes multipart/form-data", "upload one file per channel as form files plus parameter fields")
    sink = _MultipartSink(folder)
    parser = MultipartParser(opts[b"boundary"], sink.callbacks())
    problem: HTTPProblem | None = None
    total = drained = 0
    try:
        async for chunk in body_chunks(request, cfg or ServerConfig()):
            total += len(chunk)
            if problem is None:
                if total > max_bytes:
                    problem = HTTPProblem(413, f"upload larger than the server's limit of {_mb(max_bytes)}",
                                          "send smaller volumes (e.g. cropped or compressed .nii.gz) or ask the admin to raise --max-upload-mb")
                else:
                    problem = _feed(parser, chunk)
            else:  # keep reading a bounded amount so the client sees the answer, not a reset connection
                drained += len(chunk)
                if drained > DRAIN_LIMIT:
                    break
        if problem is None:
            problem = _feed(parser, None)
    except ClientDisconnect:
        problem = HTTPProblem(400, "the client disconnected during the upload", "send the whole request")
    except UploadTooSlow:  # while draining a refused body: that refusal is the answer
        if problem is None:
            raise
        problem.headers["Connection"] = "close"
        problem.drained = True
    finally:
        sink.close()
    if problem is not None:
        raise problem
    return sink


def _feed(parser, chunk: bytes | None) -> HTTPProblem | None:
    try:
        if chunk is None:
            parser.finalize()
        else:
            parser.write(chunk)
    except HTTPProblem as e:
        return e
    except Exception as e:  # noqa: BLE001 - malformed multipart
        return HTTPProblem(400, f"malformed multipart body: {type(e).__name__}: {e}", "send multipart/form-data")
    return None


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# --------------------------------------------------------------------------------------------
# Parameters from form fields: the CLI's own argparse definitions
# --------------------------------------------------------------------------------------------
def _param_parser():
    import argparse

    from ..cli import add_segment_options

    class P(argparse.ArgumentParser):
        def error(self, message):  # noqa: D401 - argparse hook
            raise HTTPProblem(400, f"bad parameter: {message}", "use the values `unetsegment segment --help` lists")

    p = P(prog="POST /jobs", add_help=False)
    add_segment_options(p)
    return p


def _flag_names() -> dict[str, tuple[str, bool]]:
    """form field name (normalised) → (CLI flag, is boolean)."""
    import argparse

    out = {}
    for a in _param_parser()._actions:
        for opt in a.option_strings:
            if opt.startswith("--"):
                out[opt[2:].replace("-", "_")] = (opt, isinstance(a, argparse._StoreTrueAction))
    out["heatmaps"] = out["heatmap"]
    return out


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
SERVER_OWNED = ("device", "threads")


def params_from_fields(fields: list[tuple[str, str]], default_model: str, defaults: SegmentParams) -> tuple[str, SegmentParams]:
    """(model, parameters) from form fields, over the server's defaults."""
    from ..cli import params_from_args

    flags = _flag_names()
    argv: list[str] = []
    bools: dict[str, bool] = {}
    seen: set[str] = set()
    for raw, value in fields:
        key = raw.strip().lstrip("-").lower().replace("-", "_")
        if key not in flags:
            raise HTTPProblem(400, f"unknown form field {raw[:60]!r}",
                              "send files named after the model's channels (or 'input'), and parameters named like the segment flags: "
                              + ", ".join(sorted(k for k in flags if k not in SERVER_OWNED)))
        if key in SERVER_OWNED:
            raise HTTPProblem(400, f"{key} is set by the server, not per job", f"leave it out (the admin sets `unetsegment serve --{key}`)")
        if key in seen:
            raise HTTPProblem(400, f"parameter {key} given twice", "send each parameter once")
        seen.add(key)
        flag, is_bool = flags[key]
        if is_bool:
            v = value.strip().lower()
            if v not in _TRUE + _FALSE:
                raise HTTPProblem(400, f"{key}={value[:20]!r} is not a boolean", "send true or false")
            bools[flag[2:].replace("-", "_")] = v in _TRUE
        else:
            argv.append(f"{flag}={value}")  # '=' form: a value such as '-1' is not taken for a flag
    p = _param_parser()
    d = dataclasses.asdict(defaults)
    d["heatmap"] = tuple(d.pop("heatmaps"))
    p.set_defaults(model=default_model, **d)
    ns = p.parse_args(argv)
    for k, v in bools.items():
        setattr(ns, k, v)
    return ns.model, params_from_args(ns)


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------
class BearerAuth:
    """Pure ASGI middleware: every HTTP request needs ``Authorization: Bearer <token>``."""

    def __init__(self, app, token: str):
        self.app = app
        self.digest = hashlib.sha256(token.encode()).digest()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        auth = b""
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                auth = v
                break
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        # hash both sides: the comparison is constant-time and leaks not even the token's length
        if given and hmac.compare_digest(hashlib.sha256(given).digest(), self.digest):
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        resp = JSONResponse({"error": "missing or wrong bearer token",
                             "fix": "send the header 'Authorization: Bearer TOKEN' with the token from the server's --token-file"},
                            status_code=401, headers={"WWW-Authenticate": 'Bearer realm="unetsegment"'})
        await resp(scope, receive, send)


def describe_device(name: str) -> dict:
    """``{"worker": name as configured, "device": what torch runs on, "name": the GPU's name or "cpu"}``."""
    from ..errors import DeviceError
    from ..engine.inference import resolve_device

    try:
        dev = resolve_device(name)
    except DeviceError as e:
        return {"worker": name, "device": None, "name": None, "error": e.problem}
    if dev.type == "cuda":
        import torch

        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        return {"worker": name, "device": f"cuda:{idx}", "name": torch.cuda.get_device_name(idx)}
    return {"worker": name, "device": dev.type, "name": "Apple Metal (MPS)" if dev.type == "mps" else "cpu"}


def cuda_report() -> dict:
    """``{"cuda_available", "gpus": [names]}`` of this machine."""
    import torch

    ok = torch.cuda.is_available()
    return {"cuda_available": ok, "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if ok else []}


#: the ``fix`` of framework-made errors, by status
_FIXES = {404: "see GET /docs (or /openapi.json) for the endpoints", 405: "use one of the methods in the Allow header",
          422: "send the fields /openapi.json describes", 500: "the server's log has the details; report it if it persists"}

_DOCS_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>UNetSegment API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head><body>
<div id="ui"></div><script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({dom_id: "#ui", spec: %s});</script></body></html>"""

_JOBS_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "additionalProperties": {"type": "string"},
    "description": "one file per model channel (field named after the channel, or repeated 'input' fields in channel order: "
                   ".nii, .nii.gz, .nrrd, .mha or a .zip of one DICOM series) and segment parameters named like the CLI flags "
                   "(model, threshold, min-lesion-ml, heatmap, tta …)"}}}}}
_FILE_TYPES = {"content": {t.split(";")[0]: {} for t in (*MEDIA_TYPES.values(), "application/octet-stream")}}


def _problem_response(status: int, problem: str, fix: str, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": problem, "fix": fix}, status_code=status, headers=headers)


def create_app(manager: JobManager):
    """The FastAPI app over ``manager`` (wrapped in bearer auth when the config has a token)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.utils import get_openapi
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = manager.cfg
    app = FastAPI(title="UNetSegment", version=__version__, docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  description=(__doc__ or "").split("Design:")[0])

    @app.exception_handler(HTTPProblem)
    async def _problem(request, exc: HTTPProblem):
        return _problem_response(exc.status, exc.problem, exc.fix, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        if exc.status_code == 404 and exc.detail == "Not Found":
            problem = f"no endpoint {request.url.path[:80]!r}"
        elif exc.status_code == 405:
            problem = f"{request.method} is not allowed on {request.url.path[:80]!r}"
        else:
            problem = str(exc.detail)
        return _problem_response(exc.status_code, problem, _FIXES.get(exc.status_code, ""), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _problem_response(422, f"invalid request: {where}: {first.get('msg', 'invalid')}", _FIXES[422])

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _problem_response(500, f"internal error ({type(exc).__name__})", _FIXES[500])

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            if cfg.token is not None:
                schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/docs", include_in_schema=False)
    async def docs():
        # the schema is inlined: a page fetched with the token needs no second, token-less request
        spec = json.dumps(openapi()).replace("</", "<\\/")
        return HTMLResponse(_DOCS_HTML % spec)

    @app.get("/health")
    async def health():
        c = manager.counts()
        return {"status": "ok", "version": __version__, "devices": manager.devices(), **manager.hardware(),
                "queued": c.get("queued", 0), "running": c.get("running", 0), "uploading": c["uploading"],
                "max_queued": cfg.max_queued, "max_uploads": cfg.max_uploads, "max_upload_bytes": cfg.max_upload_bytes,
                "retention_s": cfg.retention_s, "auth": cfg.token is not None}

    @app.get("/models")
    async def models():
        from ..models.bundle import available_models

        out = []
        names = list(available_models())
        default = manager.default_model()
        if default not in names:
            names.insert(0, default)
        for n in names:
            try:
                b = manager.bundle(n)
            except (UNetSegmentError, HTTPProblem):
                continue
            out.append({"name": n, "model_name": b.name, "version": b.version, "dimensions": b.dimensions,
                        "channels": b.channel_names, "labels": [l["name"] for l in b.labels],
                        "description": b.meta.get("title", b.meta.get("description", ""))})
        return {"default": default, "models": out}

    @app.post("/jobs", status_code=202, openapi_extra=_JOBS_BODY)
    async def create_job(request: Request):
        try:
            manager.check_room()  # full now: refuse before reading (no slot is held while the body arrives)
            manager.begin_upload()
        except HTTPProblem:
            await _drain(request, DRAIN_LIMIT, cfg.drain_timeout_s)
            raise
        try:
            job = await _receive_job(request, manager)
        finally:
            manager.end_upload()
        try:
            pos = manager.enqueue(job)  # the queue slot, now that the upload is complete
        except HTTPProblem:
            shutil.rmtree(job.dir, ignore_errors=True)
            raise
        return JSONResponse({"id": job.id, "status": "queued", "queue_position": pos, "model": job.model, "channels": job.channels},
                            status_code=202, headers={"Location": f"/jobs/{job.id}"})

    @app.get("/jobs/{jid}")
    async def job_status(jid: str):
        return manager.describe(manager.get(jid))

    @app.get("/jobs/{jid}/files/{name}", responses={200: _FILE_TYPES})
    async def job_file(jid: str, name: str):
        job = manager.get(jid)
        if name not in CONTRACT_FILES:
            raise HTTPProblem(404, f"no file {name[:60]!r}", "ask for one of the names in the job's 'files'")
        if job.status != "done":
            raise HTTPProblem(409, f"job {jid} is {job.status}", "files can be fetched once its status is done")
        if name not in job.files or not (job.out_dir / name).is_file():
            raise HTTPProblem(404, f"job {jid} has no {name}", "ask for one of the names in the job's 'files'")
        return FileResponse(job.out_dir / name, filename=name, media_type=media_type(name))

    @app.delete("/jobs/{jid}")
    async def job_delete(jid: str):
        return manager.delete(jid)

    if cfg.token is not None:
        return BearerAuth(app, cfg.token)
    return app


async def _receive_job(request, manager: JobManager) -> Job:
    """Read one ``POST /jobs`` body into a new job folder and make its :class:`Job` (not queued yet);
    on any refusal the folder is removed and the rest of the body read (bounded) or dropped."""
    from starlette.concurrency import run_in_threadpool

    cfg = manager.cfg
    jdir = None
    try:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cfg.max_upload_bytes:
            raise HTTPProblem(413, f"upload of {_mb(int(declared))} is larger than the server's limit of {_mb(cfg.max_upload_bytes)}",
                              "send smaller volumes (e.g. cropped or compressed .nii.gz) or ask the admin to raise --max-upload-mb")
        jid, jdir = manager.new_job_dir()
        sink = await receive_multipart(request, jdir / "inputs", cfg.max_upload_bytes, cfg)
        model, params = params_from_fields(sink.fields, manager.default_model(), cfg.params)
        bundle = manager.bundle(model)
        uploads = _map_uploads(sink.files, bundle.channel_names)
        if not uploads:
            raise HTTPProblem(400, "no files uploaded", "upload one file per channel: " + ", ".join(bundle.channel_names))
        names = {path: Path(client).name or path.name for _field, path, client in sink.files}
        try:  # a zip becomes its series folder now: a broken zip is the client's 400, not a failed job
            inputs = [await run_in_threadpool(_prepare_input, p, cfg.max_upload_bytes, names[p]) for p in uploads]
        except InputError as e:
            raise HTTPProblem(400, manager.redact(e.problem), e.fix or "") from None
        job = Job(id=jid, dir=jdir, model=model, params=params, inputs=inputs, channels=bundle.channel_names,
                  client_names=[names[p] for p in uploads])
    except BaseException as e:
        if jdir is not None:
            shutil.rmtree(jdir, ignore_errors=True)
        if isinstance(e, Exception) and not getattr(e, "drained", False):
            await _drain(request, DRAIN_LIMIT, cfg.drain_timeout_s)
        raise
    return job


def media_type(name: str) -> str:
    """The served media type of a contract file (``text/csv``, ``image/png``, ``application/json`` …)."""
    return MEDIA_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")


async def _drain(request, limit: int, timeout_s: float = 5.0) -> None:
    """Read (and drop) up to ``limit`` bytes of a refused body, for at most ``timeout_s``, so the client
    sees the answer rather than a reset connection (a stalled client gets the answer after the timeout)."""
    from starlette.requests import ClientDisconnect

    async def read() -> None:
        n = 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                break

    try:
        await asyncio.wait_for(read(), timeout=timeout_s)
    except (ClientDisconnect, RuntimeError, asyncio.TimeoutError):  # RuntimeError: already read to the end
        pass


def _map_uploads(files: list[tuple[str, Path, str]], channels: list[str]) -> list[Path]:
    from .job import map_inputs

    lower = {c.lower(): c for c in channels}
    tokens = []
    for fieldname, path, _client in files:
        key = fieldname.strip().lower()
        if key in _POSITIONAL_FIELDS:
            tokens.append(str(path))
        elif key in lower:
            tokens.append(f"{lower[key]}={path}")
        else:
            raise HTTPProblem(400, f"file field {fieldname[:60]!r} is not one of this model's channels ({', '.join(channels)})",
                              "name each file after its channel, or send them as 'input' fields in channel order")
    if not tokens:
        return []
    try:
        return map_inputs(tokens, channels)
    except UNetSegmentError as e:
        raise HTTPProblem(400, e.problem, e.fix or "") from None


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------
def read_token_file(path: str | os.PathLike) -> str:
    """The bearer token in ``path``; refused, as ssh refuses a private key, when others may read the file."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        if os.name == "posix" and mode & 0o077:
            raise UsageError(f"token file {p} is accessible by other users (mode {mode & 0o777:04o})",
                             f"chmod 600 {p}")
        token = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read token file {p}: {e}", "give a readable text file holding the token") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise UsageError(f"token file {p} must hold one token of at least 16 characters without spaces",
                         "e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > token.txt && chmod 600 token.txt")
    return token


def check_bind(host: str, token: str | None) -> None:
    if host not in LOOPBACK and token is None:
        raise UsageError(f"refusing to listen on {host} without authentication",
                         "give --token-file (and put TLS in front, or use --ssl-certfile/--ssl-keyfile), or bind to 127.0.0.1")


class InferenceServer:
    """A server in a background thread (tests, benchmarks, embedding): ``start()`` → URL, ``stop()``."""

    def __init__(self, cfg: ServerConfig, host: str = "127.0.0.1", port: int = 0, **uvicorn_kwargs):
        check_bind(host, cfg.token)
        self.cfg, self.host, self.port = cfg, host, port
        self.manager = JobManager(cfg)
        self.app = create_app(self.manager)
        self._uv_kwargs = uvicorn_kwargs
        self._server = None
        self._thread = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 20.0) -> str:
        import uvicorn

        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self.manager.start()
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, limit_concurrency=self.cfg.limit_concurrency,
                                timeout_graceful_shutdown=5, **self._uv_kwargs)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="unetsegment-uvicorn", daemon=True)
        self._thread.start()
        t0 = time.time()
        while not self._server.started:
            if not self._thread.is_alive() or time.time() - t0 > timeout:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=15)
        self.manager.stop()

    def __enter__(self) -> "InferenceServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(cfg: ServerConfig, host: str = "127.0.0.1", port: int = 8000, ssl_certfile: str | None = None,
          ssl_keyfile: str | None = None, log_level: str = "info") -> None:
    """Run the server in the foreground until interrupted (what ``unetsegment serve`` does)."""
    import uvicorn

    check_bind(host, cfg.token)
    manager = JobManager(cfg)
    app = create_app(manager)
    manager.start()
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, limit_concurrency=cfg.limit_concurrency,
                    ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, timeout_graceful_shutdown=10)
    finally:
        manager.stop()
