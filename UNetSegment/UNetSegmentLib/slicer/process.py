"""Client side of the JSON-lines worker (:mod:`UNetSegmentLib.serving.worker`), polled from the GUI thread.

The worker runs as ``<python> -m UNetSegmentLib.serving.worker --request request.json`` started with
``slicer.util.launchConsoleProcess`` (stdout and stderr merged). A reader thread only queues lines;
a ``qt.QTimer`` drains the queue on the main thread every :data:`POLL_MS` ms and calls back, so
MRML and widgets are only touched from the GUI thread and the GUI never waits in a loop.
Stopping creates the request's stop file (the worker exits within a second); a process still
alive :data:`KILL_AFTER_S` later is killed.

:class:`ServerProcess` is the same for a run on a UNetSegment server (``unetsegment serve``): the
HTTP calls happen in :class:`~UNetSegmentLib.serving.client.RemoteProcess`'s background thread and
the same kind of timer delivers its events on the GUI thread.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

from ..serving.client import RemoteProcess

POLL_MS = 100
KILL_AFTER_S = 1.5
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
    for line in iter(proc.stdout.readline, ""):
        q.put(line)
    q.put(None)  # end of output


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


class WorkerProcess:
    """Starts the worker and delivers its events to ``on_event`` and its end to ``on_finished(code)``."""

    def __init__(self, on_event: Callable[[dict], None], on_finished: Callable[[int], None], python: str | None = None):
        self.on_event = on_event
        self.on_finished = on_finished
        self.python = python
        self.proc = None
        self.stop_file: Path | None = None
        self.stop_requested_at: float | None = None
        self._queue: queue.Queue = queue.Queue()
        self._reader: threading.Thread | None = None
        self._timer = None

    def command(self, request_path: str) -> list[str]:
        return [self.python or worker_python(), "-m", "UNetSegmentLib.serving.worker", "--request", str(request_path)]

    def start(self, request_path: str, stop_file: str) -> None:
        import slicer

        if self.is_running():
            raise RuntimeError("a segmentation is already running")
        self.stop_file = Path(stop_file)
        self.stop_requested_at = None
        self.proc = slicer.util.launchConsoleProcess(self.command(request_path), cwd=str(package_parent()))
        self._queue, self._reader = read_lines_in_background(self.proc, "unetsegment-worker-reader")
        self._timer = poll_timer(self.poll)

    def is_running(self) -> bool:
        return self.proc is not None and self._timer is not None

    def stop(self) -> None:
        """Ask the worker to stop (stop file); :meth:`poll` kills it if it is still alive later."""
        if not self.is_running():
            return
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
            try:
                self.stop_file.touch()
            except OSError:
                self.proc.kill()

    def poll(self) -> None:
        """Drain queued lines (GUI thread); on end of output, reap the process and report."""
        ended = False
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                ended = True
                break
            self.on_event(parse_line(line))
        if not ended and self.stop_requested_at is not None and time.monotonic() - self.stop_requested_at > KILL_AFTER_S:
            self.proc.kill()
        if ended:
            self._timer.stop()
            self._timer = None
            code = self.proc.wait()
            self.proc = None
            self.on_finished(int(code))


class ServerProcess(RemoteProcess):
    """A run on a server with :class:`WorkerProcess`'s interface and events: a ``qt.QTimer`` calls
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
