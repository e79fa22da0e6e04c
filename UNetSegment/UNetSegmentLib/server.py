"""Inference server: ``unetsegment serve`` (FastAPI + uvicorn) in front of the same ``segment`` core.

Endpoints (JSON; errors are ``{"error": problem, "fix": fix}``):

* ``GET /health`` — status, version, devices, queue length and the server's limits.
* ``GET /models`` — models clients may name, and the default.
* ``POST /jobs`` — ``multipart/form-data``: one file per model channel, as a field named after the
  channel (``CT``, ``CBF`` …) or as repeated ``input`` fields in the bundle's channel order; files
  are NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``), MHA (``.mha``) or a ``.zip`` of one DICOM
  series. Other fields are run parameters named like the ``segment`` flags (``model``,
  ``threshold``, ``min-lesion-ml`` or ``min_lesion_ml``, ``heatmap``, ``tta`` …), parsed by the
  same argparse definitions; ``device`` and ``threads`` belong to the server. → ``202 {"id", …}``.
* ``GET /jobs/{id}`` — ``status`` (queued, running, done, failed, cancelled), ``stage``, ``fraction``,
  ``message``, ``error``, ``queue_position``, and when done ``files``, ``n_lesions``, ``total_volume_ml``.
* ``GET /jobs/{id}/files/{name}`` — one file of the ``segment`` file set (only those names).
* ``DELETE /jobs/{id}`` — cancels a queued or running job (the run stops between windows) or
  deletes a finished one; its files are removed.

Design: uploads are streamed to disk under a byte cap (413); a bounded queue (429 when full) feeds
one inference thread per device, each running :func:`.job.segment_files` with a
:class:`.inference.CancelToken`; a cleanup thread removes finished jobs after the retention time.
With a token file every request must carry ``Authorization: Bearer TOKEN`` (compared in constant
time). The server binds to 127.0.0.1 unless told otherwise, and refuses other addresses without a
token. Client file names never reach the file system: uploads are stored as ``inputN.<suffix>``.
"""

import dataclasses
import hashlib
import hmac
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import CancelledError, InputError, ModelError, UNetSegmentError, UsageError
from .inference import CancelToken
from .outputs import CONTRACT_FILES
from .params import SegmentParams

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


class HTTPProblem(Exception):
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
    status: str = "queued"
    stage: str = ""
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
        d = {"id": self.id, "status": self.status, "stage": self.stage, "fraction": round(self.fraction, 4),
             "message": self.message, "error": self.error, "error_type": self.error_type, "model": self.model,
             "channels": self.channels, "device": self.device, "created": self.created, "started": self.started,
             "finished": self.finished, "queue_position": queue_position}
        if self.status == "done":
            d["files"] = list(self.files)
            d.update(self.result)
        return d


class JobManager:
    """Bounded queue + one inference thread per device + a retention cleanup thread."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self._own_work_dir = cfg.work_dir is None
        self.work_dir = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="unetsegment-serve-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.queue: queue.Queue[str] = queue.Queue()
        self._reserved = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._bundles: dict[str, Any] = {}

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._remove_stale_dirs()
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

    def _remove_stale_dirs(self) -> None:
        """Job folders left by an earlier server in a given --work-dir."""
        for p in self.work_dir.iterdir():
            if _JOB_ID.match(p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    # --- models ------------------------------------------------------------------------------
    def bundle(self, name: str):
        """A loaded bundle by model name (clients may only name models; the server's --model may be a path)."""
        from .bundle import available_models, load_bundle

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
        from .bundle import default_model_name

        return self.cfg.model or default_model_name()

    # --- queue -------------------------------------------------------------------------------
    def new_job_dir(self) -> tuple[str, Path]:
        jid = secrets.token_hex(16)
        d = self.work_dir / jid
        (d / "inputs").mkdir(parents=True)
        return jid, d

    def reserve(self) -> None:
        """Take a queue slot before reading an upload; 429 when the queue is full."""
        with self.lock:
            waiting = sum(j.status == "queued" for j in self.jobs.values()) + self._reserved
            if waiting >= self.cfg.max_queued:
                raise HTTPProblem(429, f"the server has {waiting} jobs waiting (limit {self.cfg.max_queued})",
                                  "retry later (see Retry-After)", {"Retry-After": "30"})
            self._reserved += 1

    def release(self) -> None:
        with self.lock:
            self._reserved -= 1

    def enqueue(self, job: Job) -> int:
        with self.lock:
            self._reserved -= 1
            self.jobs[job.id] = job
            pos = self._position(job)
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
        with self.lock:
            c: dict[str, int] = {}
            for j in self.jobs.values():
                c[j.status] = c.get(j.status, 0) + 1
        return c

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

            status, error, etype = "failed", "", ""
            try:
                inputs = [str(_prepare_input(p, self.cfg.max_upload_bytes)) for p in job.inputs]
                job.cancel.check()
                summary = segment_files(inputs, job.out_dir, job.model, dataclasses.replace(job.params, device=device),
                                        overwrite=False, progress=progress, cancel=job.cancel)
                job.files = [f for f in CONTRACT_FILES if (job.out_dir / f).is_file()]
                job.result = {"n_lesions": int(summary["n_lesions"]), "total_volume_ml": float(summary["total_volume_ml"]),
                              "warnings": list(summary.get("warnings", [])), "timings_s": summary.get("timings_s", {})}
                status = "done"
            except CancelledError:
                status = "cancelled"
            except UNetSegmentError as e:
                error, etype = str(e), type(e).__name__
            except Exception as e:  # noqa: BLE001 - a job's crash must not kill the worker
                error, etype = f"internal error: {type(e).__name__}: {e}", "InternalError"
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


def _prepare_input(p: Path, max_bytes: int) -> Path:
    """Uploaded file → readable input: a .zip becomes its DICOM series folder (extracted safely)."""
    if p.suffix.lower() != ".zip":
        return p
    dest = p.with_suffix("")
    try:
        with zipfile.ZipFile(p) as z:
            members = [m for m in z.infolist() if not m.is_dir()]
            if len(members) > MAX_ZIP_MEMBERS:
                raise InputError(f"{p.name}: the zip holds {len(members)} files (limit {MAX_ZIP_MEMBERS})", "zip one DICOM series")
            if sum(m.file_size for m in members) > max_bytes:
                raise InputError(f"{p.name}: the zip unpacks to more than {max_bytes} bytes", "zip one DICOM series")
            root = dest.resolve()
            written = 0
            for m in members:
                parts = Path(m.filename.replace("\\", "/")).parts
                if m.filename.startswith(("/", "\\")) or ".." in parts or not parts or ":" in parts[0]:
                    raise InputError(f"{p.name} holds an unsafe path {m.filename[:80]!r}", "zip the series folder's files only")
                target = (dest / Path(*parts)).resolve()
                if root not in target.parents:
                    raise InputError(f"{p.name} holds an unsafe path {m.filename[:80]!r}", "zip the series folder's files only")
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(m) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise InputError(f"{p.name} unpacks to more than {max_bytes} bytes", "zip one DICOM series")
                        dst.write(chunk)
    except zipfile.BadZipFile as e:
        raise InputError(f"{p.name} is not a valid zip ({e})", "upload a .zip of one DICOM series folder") from None
    p.unlink(missing_ok=True)
    folder = dest
    while True:  # descend through single wrapper folders (series/…)
        entries = [e for e in folder.iterdir() if not e.name.startswith((".", "__MACOSX"))]
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
            self._fh = open(path, "wb")
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


async def receive_multipart(request, folder: Path, max_bytes: int) -> _MultipartSink:
    """Stream a multipart body into ``folder`` (files) and memory (fields), at most ``max_bytes``."""
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
        async for chunk in request.stream():
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

    from .cli import add_segment_options

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
    from .cli import params_from_args

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


def create_app(manager: JobManager):
    """The FastAPI app over ``manager`` (wrapped in bearer auth when the config has a token)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse

    cfg = manager.cfg
    app = FastAPI(title="UNetSegment", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPProblem)
    async def _problem(request, exc: HTTPProblem):
        return JSONResponse({"error": exc.problem, "fix": exc.fix}, status_code=exc.status, headers=exc.headers)

    @app.get("/health")
    async def health():
        c = manager.counts()
        return {"status": "ok", "version": __version__, "devices": list(cfg.devices), "queued": c.get("queued", 0),
                "running": c.get("running", 0), "max_queued": cfg.max_queued, "max_upload_bytes": cfg.max_upload_bytes,
                "retention_s": cfg.retention_s, "auth": cfg.token is not None}

    @app.get("/models")
    async def models():
        from .bundle import available_models

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

    @app.post("/jobs", status_code=202)
    async def create_job(request: Request):
        try:
            manager.reserve()
        except HTTPProblem:
            await _drain(request, DRAIN_LIMIT)
            raise
        jid, jdir = None, None
        try:
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > cfg.max_upload_bytes:
                await _drain(request, DRAIN_LIMIT)
                raise HTTPProblem(413, f"upload of {_mb(int(declared))} is larger than the server's limit of {_mb(cfg.max_upload_bytes)}",
                                  "send smaller volumes (e.g. cropped or compressed .nii.gz) or ask the admin to raise --max-upload-mb")
            jid, jdir = manager.new_job_dir()
            sink = await receive_multipart(request, jdir / "inputs", cfg.max_upload_bytes)
            model, params = params_from_fields(sink.fields, manager.default_model(), cfg.params)
            bundle = manager.bundle(model)
            inputs = _map_uploads(sink.files, bundle.channel_names)
            if not inputs:
                raise HTTPProblem(400, "no files uploaded", "upload one file per channel: " + ", ".join(bundle.channel_names))
            job = Job(id=jid, dir=jdir, model=model, params=params, inputs=inputs, channels=bundle.channel_names)
        except BaseException:
            manager.release()
            await _drain(request, DRAIN_LIMIT)
            if jdir is not None:
                shutil.rmtree(jdir, ignore_errors=True)
            raise
        pos = manager.enqueue(job)
        return JSONResponse({"id": jid, "status": "queued", "queue_position": pos, "model": model, "channels": job.channels},
                            status_code=202, headers={"Location": f"/jobs/{jid}"})

    @app.get("/jobs/{jid}")
    async def job_status(jid: str):
        return manager.describe(manager.get(jid))

    @app.get("/jobs/{jid}/files/{name}")
    async def job_file(jid: str, name: str):
        job = manager.get(jid)
        if name not in CONTRACT_FILES:
            raise HTTPProblem(404, f"no file {name[:60]!r}", "ask for one of the names in the job's 'files'")
        if job.status != "done":
            raise HTTPProblem(409, f"job {jid} is {job.status}", "files can be fetched once its status is done")
        if name not in job.files or not (job.out_dir / name).is_file():
            raise HTTPProblem(404, f"job {jid} has no {name}", "ask for one of the names in the job's 'files'")
        return FileResponse(job.out_dir / name, filename=name, media_type="application/octet-stream")

    @app.delete("/jobs/{jid}")
    async def job_delete(jid: str):
        return manager.delete(jid)

    if cfg.token is not None:
        return BearerAuth(app, cfg.token)
    return app


async def _drain(request, limit: int) -> None:
    """Read (and drop) up to ``limit`` bytes of a refused body so the client sees the answer, not a reset."""
    from starlette.requests import ClientDisconnect

    n = 0
    try:
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                break
    except (ClientDisconnect, RuntimeError):  # RuntimeError: already read to the end
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
    p = Path(path)
    try:
        token = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read token file {p}: {e}", "give a readable text file holding the token") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise UsageError(f"token file {p} must hold one token of at least 16 characters without spaces",
                         "e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > token.txt")
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
