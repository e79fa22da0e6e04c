"""The job manager: a bounded queue of received jobs, one inference thread per device, a cleanup
thread that removes finished jobs after the retention time, and the counts ``/health`` shows.

A queue slot is taken only once an upload is complete (:meth:`JobManager.enqueue`); uploads in
progress are counted apart (503 beyond ``max_uploads``). Each job runs :func:`.job.segment_files`
with its own :class:`.inference.CancelToken`. Errors and the served ``summary.json`` never show
server-side paths (:meth:`JobManager.redact`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..engine.inference import CancelToken
from ..errors import CancelledError, ModelError, UNetSegmentError
from ..io.outputs import CONTRACT_FILES
from ..params import SegmentParams
from .config import ServerConfig
from .problems import HTTPProblem
from .workdir import claim_work_dir

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_ABS_PATH = re.compile(r"(?<![\w.~-])(?:[A-Za-z]:\\|/)(?:[^\s'\"/\\:]+[/\\])+([^\s'\"/\\:]*)")
log = logging.getLogger("unetsegment.server")


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


class JobManager:
    """Bounded queue + one inference thread per device + a retention cleanup thread."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.work_dir, self._dir_lock, self._own_work_dir = claim_work_dir(Path(cfg.work_dir) if cfg.work_dir else None)
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
        self._remove_left_job_dirs()
        self.devices(), self.hardware()  # torch's device probe once, not inside a request
        try:
            self.bundle(self.default_model())  # load and verify once, not in the first request
        except (UNetSegmentError, HTTPProblem):
            pass  # reported per request
        for dev in self.cfg.devices:
            self._start_thread(self._worker, f"unetsegment-infer-{dev}", dev)
        self._start_thread(self._cleaner, "unetsegment-cleanup")

    def _start_thread(self, target: Callable, name: str, *args) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
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

    def _remove_left_job_dirs(self) -> None:
        """Job folders left by an earlier server in a given --work-dir."""
        for p in self.work_dir.iterdir():
            if JOB_ID.match(p.name) and p.is_dir():
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

    # --- uploads and the queue -----------------------------------------------------------------
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

    # --- what clients ask --------------------------------------------------------------------
    def get(self, jid: str) -> Job:
        with self.lock:
            job = self.jobs.get(jid) if JOB_ID.match(jid or "") else None
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

    # --- the inference threads ---------------------------------------------------------------
    def _worker(self, device: str) -> None:
        while not self._stop.is_set():
            job = self._next_job(device)
            if job is not None:
                self._run(job, device)

    def _next_job(self, device: str) -> Job | None:
        """The next queued job, now marked running on ``device``; None when none came (or it was cancelled)."""
        try:
            jid = self.queue.get(timeout=0.25)
        except queue.Empty:
            return None
        with self.lock:
            job = self.jobs.get(jid)
            if job is None or job.status != "queued":
                return None
            job.status, job.started, job.device = "running", time.time(), device
        return job

    def _run(self, job: Job, device: str) -> None:
        """Run one job to its end state; a job's crash never ends the thread."""
        status, error, etype = "failed", "", ""
        try:
            self._segment(job, device)
            status = "done"
        except CancelledError:
            status = "cancelled"
        except UNetSegmentError as e:
            error, etype = self.redact(str(e), job), type(e).__name__
        except Exception as e:  # noqa: BLE001 - a job's crash must not kill the worker
            log.exception("job %s failed", job.id)
            error, etype = self.redact(f"internal error: {type(e).__name__}: {e}", job), "InternalError"
        finally:
            self._finish(job, status, error, etype)

    def _segment(self, job: Job, device: str) -> None:
        from .job import segment_files

        if self.on_stage is not None:
            self.on_stage(job, "started")
        job.cancel.check()
        summary = segment_files([str(p) for p in job.inputs], job.out_dir, job.model,
                                dataclasses.replace(job.params, device=device), overwrite=False,
                                progress=self._progress_of(job), cancel=job.cancel)
        self._publishable_summary(job)
        job.files = [f for f in CONTRACT_FILES if (job.out_dir / f).is_file()]
        job.result = {"n_lesions": int(summary["n_lesions"]), "total_volume_ml": float(summary["total_volume_ml"]),
                      "warnings": list(summary.get("warnings", [])), "timings_s": summary.get("timings_s", {})}

    def _progress_of(self, job: Job) -> Callable[..., None]:
        """The progress callback that records ``job``'s stage, fraction and message."""
        def progress(stage: str, fraction: float, message: str = "") -> None:
            job.stage, job.fraction, job.message = stage, float(fraction), message
            if not job.stages or job.stages[-1] != stage:
                job.stages.append(stage)
            if self.on_stage is not None:
                self.on_stage(job, stage)

        return progress

    def _finish(self, job: Job, status: str, error: str, etype: str) -> None:
        """Record the end state; a cancelled (or meanwhile deleted) job's files go at once."""
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
        from ..io.writers import write_json

        path = job.out_dir / "summary.json"
        summary = json.loads(path.read_text(encoding="utf-8"))
        for i, entry in enumerate(summary.get("inputs", [])):
            entry["path"] = job.client_names[i] if i < len(job.client_names) else Path(entry.get("path", "")).name
        if isinstance(summary.get("model"), dict):
            summary["model"]["path"] = summary["model"].get("name", "")
        write_json(_map_strings(summary, lambda s: self.redact(s, job)), path)

    # --- retention ---------------------------------------------------------------------------
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


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """``value`` (JSON: dicts, lists, scalars) with ``fn`` applied to every string in it."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_strings(x, fn) for x in value]
    if isinstance(value, dict):
        return {k: _map_strings(x, fn) for k, x in value.items()}
    return value


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def describe_device(name: str) -> dict:
    """``{"worker": name as configured, "device": what torch runs on, "name": the GPU's name or "cpu"}``."""
    from ..engine.device import device_type, resolve_device
    from ..errors import DeviceError

    try:
        dev = resolve_device(name)
    except DeviceError as e:
        return {"worker": name, "device": None, "name": None, "error": e.problem}
    if device_type(dev) == "cuda":
        import torch

        return {"worker": name, "device": dev, "name": torch.cuda.get_device_name(int(dev.split(":", 1)[1]))}
    return {"worker": name, "device": dev, "name": "Apple Metal (MPS)" if dev == "mps" else "cpu"}


def cuda_report() -> dict:
    """``{"cuda_available", "gpus": [names]}`` of this machine."""
    import torch

    ok = torch.cuda.is_available()
    return {"cuda_available": ok, "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if ok else []}
