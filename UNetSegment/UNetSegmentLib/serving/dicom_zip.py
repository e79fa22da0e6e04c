"""An uploaded ``.zip`` of one DICOM series → the series folder the readers take.

Extraction is guarded like any archive from a stranger: a member count and unpacked-size cap (a zip
bomb), no absolute, ``..`` or drive paths (traversal), no name twice, 0600 files in 0700 folders (patient
data). Errors name the upload by the client's file name.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

from ..errors import InputError
from .workdir import private_dir

MAX_ZIP_MEMBERS = 20000
_FIX = "upload a .zip of one DICOM series folder"


def prepare_input(p: Path, max_bytes: int, label: str | None = None) -> Path:
    """Uploaded file → readable input: a .zip becomes its DICOM series folder (extracted safely, 0600
    files in 0700 folders); other files are returned as they are. ``label`` names the upload in errors
    (the client's file name)."""
    if p.suffix.lower() != ".zip":
        return p
    name = label or p.name
    dest = p.with_suffix("")
    try:
        with zipfile.ZipFile(p) as z:
            members = _checked_members(z, name, max_bytes)
            unpacker = _Unpacker(private_dir(dest), name, max_bytes)
            for m in members:
                unpacker.extract(z, m)
    except zipfile.BadZipFile as e:
        raise InputError(f"{name} is not a valid zip ({e})", _FIX) from None
    except (zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, zlib.error) as e:  # encrypted, odd compression, corrupt data
        raise InputError(f"{name} cannot be unpacked ({type(e).__name__}: {e})", _FIX + " (plain deflate, no password)") from None
    p.unlink(missing_ok=True)
    return _series_folder(dest, name)


def _checked_members(z: zipfile.ZipFile, name: str, max_bytes: int) -> list[zipfile.ZipInfo]:
    """The zip's files, refused when none, too many, or declared to unpack to more than ``max_bytes``."""
    members = [m for m in z.infolist() if not m.is_dir()]
    if not members:
        raise InputError(f"{name} is an empty zip (no files in it)", _FIX)
    if len(members) > MAX_ZIP_MEMBERS:
        raise InputError(f"{name}: the zip holds {len(members)} files (limit {MAX_ZIP_MEMBERS})", "zip one DICOM series")
    if sum(m.file_size for m in members) > max_bytes:
        raise InputError(f"{name}: the zip unpacks to more than {max_bytes} bytes", "zip one DICOM series")
    return members


class _Unpacker:
    """Writes members under ``dest``, never outside it, never over a name, at most ``max_bytes`` in all
    (counted as written: the sizes a zip declares may lie)."""

    def __init__(self, dest: Path, name: str, max_bytes: int):
        self.root, self.name, self.max_bytes = dest.resolve(), name, max_bytes
        self.written = 0

    def target(self, member: str) -> Path:
        """Where ``member`` goes; refused when it would land outside the folder."""
        parts = Path(member.replace("\\", "/")).parts
        unsafe = InputError(f"{self.name} holds an unsafe path {member[:80]!r}", "zip the series folder's files only")
        if member.startswith(("/", "\\")) or ".." in parts or not parts or ":" in parts[0]:
            raise unsafe
        target = (self.root / Path(*parts)).resolve()
        if self.root not in target.parents:
            raise unsafe
        return target

    def extract(self, z: zipfile.ZipFile, m: zipfile.ZipInfo) -> None:
        target = self.target(m.filename)
        try:
            for d in reversed([q for q in target.parents if self.root in q.parents]):
                d.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:  # a name that is a file and a folder, or a file twice
            raise InputError(f"{self.name} holds {m.filename[:80]!r} twice or as both a file and a folder",
                             "zip one DICOM series folder as it is on disk") from None
        with z.open(m) as src, os.fdopen(fd, "wb") as dst:
            while chunk := src.read(1 << 20):
                self.written += len(chunk)
                if self.written > self.max_bytes:
                    raise InputError(f"{self.name} unpacks to more than {self.max_bytes} bytes", "zip one DICOM series")
                dst.write(chunk)


def _series_folder(folder: Path, name: str) -> Path:
    """``folder``, descending through single wrapper folders (``series/…``) to the one holding the files."""
    while True:
        entries = [e for e in folder.iterdir() if not e.name.startswith((".", "__MACOSX"))]
        if not entries:
            raise InputError(f"{name} holds only hidden or system files", _FIX)
        if len(entries) == 1 and entries[0].is_dir():
            folder = entries[0]
        else:
            return folder
