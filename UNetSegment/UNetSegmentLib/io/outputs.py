"""The ``segment`` output folder: staging, overwrite policy and the contract's file set.

Files are written into a hidden staging folder inside the output directory and moved into place
only when every one of them is complete, so a failed or cancelled run leaves none. Existing
contract files are never replaced without ``overwrite``; other files in the folder are never touched.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..errors import OutputError

try:  # POSIX advisory locks; Windows has none on folders (see lock_output_dir)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: every file the ``segment`` contract may write (optional ones included)
CONTRACT_FILES = (
    "segmentation.seg.nrrd",
    "segmentation.nii.gz",
    "probability.nrrd",
    "gradcam.nrrd",
    "uncertainty.nrrd",
    "class_probabilities.nrrd",  # multi-class bundles: each label's own probability (io.class_maps)
    "lesions.csv",
    "lesions.tsv",
    "report.png",
    "segmentation.dcm",
    "measurements.dcm",
    "summary.json",  # moved last: its presence means the set is complete
)
STAGING_PREFIX = ".unetsegment-staging-"


def ensure_output_dir(d: Path) -> None:
    """Create the output folder (and parents) or say why it cannot be used."""
    if d.exists() and not d.is_dir():
        raise OutputError(f"output path {d} exists and is not a folder", "give a folder path for --output-dir")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output folder {d}: {e.strerror}", "choose a writable --output-dir") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {d} is not writable", "choose a writable --output-dir or fix its permissions")


@contextlib.contextmanager
def lock_output_dir(d: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on the folder ``d`` itself, or raise :class:`OutputError` at once.

    ``flock`` on the folder's own descriptor: no lock file exists, so none can be left behind, and
    the kernel drops the lock when the holder exits in any way (a killed run never blocks the folder).
    Windows cannot lock a folder; there the commit runs unlocked, with a warning.
    """
    if fcntl is None:  # pragma: no cover - Windows
        warnings.warn(f"cannot lock {d} on this platform: do not run two jobs into the same folder", RuntimeWarning,
                      stacklevel=2)
        yield
        return
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        raise OutputError(f"cannot open output folder {d}: {e.strerror}", "choose a readable, writable --output-dir") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"another unetsegment run is writing its outputs into {d} right now",
                "wait for it to finish, or give each run its own --output-dir; no output of this run was kept",
            ) from None
        except OSError as e:  # a file system without locks (some network mounts): go on, as on Windows
            warnings.warn(f"cannot lock {d} ({e.strerror}): do not run two jobs into the same folder", RuntimeWarning,
                          stacklevel=2)
        yield
    finally:
        os.close(fd)  # releases the lock


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every contract file in ``folder`` (``summary.json`` aside): what ``summary.json`` records, so a
    reader can check that the files beside it come from the same run."""
    out = {}
    for f in CONTRACT_FILES:
        p = folder / f
        if f != "summary.json" and p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out[f] = h.hexdigest()
    return out


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StagedOutput:
    """Use as ``with StagedOutput(dir, overwrite) as stage: write into stage.path``; commit on success."""

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False, files: tuple[str, ...] | None = None):
        self.out_dir = Path(out_dir)
        self.overwrite = overwrite
        #: the files this kind of run may write (default: the ``segment`` contract's); the last is moved last
        self.files = tuple(files or CONTRACT_FILES)
        self.path: Path | None = None

    def check(self) -> None:
        """Refuse early (before any work) if outputs exist or the folder cannot be written."""
        d = self.out_dir
        ensure_output_dir(d)
        existing = [f for f in self.files if (d / f).exists()]
        if existing and not self.overwrite:
            raise OutputError(
                f"{d} already holds outputs of an earlier run ({', '.join(existing)})",
                "pass --overwrite to replace them, or choose another --output-dir",
            )

    def __enter__(self) -> "StagedOutput":
        self.check()
        self._remove_stale_staging()
        try:
            self.path = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.out_dir))
        except OSError as e:
            raise OutputError(f"cannot write in {self.out_dir}: {e.strerror}", "choose a writable --output-dir") from None
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._commit()
        finally:
            if self.path is not None and self.path.exists():
                shutil.rmtree(self.path, ignore_errors=True)
        return False

    def _remove_stale_staging(self) -> None:
        for p in self.out_dir.glob(f"{STAGING_PREFIX}*"):
            pid = p.name[len(STAGING_PREFIX):].split("-", 1)[0]
            if not pid.isdigit() or not pid_alive(int(pid)) or int(pid) == os.getpid():
                shutil.rmtree(p, ignore_errors=True)

    def _commit(self) -> None:
        assert self.path is not None
        written = [f for f in self.files if (self.path / f).exists()]
        unknown = sorted(set(os.listdir(self.path)) - set(self.files))
        if unknown:
            raise OutputError(f"internal: unexpected staged files {unknown}", "report this as a bug")
        with lock_output_dir(self.out_dir):  # one commit at a time: never a mix of two runs' files
            self._move_into_place(written)

    def _move_into_place(self, written: list[str]) -> None:
        # re-check under the lock: another run may have written here meanwhile
        clash = [f for f in self.files if (self.out_dir / f).exists()]
        if clash and not self.overwrite:
            raise OutputError(f"another run wrote outputs into {self.out_dir} while this one was running ({', '.join(clash)})",
                              "pass --overwrite to replace them, or give each run its own --output-dir")
        try:
            # the old summary (the last file: summary.json, comparison.json) goes first: while files are
            # swapped, no summary claims the set is complete
            marker = self.files[-1]
            for f in sorted(clash, key=lambda f: f != marker):
                if f not in written or f == marker:
                    (self.out_dir / f).unlink()
            for f in written:  # self.files order: the summary last
                os.replace(self.path / f, self.out_dir / f)
        except OSError as e:
            raise OutputError(f"cannot move outputs into {self.out_dir}: {e.strerror}", "check free space and permissions") from None
