"""JSON-lines worker: ``segment`` runs in a process of their own, for the Slicer module: one run, or warm (many).

Run as ``python -m UNetSegmentLib.serving.worker --request request.json`` (or ``PythonSlicer -m ...`` with
the folder holding ``UNetSegmentLib`` as working directory). ``request.json``::

    {"inputs": ["ct.nrrd"], "output_dir": "out", "model": "tiny-blob" | "/path/bundle" | null,
     "params": {<SegmentParams fields>}, "overwrite": false, "stop_file": "out.stop" | null, "report": true}

``"report": false`` leaves out ``report.png`` (the Slicer module shows the result in its views and
renders the report only when the user exports; :func:`.rethreshold.export_run` writes it then).

It calls :func:`.job.segment_files` (or, for ``"kind": "compare"`` with a ``"prior"``, :func:`.compare.compare_files`;
``"rules"`` and ``"affine"`` as the ``compare`` command's options) and prints one JSON object per line on stdout:

* ``{"event": "started", "pid": ..., "version": ...}``
* ``{"event": "progress", "stage": ..., "fraction": 0..1, "overall": 0..1, "eta_s": s | null, "message": ...}``
  — stages in :data:`STAGES` order; ``eta_s`` is the time left in the current stage.
* ``{"event": "log", "level": "info" | "warning" | "error", "message": ...}``
* ``{"event": "done", "output_dir": ..., "summary": {...}, "elapsed_s": ...}`` — exit status 0 (a warm
  worker adds ``networks_built``: the networks it has built so far)
* ``{"event": "error", "kind": "InputError", "exit_code": 3, "message": ..., "problem": ..., "fix": ...}``
  — exit status ``exit_code`` (the CLI's codes; cancel is ``CancelledError``/130, running out of GPU
  memory is ``OutOfMemoryError``/5 with ``"offer_cpu": true``, a missing package ``MissingDependency``/1).

**Warm mode** (``--serve [--idle-timeout S]``): the process stays alive between runs, so the second
run pays neither the process start nor the imports (PyTorch, SciPy, Matplotlib), and reuses the built
network (:class:`.model_cache.ModelCache`). After ``started`` it reads stdin lines: a request (the
path of a ``request.json``, or the JSON object itself) starts a run with the events above; ``cancel``
stops the running one; ``quit`` (or the end of stdin) ends the process. After each run's final event
it prints ``{"event": "ready", "exit_code": ...}`` and waits for the next line. With no request for
``--idle-timeout`` seconds (default :data:`IDLE_TIMEOUT_S`) it prints ``{"event": "exit", "reason":
"idle"}`` and ends, releasing its memory. A run that does not stop within the grace below ends
the process; the client then starts a fresh one for the next run.

Cancel is cooperative: creating ``stop_file``, a ``cancel`` line on stdin (``--stdin-cancel``),
SIGTERM, or the parent process going away sets the :class:`.inference.CancelToken`, which the
engine checks between windows. If the run has not stopped :data:`CANCEL_GRACE_S` later (e.g. while
importing torch or resampling), the worker removes its staging folder and exits anyway, so it is
gone within a second. The core's staging guarantees that a stopped run leaves no outputs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from .. import __version__
from ..engine.fallback import is_out_of_memory
from ..errors import CancelledError, UNetSegmentError, UsageError
from ..io.jsonable import json_default
from ..params import SegmentParams

# Nothing imported at module level may start threads (numpy's BLAS pool does): main() must block
# SIGTERM before any thread exists, see _watch_sigterm. The core's heavier modules load in run().

#: stages in the order a run passes them (gradcam only when requested)
STAGES = ("load", "preprocess", "inference", "gradcam", "postprocess", "write")
#: relative share of each stage in the overall fraction
STAGE_WEIGHTS = {"load": 0.08, "preprocess": 0.07, "inference": 0.55, "gradcam": 0.2, "postprocess": 0.04, "write": 0.06}
POLL_S = 0.05
CANCEL_GRACE_S = 0.5
#: ``--low-priority``: the worker's niceness increment (POSIX)
LOW_PRIORITY_NICE = 10
#: a warm worker with no request for this long exits (its memory goes back to the system)
IDLE_TIMEOUT_S = 600.0
PROGRESS_MIN_INTERVAL_S = 0.1


class Emitter:
    """Writes events as JSON lines to the real stdout (thread-safe); nothing after the final event."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.lock = threading.Lock()
        self.final_sent = False

    def emit(self, event: str, final: bool = False, **fields) -> bool:
        line = json.dumps({"event": event, **fields}, default=json_default)
        with self.lock:
            if self.final_sent:
                return False
            self.stream.write(line + "\n")
            self.stream.flush()
            if final:
                self.final_sent = True
        return True

    def reset(self) -> None:
        """A warm worker's next run: events may be written again."""
        with self.lock:
            self.final_sent = False


class ProgressReporter:
    """Turns the engine's ``(stage, fraction, message)`` callbacks into throttled progress events."""

    def __init__(self, emitter: Emitter, heatmaps) -> None:
        self.emitter = emitter
        self.stages = [s for s in STAGES if s != "gradcam" or "gradcam" in heatmaps]
        total = sum(STAGE_WEIGHTS[s] for s in self.stages)
        self.weights = {s: STAGE_WEIGHTS[s] / total for s in self.stages}
        self.stage = None
        self.stage_t0 = time.perf_counter()
        self.last_emit = 0.0

    def overall(self, stage: str, fraction: float) -> float:
        if stage not in self.weights:
            return 0.0
        before = sum(self.weights[s] for s in self.stages[: self.stages.index(stage)])
        return min(1.0, before + self.weights[stage] * max(0.0, min(1.0, fraction)))

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        if stage == "done":  # the engine finished; the job now writes the files
            stage, fraction, message = "write", 0.0, "writing outputs"
        now = time.perf_counter()
        if stage != self.stage:
            self.stage, self.stage_t0 = stage, now
        elif fraction < 1.0 and now - self.last_emit < PROGRESS_MIN_INTERVAL_S:
            return
        self.last_emit = now
        el = now - self.stage_t0
        eta = el / fraction - el if 0.0 < fraction < 1.0 else (0.0 if fraction >= 1.0 else None)
        self.emitter.emit("progress", stage=stage, fraction=round(float(fraction), 4),
                          overall=round(self.overall(stage, fraction), 4),
                          eta_s=None if eta is None else round(eta, 1), message=message or "")


def error_event(exc: BaseException, device: str = "auto") -> dict:
    """The ``error`` event's fields for an exception (see the module docstring)."""
    if isinstance(exc, UNetSegmentError):
        return {"kind": type(exc).__name__, "exit_code": exc.exit_code, "message": str(exc),
                "problem": exc.problem, "fix": exc.fix}
    if is_out_of_memory(exc):
        on_cpu = str(device).strip().lower() == "cpu"
        return {"kind": "OutOfMemoryError", "exit_code": 5, "offer_cpu": not on_cpu,
                "message": f"out of {'memory' if on_cpu else 'GPU memory'}: {str(exc).splitlines()[0][:200]}",
                "problem": "the device ran out of memory",
                "fix": "close other GPU programs or run on the CPU" if not on_cpu else "use a smaller ROI or close other programs"}
    if isinstance(exc, ModuleNotFoundError):
        return {"kind": "MissingDependency", "exit_code": 1, "module": exc.name,
                "message": f"Python package {exc.name!r} is not installed in the worker's Python",
                "problem": f"missing package {exc.name}", "fix": "install UNetSegment's requirements (the module offers to)"}
    return {"kind": "InternalError", "exit_code": 1, "message": f"{type(exc).__name__}: {exc}",
            "problem": "internal error", "fix": "report it with the log"}


class StopWatcher:
    """Background thread: sets the cancel token on a stop request and enforces the exit deadline."""

    def __init__(self, token, emitter: Emitter, stop_file: Path | None, output_dir: Path,
                 stdin_cancel: bool = False) -> None:
        self.token = token
        self.emitter = emitter
        self.stop_file = stop_file
        self.output_dir = output_dir
        self.parent = os.getppid()
        self.requested_at: float | None = None
        self.reason = ""
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="unetsegment-stop-watcher", daemon=True)
        if stdin_cancel:
            threading.Thread(target=self._read_stdin, name="unetsegment-stdin", daemon=True).start()

    def start(self) -> "StopWatcher":
        self._thread.start()
        return self

    def request(self, reason: str) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            self.reason = reason
        self.token.cancel()

    def _read_stdin(self) -> None:
        for line in sys.stdin:
            if line.strip().lower() in ("cancel", "stop"):
                self.request("cancel on stdin")
                return

    def close(self) -> None:
        """The run is over (a warm worker goes on): stop watching. Joined, so that no late stop request
        can end the process after the run's final event."""
        self._closed = True
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while not self._closed:
            if self.requested_at is None:
                if self.stop_file is not None and self.stop_file.exists():
                    self.request("stop file")
                elif os.getppid() != self.parent:
                    self.request("parent process exited")
            elif time.monotonic() - self.requested_at >= CANCEL_GRACE_S:
                self._hard_exit()
            time.sleep(POLL_S)

    def _hard_exit(self) -> None:
        from ..io.outputs import STAGING_PREFIX

        if self.emitter.emit("error", final=True, kind="CancelledError", exit_code=CancelledError.exit_code,
                             message=f"run cancelled ({self.reason}) — no outputs were written",
                             problem="run cancelled", fix="start it again when ready"):
            for p in self.output_dir.glob(f"{STAGING_PREFIX}{os.getpid()}-*"):
                shutil.rmtree(p, ignore_errors=True)
            sys.stderr.flush()
            os._exit(CancelledError.exit_code)


def _watch_sigterm(watcher: StopWatcher) -> None:
    """SIGTERM sets the cancel token at once, even while the main thread is inside a long torch call.

    A Python signal handler would only run when the main thread returns to the interpreter, so on
    POSIX SIGTERM is blocked in every thread (:func:`main` blocks it before any thread exists;
    threads started later, e.g. numpy's and torch's pools, inherit the mask) and a daemon thread
    waits for it with ``sigwait``.
    """
    if _SIGTERM_BLOCKED:

        def wait() -> None:
            signal.sigwait({signal.SIGTERM})
            watcher.request("SIGTERM")

        threading.Thread(target=wait, name="unetsegment-sigterm", daemon=True).start()
    else:  # Windows: terminate() is TerminateProcess, no handler runs anyway
        signal.signal(signal.SIGTERM, lambda *_: watcher.request("SIGTERM"))


def read_request(path: str | os.PathLike) -> dict:
    return checked_request(json.loads(Path(path).read_text(encoding="utf-8")), f"request {path}")


def params_from_request(d: dict | None) -> SegmentParams:
    """The request's ``params`` (JSON values, e.g. :meth:`.SegmentParams.as_dict`), validated;
    :class:`UsageError` names an unknown parameter or a bad value."""
    if d is not None and not isinstance(d, dict):
        raise UsageError(f"the request's params is {type(d).__name__}, not an object", "give params as a JSON object")
    return SegmentParams.from_mapping(d or {})


_SIGTERM_BLOCKED = False


def _block_sigterm() -> None:
    global _SIGTERM_BLOCKED
    if hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigwait") and threading.active_count() == 1:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        _SIGTERM_BLOCKED = True


def run(request: dict, emitter: Emitter, stdin_cancel: bool = False, inbox: "Inbox | None" = None,
        models=None) -> int:
    """Do one request; emit its events; return the exit status.

    ``inbox``: a warm worker's stdin (its ``cancel`` lines and SIGTERM reach this run's watcher);
    ``models``: its :class:`.model_cache.ModelCache`."""
    from ..engine.inference import CancelToken

    t0 = time.perf_counter()
    token = CancelToken()
    out = Path(request["output_dir"])
    stop = Path(request["stop_file"]) if request.get("stop_file") else None
    watcher = StopWatcher(token, emitter, stop, out, stdin_cancel and inbox is None)
    if inbox is None:
        _watch_sigterm(watcher)
    else:
        inbox.current = watcher
    watcher.start()
    try:
        return _run(request, emitter, token, watcher, out, t0, models)
    finally:
        watcher.close()
        if inbox is not None:
            inbox.current = None


def _run(request: dict, emitter: Emitter, token, watcher: StopWatcher, out: Path, t0: float, models) -> int:
    device = "auto"
    try:
        params = params_from_request(request.get("params"))
        device = params.device
        reporter = ProgressReporter(emitter, params.heatmaps)
        reporter("load", 0.0, "loading the model and reading the inputs")
        token.check()
        if request.get("kind", "segment") == "compare":
            summary = _compare(request, params, reporter, token)
        else:
            from .job import segment_files  # imports torch: may take a while, cancellable by the watcher

            summary = segment_files(request["inputs"], out, request.get("model"), params,
                                    bool(request.get("overwrite", False)), reporter, token, models,
                                    report=bool(request.get("report", True)))
        for w in summary.get("warnings", []):
            emitter.emit("log", level="warning", message=w)
        emitter.emit("progress", stage="write", fraction=1.0, overall=1.0, eta_s=0.0, message="")
        warm = {} if models is None else {"networks_built": models.builds}
        emitter.emit("done", final=True, output_dir=str(out), summary=summary,
                     elapsed_s=round(time.perf_counter() - t0, 3), **warm)
        return 0
    except BaseException as e:  # noqa: BLE001 - every failure becomes one error event
        if isinstance(e, KeyboardInterrupt):
            e = CancelledError("run cancelled", "start it again when ready")
        if token.cancelled and not isinstance(e, UNetSegmentError):
            e = CancelledError("run cancelled", "start it again when ready")
        if isinstance(e, CancelledError) and watcher.reason:
            e = CancelledError(f"run cancelled ({watcher.reason}) — no outputs were written", "start it again when ready")
        ev = error_event(e, device)
        if ev["kind"] == "InternalError":
            emitter.emit("log", level="error", message="".join(traceback.format_exception(type(e), e, e.__traceback__)))
        emitter.emit("error", final=True, **ev)
        return int(ev["exit_code"])


def _compare(request: dict, params: SegmentParams, reporter, token) -> dict:
    """A ``"kind": "compare"`` request: ``prior`` (scan or run folder), ``inputs`` (the current scan or its run
    folder), optional ``rules`` (:class:`..analysis.followup.ChangeRules` fields) and ``affine``; the
    comparison.json dict."""
    from ..analysis.followup import ChangeRules
    from .compare import compare_files

    if "prior" not in request:
        raise UsageError("the compare request lacks 'prior'", "give the prior scan or run folder")
    try:
        rules = ChangeRules(**(request.get("rules") or {}))
    except TypeError as e:
        raise UsageError(f"bad compare rules: {e}", "give stable_ml, stable_pct, expansion_ml, expansion_pct") from None
    return compare_files(request["prior"], request["inputs"], request["output_dir"], request.get("model"), params,
                         rules, bool(request.get("affine", False)), bool(request.get("overwrite", False)),
                         reporter, token)


class Inbox:
    """A warm worker's stdin, read by a daemon thread: requests are queued for the main loop (``None``:
    quit), ``cancel`` lines go straight to the running request's watcher (``current``)."""

    def __init__(self, stream) -> None:
        import queue

        self.requests: "queue.Queue[str | None]" = queue.Queue()
        self.current: StopWatcher | None = None
        threading.Thread(target=self._read, args=(stream,), name="unetsegment-inbox", daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            text = line.strip()
            if text.lower() in ("cancel", "stop"):
                self.cancel("cancel on stdin")
            elif text.lower() == "quit":
                self.requests.put(None)
            elif text:
                self.requests.put(text)
        self.requests.put(None)  # end of stdin: the client has gone, so has any use of the running request
        self.cancel("stdin closed")

    def cancel(self, reason: str) -> None:
        current = self.current
        if current is not None:
            current.request(reason)


def serve(emitter: Emitter, idle_timeout_s: float, stream=None) -> int:
    """The warm worker's loop (module docstring): one run per request line until quit, EOF or idle."""
    import queue

    from .model_cache import ModelCache

    inbox = Inbox(stream if stream is not None else sys.stdin)
    if _SIGTERM_BLOCKED:  # SIGTERM: stop the running request, then end

        def wait() -> None:
            signal.sigwait({signal.SIGTERM})
            inbox.requests.put(None)
            inbox.cancel("SIGTERM")
            if inbox.current is None:
                os._exit(0)

        threading.Thread(target=wait, name="unetsegment-sigterm", daemon=True).start()
    from ..engine.acceleration import default_threads

    default_threads()  # torch's own thread count, seen before any run sets another
    models = ModelCache()
    while True:
        try:
            line = inbox.requests.get(timeout=idle_timeout_s)
        except queue.Empty:
            emitter.emit("exit", reason="idle", idle_timeout_s=idle_timeout_s)
            return 0
        if line is None:
            return 0
        try:
            request = _parse_request_line(line)
        except (OSError, ValueError) as e:
            emitter.emit("error", final=True, kind="UsageError", exit_code=2, message=f"bad request: {e}",
                         problem="bad request", fix="check the request file")
            code = 2
        else:
            code = run(request, emitter, inbox=inbox, models=models)
            _release_gpu_cache()
        emitter.reset()
        emitter.emit("ready", exit_code=code)


def _release_gpu_cache() -> None:
    """After a run: the memory PyTorch keeps reserved on a GPU goes back, so an idle warm worker does
    not hold it from other programs (the network stays on the CPU between runs)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _parse_request_line(line: str) -> dict:
    """A warm worker's request line: a JSON object, or the path of a request.json."""
    return checked_request(json.loads(line), "the request") if line.startswith("{") else read_request(line)


def checked_request(req, where: str) -> dict:
    """``req`` if it has the fields a request needs, of the right types; else ValueError naming the field."""
    if not isinstance(req, dict):
        raise ValueError(f"{where} is not a JSON object")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(p, str) for p in inputs):
        raise ValueError(f"{where} lacks 'inputs' (a list of paths)")
    if not isinstance(req.get("output_dir"), str):
        raise ValueError(f"{where} lacks 'output_dir' (a path)")
    for key in ("stop_file", "model", "prior"):
        if req.get(key) is not None and not isinstance(req[key], str):
            raise ValueError(f"{where}'s {key!r} is not a path")
    for key in ("overwrite", "report", "affine"):
        if key in req and not isinstance(req[key], bool):
            raise ValueError(f"{where}'s {key!r} is not true or false")
    return req


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m UNetSegmentLib.serving.worker", description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--request", help="request.json (see the module docstring)")
    mode.add_argument("--serve", action="store_true", help="warm mode: run the requests read from stdin, one per line")
    ap.add_argument("--stdin-cancel", action="store_true", help="also stop on a 'cancel' line on stdin")
    ap.add_argument("--low-priority", action="store_true",
                    help="run at a lower CPU priority (POSIX nice +10), so an application beside it stays responsive")
    ap.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT_S,
                    help=f"warm mode: exit after this many seconds without a request (default {IDLE_TIMEOUT_S:g})")
    a = ap.parse_args(argv)
    if a.low_priority and hasattr(os, "nice"):  # Windows: the client starts it BELOW_NORMAL_PRIORITY_CLASS
        os.nice(LOW_PRIORITY_NICE)
    _block_sigterm()
    # events own stdout; anything else printed (libraries, warnings) goes to stderr
    emitter = Emitter(sys.stdout)
    sys.stdout = sys.stderr
    emitter.emit("started", pid=os.getpid(), version=__version__, python=sys.version.split()[0],
                 **({"warm": True, "idle_timeout_s": a.idle_timeout} if a.serve else {}))
    if a.serve:
        return serve(emitter, a.idle_timeout)
    try:
        request = read_request(a.request)
    except (OSError, ValueError) as e:
        emitter.emit("error", final=True, kind="UsageError", exit_code=2, message=f"bad request: {e}",
                     problem="bad request", fix="check the request file")
        return 2
    return run(request, emitter, a.stdin_cancel)


if __name__ == "__main__":
    from ..engine.memory_reuse import reuse_freed_memory

    reuse_freed_memory()  # this process is ours: freed arrays are kept for the next step and run
    code = main()
    sys.stdout.flush()
    sys.exit(code)
