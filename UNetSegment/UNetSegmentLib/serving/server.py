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
  ``threshold``, ``min-lesion-ml`` or ``min_lesion_ml``, ``heatmap``, ``tta`` …), read through the
  same parameter table; ``device`` and ``threads`` belong to the server. → ``202 {"id", …}``.
* ``GET /jobs/{id}`` — ``status`` (queued, running, done, failed, cancelled), ``stage``, ``stages`` (every
  stage the job has been through, in order), ``fraction``, ``message``, ``error``, ``queue_position``,
  and when done ``files``, ``n_lesions``, ``total_volume_ml``.
* ``GET /jobs/{id}/files/{name}`` — one file of the ``segment`` file set (only those names), as
  ``text/csv``, ``image/png``, ``application/json`` … by its kind.
* ``DELETE /jobs/{id}`` — cancels a queued or running job (the run stops between windows) or
  deletes a finished one; its files are removed.

Design: this module is the app and its entry points; the parts live beside it —
:mod:`.uploads` (streaming a body to disk under the size cap and the slow-upload guards: 413, 408),
:mod:`.dicom_zip` (a zipped DICOM series), :mod:`.form` (form fields → model, parameters, inputs),
:mod:`.jobs` (the bounded queue — 429 when full —, one inference thread per device, retention),
:mod:`.workdir` (the locked, private work folder; folders of killed servers are removed),
:mod:`.auth` (bearer token, token file, bind rule). A queue slot is taken only once an upload is
complete. Errors and the served ``summary.json`` never show server-side paths. The server binds to
127.0.0.1 unless told otherwise, and refuses other addresses without a token.
"""
# no `from __future__ import annotations`: FastAPI reads the route handlers' annotations (``Request``) at runtime
import json
import logging
import shutil
import socket
import threading
import time
from pathlib import Path

from .. import __version__
from ..errors import InputError, UNetSegmentError
from ..io.outputs import CONTRACT_FILES
from .auth import BearerAuth, check_bind
from .config import ServerConfig
from .dicom_zip import prepare_input
from .form import map_uploads, params_from_fields
from .jobs import Job, JobManager
from .problems import HTTPProblem, problem_response
from .uploads import check_declared_size, drain, receive_multipart

__all__ = ["InferenceServer", "ServerConfig", "create_app", "media_type", "serve"]

#: media types of the served files (the rest are application/octet-stream)
MEDIA_TYPES = {".csv": "text/csv; charset=utf-8", ".tsv": "text/tab-separated-values; charset=utf-8", ".png": "image/png",
               ".json": "application/json", ".dcm": "application/dicom"}
log = logging.getLogger("unetsegment.server")

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


def media_type(name: str) -> str:
    """The served media type of a contract file (``text/csv``, ``image/png``, ``application/json`` …)."""
    return MEDIA_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")


def create_app(manager: JobManager):
    """The FastAPI app over ``manager`` (wrapped in bearer auth when the config has a token)."""
    from fastapi import FastAPI

    app = FastAPI(title="UNetSegment", version=__version__, docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  description=(__doc__ or "").split("Design:")[0])
    _add_error_handlers(app)
    _add_docs(app, manager.cfg)
    _add_info_routes(app, manager)
    _add_job_routes(app, manager)
    if manager.cfg.token is not None:
        return BearerAuth(app, manager.cfg.token)
    return app


def _add_error_handlers(app) -> None:
    """Every error, ours or the framework's, as ``{"error", "fix"}``."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(HTTPProblem)
    async def _problem(request, exc: HTTPProblem):
        return problem_response(exc.status, exc.problem, exc.fix, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        if exc.status_code == 404 and exc.detail == "Not Found":
            problem = f"no endpoint {request.url.path[:80]!r}"
        elif exc.status_code == 405:
            problem = f"{request.method} is not allowed on {request.url.path[:80]!r}"
        else:
            problem = str(exc.detail)
        return problem_response(exc.status_code, problem, _FIXES.get(exc.status_code, ""), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        return problem_response(422, f"invalid request: {where}: {first.get('msg', 'invalid')}", _FIXES[422])

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return problem_response(500, f"internal error ({type(exc).__name__})", _FIXES[500])


def _add_docs(app, cfg: ServerConfig) -> None:
    """``/openapi.json`` (with the bearer scheme when a token is set) and ``/docs``, its page with the schema inlined."""
    from fastapi.openapi.utils import get_openapi
    from fastapi.responses import HTMLResponse

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


def _add_info_routes(app, manager: JobManager) -> None:
    """``/health`` and ``/models``."""
    cfg = manager.cfg

    @app.get("/health")
    async def health():
        c = manager.counts()
        return {"status": "ok", "version": __version__, "devices": manager.devices(), **manager.hardware(),
                "queued": c.get("queued", 0), "running": c.get("running", 0), "uploading": c["uploading"],
                "max_queued": cfg.max_queued, "max_uploads": cfg.max_uploads, "max_upload_bytes": cfg.max_upload_bytes,
                "retention_s": cfg.retention_s, "auth": cfg.token is not None}

    @app.get("/models")
    async def models():
        return _models(manager)


def _models(manager: JobManager) -> dict:
    """The models clients may name (those that load), and the default."""
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


def _add_job_routes(app, manager: JobManager) -> None:
    """``POST /jobs``, ``GET /jobs/{id}``, ``GET /jobs/{id}/files/{name}`` and ``DELETE /jobs/{id}``."""
    from fastapi import Request
    from fastapi.responses import FileResponse, JSONResponse

    @app.post("/jobs", status_code=202, openapi_extra=_JOBS_BODY)
    async def create_job(request: Request):
        job, pos = await _accept_job(request, manager)
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


async def _accept_job(request, manager: JobManager) -> tuple[Job, int]:
    """Receive one ``POST /jobs`` and queue it: (job, queue position). Refused before reading when the
    queue is full now or too many uploads are in progress; the queue slot is taken only once the upload
    is complete (no slot is held while the body arrives)."""
    cfg = manager.cfg
    try:
        manager.check_room()
        manager.begin_upload()
    except HTTPProblem:
        await drain(request, timeout_s=cfg.drain_timeout_s)
        raise
    try:
        job = await _receive_job(request, manager)
    finally:
        manager.end_upload()
    try:
        return job, manager.enqueue(job)
    except HTTPProblem:
        shutil.rmtree(job.dir, ignore_errors=True)
        raise


async def _receive_job(request, manager: JobManager) -> Job:
    """Read one ``POST /jobs`` body into a new job folder and make its :class:`Job` (not queued yet);
    on any refusal the folder is removed and the rest of the body read (bounded) or dropped."""
    cfg = manager.cfg
    jdir = None
    try:
        check_declared_size(request, cfg.max_upload_bytes)
        jid, jdir = manager.new_job_dir()
        sink = await receive_multipart(request, jdir / "inputs", cfg.max_upload_bytes, cfg)
        model, params = params_from_fields(sink.fields, manager.default_model(), cfg.params)
        bundle = manager.bundle(model)
        uploads = map_uploads(sink.files, bundle.channel_names)
        if not uploads:
            raise HTTPProblem(400, "no files uploaded", "upload one file per channel: " + ", ".join(bundle.channel_names))
        names = {path: Path(client).name or path.name for _field, path, client in sink.files}
        inputs = await _prepared_inputs(manager, uploads, names)
        return Job(id=jid, dir=jdir, model=model, params=params, inputs=inputs, channels=bundle.channel_names,
                   client_names=[names[p] for p in uploads])
    except BaseException as e:
        if jdir is not None:
            shutil.rmtree(jdir, ignore_errors=True)
        if isinstance(e, Exception) and not getattr(e, "drained", False):
            await drain(request, timeout_s=cfg.drain_timeout_s)
        raise


async def _prepared_inputs(manager: JobManager, uploads: list[Path], names: dict[Path, str]) -> list[Path]:
    """Each zip becomes its series folder now (off the event loop): a broken zip is the client's 400, not a failed job."""
    from starlette.concurrency import run_in_threadpool

    try:
        return [await run_in_threadpool(prepare_input, p, manager.cfg.max_upload_bytes, names[p]) for p in uploads]
    except InputError as e:
        raise HTTPProblem(400, manager.redact(e.problem), e.fix or "") from None


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------
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
