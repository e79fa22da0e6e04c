"""Client side of the JSON-lines worker (:mod:`UNetSegmentLib.serving.worker`), polled from the GUI thread.

Local runs go to one warm worker (:class:`WarmWorker`): ``<python> -m UNetSegmentLib.serving.worker
--serve`` started in Slicer's startup environment with its stdin piped. It is kept alive between
runs, so a later Segment click pays neither the process start nor the imports. Each run
(:class:`WarmRun`) sends the path of its request.json on stdin. A reader thread only queues the
worker's output lines; a ``qt.QTimer`` drains the queue on the main thread every :data:`POLL_MS` ms
and calls back, so MRML and widgets are only touched from the GUI thread and the GUI never waits in
a loop. Stopping creates the request's stop file and sends ``cancel`` (the run stops within a
second); a run still going :data:`KILL_AFTER_S` later has its worker killed, and the next run starts
a fresh one, as after a crash or the worker's idle exit.

:class:`ServerProcess` is the same for a run on a UNetSegment server (``unetsegment serve``): the
HTTP calls happen in :class:`~UNetSegmentLib.serving.client.RemoteProcess`'s background thread and
the same kind of timer delivers its events on the GUI thread.
"""
from __future__ import annotations

import atexit
import json
import os
import queue
import shutil
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Protocol

from ..serving.client import RemoteProcess
from ..serving.worker import IDLE_TIMEOUT_S

#: a poll with nothing queued costs microseconds; a short period keeps the wait after the worker's
#: last line (half the period on average) out of the click's time
POLL_MS = 20
KILL_AFTER_S = 1.5
#: a warm worker idle this close to its idle timeout is retired by the client, not sent a request
RETIRE_MARGIN_S = 5.0
#: QSettings key of a user-chosen Python for the worker (default: PythonSlicer)
PYTHON_SETTING = "UNetSegment/PythonExecutable"


def read_lines_in_background(proc, name: str) -> tuple[queue.Queue, threading.Thread]:
    """Queue ``proc``'s output lines from a daemon thread (``None`` once the output ends); the GUI
    thread only drains the queue, so it never waits on the process."""
    q: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_queue_lines, args=(proc, q), daemon=True, name=name)
    reader.start()
    return q, reader


def _queue_lines(proc, q: queue.Queue) -> None:
    try:
        for line in iter(proc.stdout.readline, ""):
            q.put(line)
    except (OSError, ValueError):  # the pipe closed under us: the output has ended
        pass
    finally:
        q.put(None)  # end of output, always: a run waiting on it must end


def poll_timer(callback: Callable[[], None]):
    """A started, repeating ``qt.QTimer`` that calls ``callback`` on the GUI thread every :data:`POLL_MS` ms."""
    import qt

    timer = qt.QTimer()
    timer.setInterval(POLL_MS)
    timer.connect("timeout()", callback)
    timer.start()
    return timer


def parse_line(line: str) -> dict:
    """One worker output line as an event; anything that is not a JSON event becomes a log event."""
    text = line.rstrip("\r\n")
    if text.startswith("{"):
        try:
            ev = json.loads(text)
            if isinstance(ev, dict) and "event" in ev:
                return ev
        except ValueError:
            pass
    return {"event": "log", "level": "info", "message": text}


def worker_python() -> str:
    """The configured Python, else ``PythonSlicer`` (Slicer's Python with its site-packages), else this one."""
    try:
        import slicer

        configured = slicer.util.settingsValue(PYTHON_SETTING, "")
    except Exception:  # noqa: BLE001 - no Slicer settings (tests, plain Python)
        configured = os.environ.get("UNETSEGMENT_WORKER_PYTHON", "")
    if configured:
        return str(configured)
    return shutil.which("PythonSlicer") or sys.executable


def package_parent() -> Path:
    """The folder holding ``UNetSegmentLib`` (the worker's working directory, so ``-m`` finds it)."""
    return Path(__file__).resolve().parent.parent.parent


class ProcessProtocol(Protocol):
    def start(self, request_path: str, stop_file: str) -> None: ...
    def stop(self) -> None: ...
    def is_running(self) -> bool: ...


def launch_piped(command: list[str]):
    """``command`` in Slicer's startup environment (as ``slicer.util.launchConsoleProcess`` runs it)
    with a stdin pipe too, stdout and stderr merged, text lines."""
    import subprocess

    import slicer

    kwargs = {}
    if os.name == "nt":  # no console window; below Slicer's priority (POSIX: the worker's --low-priority)
        info = subprocess.STARTUPINFO()
        info.dwFlags, info.wShowWindow = 1, 0
        kwargs.update(startupinfo=info, creationflags=subprocess.BELOW_NORMAL_PRIORITY_CLASS)
    env = {**slicer.util.startupEnvironment(), "PYTHONIOENCODING": "utf-8"}  # both ends speak UTF-8
    return subprocess.Popen(command, env=env, cwd=str(package_parent()), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs)


class WarmWorker:
    """One long-lived worker process (``worker --serve --low-priority``) shared by a logic's runs.

    It is started by the first run and kept between runs, so a later run pays neither the process start
    nor the imports, and reuses the built network. It exits by itself after ``idle_timeout_s`` without
    a request; the client retires it itself :data:`RETIRE_MARGIN_S` before that, so a request never
    meets a worker on its way out. :meth:`shutdown` ends it (module cleanup and reload; and when this
    object is collected or the application exits). A worker found dead at the next run (crash, a
    cancel it could not honour in time) is replaced by a fresh one.
    """

    _instances: "weakref.WeakSet[WarmWorker]" = weakref.WeakSet()

    def __init__(self, python: str | None = None, idle_timeout_s: float = IDLE_TIMEOUT_S,
                 launch: Callable[[list[str]], object] = launch_piped):
        self.python = python
        self.idle_timeout_s = idle_timeout_s
        self.launch = launch
        self.proc = None
        self.starts = 0  # processes started so far
        self.started_event = False  # the current process has said "started"
        self.said_exit = False  # ... and "exit" (idle): it takes no more requests
        self._queue: queue.Queue = queue.Queue()
        self._settled = True  # False after a cancel, until the worker said "ready" or ended
        self._idle_since = time.monotonic()
        WarmWorker._instances.add(self)

    @classmethod
    def shutdown_all(cls) -> None:
        """End every warm worker of this process (application exit, test teardown)."""
        for w in list(cls._instances):
            w.shutdown()

    def command(self) -> list[str]:
        return [self.python or worker_python(), "-m", "UNetSegmentLib.serving.worker", "--serve", "--low-priority",
                "--idle-timeout", f"{self.idle_timeout_s:g}"]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def submit(self, request_path: str) -> None:
        """Send a request (its content, as one ASCII JSON line), to the running worker or else a fresh one."""
        line = json.dumps(json.loads(Path(request_path).read_text(encoding="utf-8")), ensure_ascii=True)
        self._settle()
        if self.alive() and time.monotonic() - self._idle_since > self.idle_timeout_s - RETIRE_MARGIN_S:
            self.shutdown()  # about to exit by itself: retire it rather than race its exit
        if not self.alive():
            self._start()
        try:
            self._send(line)
        except OSError:  # it ended between the check and the write
            self._start()
            self._send(line)

    def cancel(self) -> None:
        """Ask the running request to stop (a ``cancel`` line; the request's stop file is the other way)."""
        self._settled = False
        try:
            self._send("cancel")
        except OSError:
            pass

    def next_line(self):
        """The next output line, ``None`` once the process has ended, or ``queue.Empty``; notes
        ``started`` and ``exit``."""
        line = self._queue.get_nowait()
        if line is not None:
            kind = parse_line(line).get("event")
            self.started_event |= kind == "started"
            self.said_exit |= kind == "exit"
        return line

    def run_ended(self) -> None:
        """A run has finished: the idle time counts from now."""
        self._idle_since = time.monotonic()

    def restart(self) -> None:
        """Replace the process by a fresh one (after it ended before taking a request)."""
        self._start()

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()

    def shutdown(self, wait_s: float = 1.0) -> None:
        """End the worker: ``quit``, then a kill if it is still alive ``wait_s`` later."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        _end_process(proc, wait_s)

    def _start(self) -> None:
        if self.proc is not None:
            self.kill()
            self.proc.wait()
        self.proc = self.launch(self.command())
        self._queue, _ = read_lines_in_background(self.proc, "unetsegment-warm-worker-reader")
        self._settled, self.started_event, self.said_exit = True, False, False
        self._idle_since = time.monotonic()
        weakref.finalize(self, _end_process, self.proc, 0.0)  # collected with the process still running: end it
        self.starts += 1

    def _send(self, line: str) -> None:
        if self.proc is None or self.proc.stdin is None:
            raise OSError("no worker")
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _settle(self, timeout_s: float = KILL_AFTER_S) -> None:
        """Before a request: drop what the idle worker printed since (``ready``); a worker that has said
        ``exit`` or ended is let go. After a cancel, wait until it is ready again or has ended; one still
        busy then is killed."""
        deadline = time.monotonic() + (0.0 if self._settled else timeout_s)
        while self.proc is not None:
            if not self._settled and not self.alive():
                break  # it has ended: nothing more will come
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic())) if not self._settled \
                    else self._queue.get_nowait()
            except queue.Empty:
                if not self._settled:
                    self.kill()
                break
            kind = None if line is None else parse_line(line).get("event")
            if line is None or kind == "exit":  # it has ended, or is ending: a fresh one is started
                _end_process(self.proc, 5.0)
                self.proc = None
                break
            if kind == "ready":
                self._settled = True
        if self.proc is not None and not self.alive():
            self.proc.wait()
            self.proc = None
        self._settled = True


def _end_process(proc, wait_s: float) -> None:
    """``quit`` and close the stdin of a worker process, then kill it if it is alive ``wait_s`` later."""
    try:
        if proc.poll() is None:
            proc.stdin.write("quit\n")
            proc.stdin.flush()
        proc.stdin.close()
        proc.wait(timeout=wait_s)
    except Exception:  # noqa: BLE001 - broken pipe, timeout: it goes anyway
        proc.kill()
        proc.wait()


atexit.register(WarmWorker.shutdown_all)


class WarmRun:
    """One run on a :class:`WarmWorker`, with :class:`ProcessProtocol`: ``on_event`` gets the
    run's events and ``on_finished(code)`` its end (0, or the error event's exit code). A worker that
    ends before the run's final event gives a ``WorkerStopped`` error (exit code 1 if it had none); one
    that had said ``exit`` (idle) before taking the request is replaced and the request sent again."""

    def __init__(self, worker: WarmWorker, on_event: Callable[[dict], None], on_finished: Callable[[int], None]):
        self.worker = worker
        self.on_event = on_event
        self.on_finished = on_finished
        self.request_path: str | None = None
        self.stop_file: Path | None = None
        self.stop_requested_at: float | None = None
        self._seen = False  # an event of this run has arrived
        self._resent = False
        self._timer = None

    def start(self, request_path: str, stop_file: str) -> None:
        if self.is_running():
            raise RuntimeError("a segmentation is already running")
        self.request_path = str(request_path)
        self.stop_file = Path(stop_file)
        self.stop_requested_at = None
        self._seen = self._resent = False
        self.worker.submit(self.request_path)
        self._timer = poll_timer(self.poll)

    def is_running(self) -> bool:
        return self._timer is not None

    def stop(self) -> None:
        """Ask the run to stop (stop file and a ``cancel`` line); :meth:`poll` kills the worker if the
        run has not ended :data:`KILL_AFTER_S` later."""
        if not self.is_running() or self.stop_requested_at is not None:
            return
        self.stop_requested_at = time.monotonic()
        try:
            self.stop_file.touch()
        except OSError:
            pass
        self.worker.cancel()

    def poll(self) -> None:
        """Drain the worker's lines (GUI thread); finish on the run's final event or the worker's end."""
        while self.is_running():
            try:
                line = self.worker.next_line()
            except queue.Empty:
                break
            if line is None:
                self._ended()
                return
            ev = parse_line(line)
            kind = ev.get("event")
            if kind in ("ready", "exit"):  # the previous run's end, or an idle exit: not this run's
                continue
            self._seen |= kind != "started"
            self.on_event(ev)
            if kind == "done":
                self._finish(0)
            elif kind == "error":
                self._finish(int(ev.get("exit_code", 1)))
        if self.is_running() and self.stop_requested_at is not None and time.monotonic() - self.stop_requested_at > KILL_AFTER_S:
            self.worker.kill()  # its end arrives as the None line: the run finishes as stopped

    def _ended(self) -> None:
        """The worker's output ended before this run's final event."""
        w = self.worker
        code = w.proc.wait() if w.proc is not None else 1
        if w.said_exit and not self._seen and not self._resent and self.stop_requested_at is None:
            self._resent = True  # it left (idle) without reading the request: a fresh one takes it
            w.restart()
            w.submit(self.request_path)
            return
        if not w.started_event:
            msg, fix = (f"the segmentation worker could not start (exit status {code}); its output is in the log",
                        "check the worker's Python and packages (the log names what failed)")
        else:
            msg, fix = (f"the segmentation worker stopped unexpectedly (exit status {code}) before the run finished; "
                        "nothing was added to the scene", "click Segment again: a fresh worker is started")
        self.on_event({"event": "error", "kind": "WorkerStopped", "exit_code": int(code or 1), "message": msg,
                       "problem": "the worker stopped", "fix": fix})
        self._finish(int(code or 1))

    def _finish(self, code: int) -> None:
        self._timer.stop()
        self._timer = None
        self.worker.run_ended()
        self.on_finished(code)


class ServerProcess(RemoteProcess):
    """A run on a server with :class:`ProcessProtocol` and events: a ``qt.QTimer`` calls
    :meth:`~UNetSegmentLib.serving.client.RemoteProcess.poll` every :data:`POLL_MS` ms, so callbacks
    run on the GUI thread while uploads, polling and downloads stay in the background thread."""

    def __init__(self, on_event: Callable[[dict], None], on_finished: Callable[[int], None], client, poll_s: float = 0.5):
        super().__init__(on_event, on_finished, client, poll_s=poll_s)
        self._timer = None

    def start(self, request_path: str, stop_file: str | None = None) -> None:
        super().start(request_path, stop_file)
        self._timer = poll_timer(self._tick)

    def _tick(self) -> None:
        try:
            self.poll()
        finally:
            if not self.is_running() and self._timer is not None:  # finished (even if a callback raised)
                self._timer.stop()
                self._timer = None
