"""Client of ``unetsegment serve`` (standard library only, so it runs in Slicer's Python as is).

Every call is one short HTTP request, so a GUI can drive a job from a timer without blocking::

    c = ServerClient("http://gpu-box:8000", token_file="~/.unetsegment-token")
    job = c.submit({"CT": "/tmp/ct.nrrd"}, model="ct-hemorrhage", params=SegmentParams(threshold=0.4))
    # every 0.5 s (e.g. a QTimer):
    st = c.status(job)          # {"status": "queued"|"running"|"done"|"failed"|"cancelled", "stage", "fraction", "error", ...}
    if st["status"] == "done":
        c.download(job, "/tmp/out")   # the segment file set, moved into place atomically
    c.cancel(job)               # DELETE: stops a running job / removes a finished one

``submit`` and ``download`` move whole volumes: on a slow link run them off the GUI thread.
Errors raise :class:`ServerError` (one line: problem and fix; ``.status`` is the HTTP status, 0
when the server could not be reached).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from ..errors import UNetSegmentError
from ..params import FIELD, SegmentParams, field_name
_CHUNK = 1 << 20


class ServerError(UNetSegmentError):
    exit_code = 1

    def __init__(self, problem: str, fix: str | None = None, status: int = 0):
        super().__init__(problem, fix)
        self.status = status


def params_to_fields(params: SegmentParams | Mapping | None) -> dict[str, str]:
    """Form fields for the parameters that are set (``None`` = the server's default)."""
    if params is None:
        return {}
    d = params.as_dict() if isinstance(params, SegmentParams) else dict(params)
    out = {}
    for k, v in d.items():
        field = FIELD.get(field_name(k))  # an unknown name goes through: the server answers 400 naming it
        if v is None or (field is not None and field.server_owned):  # the server owns its devices and threads
            continue
        name = "heatmap" if k == "heatmaps" else k.replace("_", "-")
        if isinstance(v, bool):
            out[name] = "true" if v else "false"
        elif isinstance(v, (list, tuple)):
            out[name] = ",".join(v) if v else "none"
        else:
            out[name] = str(v)
    return out


class _MultipartBody:
    """A streamed multipart/form-data body: fields, then files read in chunks (never whole in memory)."""

    def __init__(self, fields: Mapping[str, str], files: Sequence[tuple[str, Path]]):
        self.boundary = "unetsegment-" + secrets.token_hex(12)
        self._parts: list[tuple[bytes, Path | None]] = []
        for k, v in fields.items():
            head = f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_q(k)}"\r\n\r\n{v}\r\n'.encode()
            self._parts.append((head, None))
        for name, path in files:
            head = (f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_q(name)}"; filename="{_q(path.name)}"\r\n'
                    f"Content-Type: application/octet-stream\r\n\r\n").encode()
            self._parts.append((head, path))
        self._tail = f"--{self.boundary}--\r\n".encode()
        self.length = sum(len(h) + (p.stat().st_size + 2 if p else 0) for h, p in self._parts) + len(self._tail)

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __iter__(self) -> Iterator[bytes]:
        for head, path in self._parts:
            yield head
            if path is not None:
                with open(path, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        yield chunk
                yield b"\r\n"
        yield self._tail


def _q(s: str) -> str:
    return "".join(c if c.isprintable() and c not in '"\\' else "_" for c in s)


class ServerClient:
    """Submit / poll / download / cancel jobs on a UNetSegment server."""

    def __init__(self, url: str, token: str | None = None, token_file: str | os.PathLike | None = None, timeout: float = 10.0,
                 upload_timeout: float = 600.0):
        u = urllib.parse.urlsplit(url.strip())
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ServerError(f"server URL {url!r} is not an http(s) URL", "give e.g. http://127.0.0.1:8000")
        self.url = url.strip().rstrip("/")
        if token is None and token_file:
            try:
                token = Path(token_file).expanduser().read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise ServerError(f"cannot read token file {token_file}: {e}", "give the file holding the server's token") from None
        self.token = token
        self.timeout = timeout
        self.upload_timeout = upload_timeout
        self._health: dict | None = None

    # --- HTTP --------------------------------------------------------------------------------
    def _request(self, method: str, path: str, data=None, headers: dict | None = None, timeout: float | None = None):
        h = dict(headers or {})
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)  # noqa: S310 - http(s) only (checked)
        except urllib.error.HTTPError as e:
            try:
                body = json.loads(e.read().decode("utf-8", "replace") or "{}")
            except ValueError:
                body = {}
            problem = body.get("error") or body.get("detail") or f"HTTP {e.code} {e.reason}"
            raise ServerError(f"server: {problem}", body.get("fix") or None, e.code) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerError(f"cannot reach the UNetSegment server at {self.url}: {reason}",
                              "check the server URL and that `unetsegment serve` runs there") from None

    def _reachable(self) -> bool:
        """True when the server answers HTTP at all (even 401)."""
        try:
            self.health()
            return True
        except ServerError as e:
            return e.status != 0

    def _json(self, method: str, path: str, **kw) -> dict:
        with self._request(method, path, **kw) as r:
            return json.loads(r.read().decode("utf-8"))

    # --- API ---------------------------------------------------------------------------------
    def health(self) -> dict:
        """``GET /health``: status, version, devices, queue length and limits (``max_upload_bytes`` …)."""
        self._health = self._json("GET", "/health")
        return self._health

    def models(self) -> dict:
        """``GET /models``: ``{"default": name, "models": [{"name", "version", "channels", "labels", …}]}``."""
        return self._json("GET", "/models")

    def submit(self, inputs: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike], model: str | None = None,
               params: SegmentParams | Mapping | None = None) -> str:
        """Upload one volume per channel (``{channel: path}``, ``NAME=PATH`` tokens, or paths in channel
        order) with the model and parameters; returns the job id. Files over the server's upload limit
        are refused here, before sending."""
        files: list[tuple[str, Path]] = []
        if isinstance(inputs, Mapping):
            files = [(str(k), Path(v)) for k, v in inputs.items()]
        else:
            for t in inputs:
                t = str(t)
                if "=" in t and not Path(t).exists():
                    k, v = t.split("=", 1)
                    files.append((k, Path(v)))
                else:
                    files.append(("input", Path(t)))
        for _, p in files:
            if not p.is_file():
                raise ServerError(f"input not found or not a file: {p}", "give volume files (zip a DICOM series folder first)")
        fields = params_to_fields(params)
        if model:
            fields["model"] = model
        body = _MultipartBody(fields, files)
        limit = (self._health or self.health()).get("max_upload_bytes")
        if limit and body.length > limit:
            raise ServerError(f"the upload ({body.length / 2**20:.1f} MiB) exceeds the server's limit of {limit / 2**20:.1f} MiB",
                              "send smaller or compressed volumes, or ask the admin to raise --max-upload-mb", 413)
        headers = {"Content-Type": body.content_type, "Content-Length": str(body.length)}
        try:
            return self._json("POST", "/jobs", data=iter(body), headers=headers, timeout=self.upload_timeout)["id"]
        except ServerError as e:
            if e.status == 0 and self._reachable():  # it answered before reading a large upload, and hung up
                raise ServerError("the server refused the upload before reading it (queue full, upload too large, or wrong token)",
                                  "check GET /health (queued, max_queued, max_upload_bytes) and retry later", 0) from None
            raise

    def status(self, job_id: str) -> dict:
        """``GET /jobs/{id}``: ``status``, ``stage``, ``fraction``, ``message``, ``error``, ``queue_position``,
        and when done ``files``, ``n_lesions``, ``total_volume_ml``."""
        return self._json("GET", f"/jobs/{_jid(job_id)}")

    def cancel(self, job_id: str) -> dict:
        """``DELETE /jobs/{id}``: cancel a queued/running job or delete a finished one's files."""
        return self._json("DELETE", f"/jobs/{_jid(job_id)}")

    def download_file(self, job_id: str, name: str, dest: str | os.PathLike) -> Path:
        """One file of a done job to ``dest`` (a file path)."""
        dest = Path(dest)
        with self._request("GET", f"/jobs/{_jid(job_id)}/files/{urllib.parse.quote(name)}", timeout=self.upload_timeout) as r, \
                open(dest, "wb") as f:
            shutil.copyfileobj(r, f, _CHUNK)
        return dest

    def download(self, job_id: str, output_dir: str | os.PathLike, overwrite: bool = False) -> list[Path]:
        """The done job's file set into ``output_dir``, with ``segment``'s guarantees: staged, then moved
        into place together; existing outputs are refused unless ``overwrite``."""
        from ..io.outputs import StagedOutput

        st = self.status(job_id)
        if st["status"] != "done":
            raise ServerError(f"job {job_id} is {st['status']}" + (f": {st['error']}" if st.get("error") else ""),
                              "download once its status is done", 409)
        stage = StagedOutput(output_dir, overwrite)
        stage.check()
        with stage:
            for name in st["files"]:
                self.download_file(job_id, name, stage.path / name)
        return [Path(output_dir) / n for n in st["files"]]

    def wait(self, job_id: str, poll_s: float = 0.5, timeout: float | None = None,
             progress: Callable[[str, float, str], None] | None = None) -> dict:
        """Block until the job leaves queued/running (scripts; a GUI polls :meth:`status` instead)."""
        t0 = time.monotonic()
        while True:
            st = self.status(job_id)
            if progress:
                progress(st.get("stage") or st["status"], float(st.get("fraction") or 0.0), st.get("message") or "")
            if st["status"] not in ("queued", "running"):
                return st
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise ServerError(f"job {job_id} still {st['status']} after {timeout:.0f} s", "wait longer or cancel it")
            time.sleep(poll_s)


def _jid(job_id: str) -> str:
    return urllib.parse.quote(str(job_id), safe="")


# --------------------------------------------------------------------------------------------
# A remote run with the local worker's interface (for the Slicer logic)
# --------------------------------------------------------------------------------------------
class RemoteProcess:
    """Runs a ``segment`` request on a server, with the interface of the Slicer module's local worker
    process (``start(request_path, stop_file)``, ``stop()``, ``is_running()``) and its JSON events.

    ``request.json`` is the worker's (``inputs``, ``output_dir``, ``model``, ``params``, ``overwrite``);
    a model given as a bundle folder is asked for by its folder name. All HTTP (upload, polling every
    ``poll_s``, download into ``output_dir``) happens in a background thread; events are queued and
    delivered — ``on_event(ev)`` then ``on_finished(code)`` — only from :meth:`poll`, which the GUI
    calls from a timer (e.g. a ``qt.QTimer`` every 100 ms), so callbacks run on the GUI thread and
    nothing blocks it. Events: ``started``, ``log``, ``progress`` (stages ``upload``, ``queued``, the
    engine's stages, ``download``), then ``done`` (``output_dir``, ``summary``, ``elapsed_s``; code 0)
    or ``error`` (``kind``, ``exit_code``, ``message``, ``problem``, ``fix``; cancel is
    ``CancelledError``/130, a server that cannot be reached ``ServerError``/1).
    """

    def __init__(self, on_event: Callable[[dict], None], on_finished: Callable[[int], None], client: ServerClient,
                 poll_s: float = 0.5):
        import queue
        import threading

        self.on_event, self.on_finished, self.client, self.poll_s = on_event, on_finished, client, poll_s
        self._queue: "queue.Queue[tuple]" = queue.Queue()
        self._stop = threading.Event()
        self._thread: "threading.Thread | None" = None
        self._finished = True
        self.job_id: str | None = None

    def start(self, request_path: str, stop_file: str | None = None) -> None:
        import threading

        if self.is_running():
            raise RuntimeError("a segmentation is already running")
        req = json.loads(Path(request_path).read_text(encoding="utf-8"))
        self._stop.clear()
        self._finished = False
        self.job_id = None
        self._thread = threading.Thread(target=self._run, args=(req,), daemon=True, name="unetsegment-remote")
        self._thread.start()

    def stop(self) -> None:
        """Ask for a stop: the job is deleted on the server; ``error``/CancelledError follows."""
        self._stop.set()

    def is_running(self) -> bool:
        return not self._finished

    def poll(self) -> bool:
        """Deliver queued events on the calling thread; returns True while the run is going on."""
        import queue

        while True:
            try:
                kind, payload = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == "event":
                self.on_event(payload)
            else:
                self._finished = True
                self.on_finished(int(payload))
                return False
        return not self._finished

    # --- background thread -------------------------------------------------------------------
    def _emit(self, ev: dict) -> None:
        self._queue.put(("event", ev))

    def _progress(self, stage: str, fraction: float, message: str = "") -> None:
        self._emit({"event": "progress", "stage": stage, "fraction": float(fraction), "overall": _overall(stage, fraction),
                    "eta_s": None, "message": message})

    def _end(self, code: int) -> None:
        self._queue.put(("finished", code))

    def _error(self, kind: str, problem: str, fix: str | None, code: int) -> None:
        msg = f"{problem} — {fix}" if fix else problem
        self._emit({"event": "error", "kind": kind, "exit_code": code, "message": msg, "problem": problem, "fix": fix or ""})
        self._end(code)

    def _cancelled(self) -> None:
        if self.job_id:
            try:
                self.client.cancel(self.job_id)
            except ServerError:
                pass
        self._error("CancelledError", "run cancelled", "start it again when ready", 130)

    def _run(self, req: dict) -> None:
        t0 = time.monotonic()
        try:
            model = req.get("model")
            if model and (Path(model) / "model.json").is_file():
                model = Path(model).name
            models = self.client.models()
            known = {m["name"]: m for m in models.get("models", [])}
            name = model or models.get("default")
            if name not in known:
                self._error("ModelError", f"the server at {self.client.url} has no model {name!r} "
                            f"(it has {', '.join(sorted(known)) or 'none'})", "import the model on the server or pick another", 4)
                return
            self._emit({"event": "started", "pid": None, "python": f"server {self.client.url}", "version": known[name].get("version")})
            self._progress("upload", 0.0, f"uploading to {self.client.url}")
            if self._stop.is_set():
                return self._cancelled()
            self.job_id = self.client.submit(list(req["inputs"]), model=name, params=req.get("params"))
            self._emit({"event": "log", "level": "info", "message": f"job {self.job_id} on {self.client.url} ({name} {known[name].get('version')})"})
            while True:
                if self._stop.is_set():
                    return self._cancelled()
                st = self.client.status(self.job_id)
                if st["status"] == "queued":
                    self._progress("queued", 0.0, f"waiting in the server's queue (position {int(st.get('queue_position') or 0) + 1})")
                elif st["status"] == "running" and st.get("stage") == "done":  # the engine finished; the files are written
                    self._progress("write", 0.0, "writing outputs")  # (the local worker's name for this stage)
                elif st["status"] == "running":
                    self._progress(st.get("stage") or "load", float(st.get("fraction") or 0.0), st.get("message") or "")
                elif st["status"] == "done":
                    break
                elif st["status"] == "cancelled":
                    return self._error("CancelledError", "the job was cancelled on the server", "start it again when ready", 130)
                else:
                    problem, _, fix = (st.get("error") or "the job failed on the server").partition(" — ")
                    kind = st.get("error_type") or "ServerError"
                    return self._error(kind, problem, fix or None, _exit_code(kind))
                self._stop.wait(self.poll_s)
            for w in st.get("warnings", []):
                self._emit({"event": "log", "level": "warning", "message": w})
            self._progress("download", 0.0, "downloading results")
            if self._stop.is_set():
                return self._cancelled()
            out = Path(req["output_dir"])
            self.client.download(self.job_id, out, overwrite=bool(req.get("overwrite")))
            try:
                self.client.cancel(self.job_id)  # the server's copy is no longer needed
            except ServerError:
                pass
            summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
            self._emit({"event": "done", "output_dir": str(out), "summary": summary, "elapsed_s": time.monotonic() - t0})
            self._end(0)
        except UNetSegmentError as e:
            kind = type(e).__name__
            self._error(kind, e.problem, e.fix, getattr(e, "exit_code", 1))
        except Exception as e:  # noqa: BLE001 - the GUI gets one error event, never a dead thread
            self._error("InternalError", f"internal error: {type(e).__name__}: {e}", "report this as a bug", 1)


def _exit_code(kind: str) -> int:
    from .. import errors

    cls = getattr(errors, kind, None)
    return int(getattr(cls, "exit_code", 1)) if isinstance(cls, type) else 1


def _overall(stage: str, fraction: float) -> float | None:
    """The local worker's overall fraction for an engine stage (None for upload/queued/download)."""
    try:
        from .worker import STAGE_WEIGHTS, STAGES

        done = sum(STAGE_WEIGHTS[s] for s in STAGES[: STAGES.index(stage)])
        return min(1.0, done + STAGE_WEIGHTS[stage] * max(0.0, min(1.0, fraction)))
    except (ImportError, ValueError, KeyError, AttributeError, TypeError):
        return None
