"""Receiving a ``POST /jobs`` body: multipart parsing straight to disk, and the guards that keep a
slow, stalled or oversized upload from holding the server.

* 413: the declared ``Content-Length`` or the bytes received exceed ``max_upload_bytes``;
* 408: the body did not arrive within ``upload_timeout_s``, or after ``upload_grace_s`` came slower than
  ``upload_min_rate`` on average (:func:`body_chunks`, a slow-loris guard);
* 400: a malformed body, too many parts, an over-long field, an empty or unsupported file.

(503, too many uploads at once, is the job manager's count.) A refused body is still read for a
bounded time and size (:func:`drain`) so the client sees the answer rather than a reset connection.
Client file names never reach the file system: files are stored as ``inputN.<suffix>`` (0600).
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from .config import ServerConfig
from .problems import HTTPProblem

#: suffixes accepted for uploads (detached headers like .nhdr/.mhd cannot come as one file)
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".zip")
#: bytes of a refused body still read (so the client sees the 413 rather than a reset connection)
DRAIN_LIMIT = 16 << 20
MAX_FORM_PARTS = 64
MAX_FIELD_BYTES = 4096


class UploadTooSlow(HTTPProblem):
    """408: the body did not arrive in time; the connection is closed, nothing more is read."""

    drained = True


def upload_suffix(filename: str) -> str | None:
    """The accepted suffix ``filename`` ends with (case-insensitive), or None."""
    low = filename.lower()
    return next((s for s in UPLOAD_SUFFIXES if low.endswith(s)), None)


def too_large(problem: str) -> HTTPProblem:
    """413 ``problem``, with the one fix for every over-size upload."""
    return HTTPProblem(413, problem, "send smaller volumes (e.g. cropped or compressed .nii.gz) or ask the admin to raise "
                                     "--max-upload-mb")


def check_declared_size(request, max_bytes: int) -> None:
    """413 before reading when the request announces a body over ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise too_large(f"upload of {_mb(int(declared))} is larger than the server's limit of {_mb(max_bytes)}")


class MultipartSink:
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
            "on_part_begin": self._begin, "on_header_field": self._header_name, "on_header_value": self._header_value,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_done, "on_part_data": self._data,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_FORM_PARTS:
            raise HTTPProblem(400, f"too many form parts (limit {MAX_FORM_PARTS})", "send one file per channel and the parameters")
        self._headers, self._cur, self._value, self._size = {}, None, bytearray(), 0

    def _header_name(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._hname).decode("latin-1").lower()] = bytes(self._hvalue)
        self._hname, self._hvalue = bytearray(), bytearray()

    def _headers_done(self) -> None:
        from python_multipart.multipart import parse_options_header

        disp, opts = parse_options_header(self._headers.get("content-disposition", b""))
        name = opts.get(b"name")
        if disp != b"form-data" or name is None:
            raise HTTPProblem(400, "a form part has no name", "send multipart/form-data with named fields")
        fname = opts.get(b"filename")
        self._cur = (name.decode("utf-8", "replace"), None if fname is None else fname.decode("utf-8", "replace"))
        if fname is not None:
            self._open_file(self._cur[0], self._cur[1] or "")

    def _open_file(self, field_name: str, client_name: str) -> None:
        suffix = upload_suffix(client_name)
        if suffix is None:
            raise HTTPProblem(400, f"upload {client_name[:80]!r} ({field_name}) is not a supported file type",
                              "upload NIfTI (.nii, .nii.gz), NRRD (.nrrd), MHA (.mha) or a .zip of one DICOM series")
        path = self.folder / f"input{len(self.files)}{suffix}"
        self._fh = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")  # patient data
        self.files.append((field_name, path, client_name))

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
            self.close()
            if self._size == 0:
                raise HTTPProblem(400, f"upload {self.files[-1][2][:80]!r} ({self.files[-1][0]}) is empty", "send the volume's bytes")
        elif self._cur is not None:
            self.fields.append((self._cur[0], self._value.decode("utf-8", "replace")))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _next_deadline(t0: float, received: int, cfg: ServerConfig) -> float:
    """When the next chunk must have come: the whole-body limit, or (after the grace period) the minimum rate."""
    by_rate = received / cfg.upload_min_rate if cfg.upload_min_rate > 0 else float("inf")
    return t0 + min(cfg.upload_timeout_s, max(cfg.upload_grace_s, by_rate))


def _too_slow(received: int, elapsed: float, cfg: ServerConfig) -> UploadTooSlow:
    if elapsed >= cfg.upload_timeout_s:
        problem = f"upload not complete after {elapsed:.0f} s (limit {cfg.upload_timeout_s:.0f} s)"
    else:
        problem = (f"upload too slow: {received} bytes in {elapsed:.1f} s (the server needs at least "
                   f"{cfg.upload_min_rate / 1024:.0f} KiB/s after the first {cfg.upload_grace_s:.0f} s)")
    return UploadTooSlow(408, problem, "send the whole request at once over a faster link (or ask the admin about the "
                                       "upload limits)", {"Connection": "close"})


async def body_chunks(request, cfg: ServerConfig):
    """``request.stream()`` under the body deadline: the whole body within ``upload_timeout_s``, and after
    ``upload_grace_s`` at least ``upload_min_rate`` bytes/s on average — a stalled or trickling client
    (slow loris) is cut off with :class:`UploadTooSlow` instead of holding the server."""
    it = request.stream().__aiter__()
    t0 = time.monotonic()
    n = 0
    while True:
        left = _next_deadline(t0, n, cfg) - time.monotonic()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(it.__anext__(), timeout=left)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise _too_slow(n, time.monotonic() - t0, cfg) from None
        n += len(chunk)
        yield chunk


async def receive_multipart(request, folder: Path, max_bytes: int, cfg: ServerConfig | None = None) -> MultipartSink:
    """Stream a multipart body into ``folder`` (files) and memory (fields), at most ``max_bytes``,
    under ``cfg``'s body deadline (see :func:`body_chunks`)."""
    from python_multipart.multipart import MultipartParser, parse_options_header
    from starlette.requests import ClientDisconnect

    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not opts.get(b"boundary"):
        raise HTTPProblem(415, "POST /jobs takes multipart/form-data", "upload one file per channel as form files plus parameter fields")
    sink = MultipartSink(folder)
    parser = MultipartParser(opts[b"boundary"], sink.callbacks())
    problem: HTTPProblem | None = None
    total = drained = 0
    try:
        async for chunk in body_chunks(request, cfg or ServerConfig()):
            total += len(chunk)
            if problem is None:
                problem = too_large(f"upload larger than the server's limit of {_mb(max_bytes)}") if total > max_bytes \
                    else _feed(parser, chunk)
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
    """Give ``chunk`` (None: the end) to the parser; the problem it raised, if any."""
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


async def drain(request, limit: int = DRAIN_LIMIT, timeout_s: float = 5.0) -> None:
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


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
