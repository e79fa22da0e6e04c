"""Write :class:`Image` volumes, Slicer ``.seg.nrrd`` segmentations, JSON and text, each atomically.

Atomic: the data goes to a temporary file in the destination folder, then ``os.replace`` moves it
into place, so a reader never sees a half-written file. :func:`atomic_path` is the package's one
temporary-file-and-rename helper (files get the mode a plain ``open()`` gives, 0666 & ~umask);
:func:`atomic_output` and :func:`write_text` add the one-line :class:`.OutputError`.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import OutputError
from ..image import Image, to_sitk
from .jsonable import json_default


def new_shared_file(directory: str | os.PathLike, prefix: str, suffix: str) -> Path:
    """Create a new, empty, uniquely named file with the mode a plain ``open()`` gives (0666 & ~umask).

    ``tempfile.mkstemp`` makes 0600 files, which would leave results private to whoever ran the tool
    (colleagues, a shared cluster file system or a PACS account could not read them); the kernel
    applies the umask here, so nothing reads or changes the process-wide umask (threads are safe).
    """
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = Path(directory) / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(path, flags, 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, f"no free temporary name in {directory}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path`` (mode 0666 & ~umask)."""
    dest = Path(path)
    suffix = "".join(dest.suffixes) or ".tmp"
    tmp = new_shared_file(dest.parent, f".{dest.stem}.", suffix)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`atomic_path` for a result file: an ``OSError`` (folder missing, read-only, disk full)
    becomes an :class:`.OutputError` naming the file and the fix."""
    try:
        with atomic_path(path) as tmp:
            yield tmp
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e}", "check that the folder exists and is writable") from e


def write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` to ``path`` atomically as UTF-8, line ends as given; return ``path`` as a string."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return os.fspath(path)


DETACHED_HEADER_SUFFIXES = (".mhd", ".nhdr")


def write_image(image: Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write a scalar volume (NIfTI, NRRD, MHA, MHD) in LPS, keeping its grid exactly."""
    import SimpleITK as sitk

    dest = Path(path)
    if dest.suffix.lower() in DETACHED_HEADER_SUFFIXES:
        # header + data file: write both under their final names in a private folder, then move
        # the data file first and the header last, so the header never points at a missing file
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.stem}.", dir=dest.parent))
        try:
            sitk.WriteImage(to_sitk(image), str(tmpdir / dest.name), useCompression=compress)
            for f in sorted(tmpdir.iterdir(), key=lambda f: f.name == dest.name):
                os.replace(f, dest.parent / f.name)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return
    with atomic_path(dest) as tmp:
        sitk.WriteImage(to_sitk(image), str(tmp), useCompression=compress)
        if ".nii" in dest.name.lower():  # ITK's NIfTI writer only prints when the disk is full
            from ..errors import InputError
            from .readers import _check_complete

            try:
                _check_complete(tmp)
            except InputError:
                raise OSError(errno.ENOSPC, f"incomplete write of {dest.name} (disk full?)") from None


#: numpy dtype → NRRD ``type``
_NRRD_TYPES = {"int8": "int8", "uint8": "uint8", "int16": "int16", "uint16": "uint16", "int32": "int32",
               "uint32": "uint32", "int64": "int64", "uint64": "uint64", "float32": "float", "float64": "double"}


def write_raw_nrrd(image: Image, path: str | os.PathLike) -> None:
    """An uncompressed ``.nrrd`` (LPS, the grid exactly) written straight from the array: no copy of a
    C-ordered array (SimpleITK's writer first copies the volume into an ITK image). For scratch
    files that another process reads at once (the Slicer module's inputs to its worker)."""
    arr = np.asarray(image.array)
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    if arr.ndim != 3 or arr.dtype.name not in _NRRD_TYPES:
        raise ValueError(f"write_raw_nrrd writes 3D scalar volumes of {', '.join(_NRRD_TYPES)}, not "
                         f"{arr.ndim}D {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))  # K, J, I in C order: NRRD's i-fastest
    lps = image.ijk_to_lps

    def vector(v) -> str:
        return "(" + ",".join(repr(float(x)) for x in v) + ")"

    header = "\n".join([
        "NRRD0004",
        f"type: {_NRRD_TYPES[arr.dtype.name]}",
        "dimension: 3",
        "space: left-posterior-superior",
        "sizes: " + " ".join(str(n) for n in arr.shape[::-1]),
        "space directions: " + " ".join(vector(lps[:3, c]) for c in range(3)),
        "kinds: domain domain domain",
        "endian: little",
        "encoding: raw",
        "space origin: " + vector(lps[:3, 3]),
    ]) + "\n\n"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(memoryview(arr).cast("B"))  # not ndarray.tofile, which loses an error in its last buffered block


def write_json(obj, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=json_default) + "\n", encoding="utf-8")


def write_seg_nrrd(labels: Image, segments: Sequence[dict], path: str | os.PathLike) -> None:
    """Write a Slicer segmentation: one 3D layer, one segment per bundle label.

    ``segments``: dicts with ``value`` (label value), ``name``, ``color`` (RGB 0..1) and optional
    ``terminology`` (Slicer ``TerminologyEntry`` string). Empty segments are kept (a negative scan
    is a normal result).
    """
    import slicerio

    # the I,J,K view of the K,J,I array is what NRRD stores (Fortran order): written as it lies, no copy
    vox = labels.array.transpose(2, 1, 0).astype(np.uint8 if labels.array.max(initial=0) < 256 else np.uint16, copy=False)
    ni, nj, nk = vox.shape
    segs = []
    for s in segments:
        tags = {"TerminologyEntry": s["terminology"]} if s.get("terminology") else {}
        segs.append(
            {
                "id": f"Segment_{int(s['value'])}",
                "name": s["name"],
                "color": [float(c) for c in s["color"]],
                "labelValue": int(s["value"]),
                "layer": 0,
                "extent": [0, ni - 1, 0, nj - 1, 0, nk - 1],
                "nameAutoGenerated": False,
                "colorAutoGenerated": False,
                "tags": tags,
            }
        )
    seg = {
        "voxels": vox,
        "ijkToLPS": labels.ijk_to_lps,
        "segments": segs,
        "containedRepresentationNames": ["Binary labelmap", "Closed surface"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
    }
    with atomic_path(path) as tmp:
        slicerio.write_segmentation(str(tmp), seg)
