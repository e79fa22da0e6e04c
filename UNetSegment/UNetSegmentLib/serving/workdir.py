"""The server's work folder: owned, locked, private.

Without ``--work-dir`` each server process works in its own folder under
``$XDG_CACHE_HOME/unetsegment/server`` (``~/.cache/…``) holding ``server.lock``, an advisory lock
(``flock``) held for the server's life with its pid inside; on start, folders whose lock nobody holds
(a killed server) are removed with their uploads. Folders are 0700: the scans are patient data.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; stale folders of killed servers are then left for the admin
    fcntl = None  # type: ignore[assignment]

from ..errors import UsageError

#: the advisory lock file a live server holds in its work folder
LOCK_NAME = "server.lock"
#: prefix of the per-process work folders under :func:`server_cache_root`
WORK_PREFIX = "srv-"
#: a lock-less work folder younger than this may belong to a server that is starting
STARTING_GRACE_S = 60.0
log = logging.getLogger("unetsegment.server")


def server_cache_root() -> Path:
    """Parent of the servers' own work folders: ``$XDG_CACHE_HOME/unetsegment/server`` (``~/.cache/…``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "unetsegment" / "server"


class DirLock:
    """``flock`` on ``DIR/server.lock`` (with the pid inside, for people): held while the server lives,
    released by the kernel when it dies however it dies — unlike a pid, which can be reused."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> bool:
        """True when this process now holds the lock; False when another live process does."""
        if fcntl is None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def private_dir(path: Path) -> Path:
    """``path`` created as 0700 (patient data inside); an existing folder is left as it is."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _may_be_starting(folder: Path, lock: DirLock) -> bool:
    """A folder without a lock file yet, made moments ago: a server between creating and locking it."""
    if lock.path.exists():
        return False
    try:
        return time.time() - folder.stat().st_mtime < STARTING_GRACE_S
    except OSError:
        return True  # gone or unreadable: leave it


def remove_stale_work_dirs(root: Path) -> list[Path]:
    """Remove the work folders under ``root`` whose server is gone (nobody holds their lock); returns them."""
    removed: list[Path] = []
    if fcntl is None or not root.is_dir():
        return removed
    for d in root.iterdir():
        if not d.name.startswith(WORK_PREFIX) or not d.is_dir() or d.is_symlink():
            continue
        lock = DirLock(d)
        if _may_be_starting(d, lock):
            continue
        try:
            if not lock.acquire():
                continue  # a live server
        except OSError:
            continue
        try:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        finally:
            lock.release()
    return removed


def claim_work_dir(given: Path | None) -> tuple[Path, DirLock, bool]:
    """(work folder, its held lock, whether the server owns it and removes it at the end)."""
    if given is None:
        return _own_work_dir()
    d = Path(given)
    if d.exists() and not d.is_dir():
        raise UsageError(f"work folder {d} exists and is not a folder", "give a folder path for --work-dir")
    try:
        private_dir(d)
    except OSError as e:
        raise UsageError(f"cannot create the work folder {d}: {e.strerror}", "give a writable --work-dir") from None
    lock = DirLock(d)
    try:
        held = lock.acquire()
    except OSError as e:
        raise UsageError(f"cannot lock the work folder {d}: {e.strerror}", "give a writable --work-dir") from None
    if not held:
        raise UsageError(f"another unetsegment server uses the work folder {d}",
                         "give each server its own --work-dir, or leave it out (each server then gets its own)")
    return d, lock, False


def _own_work_dir() -> tuple[Path, DirLock, bool]:
    """A new locked per-process folder under :func:`server_cache_root`, after removing those of dead servers."""
    root = private_dir(server_cache_root())
    removed = remove_stale_work_dirs(root)
    if removed:
        log.warning("removed %d work folder(s) of servers that are gone (with their uploads) in %s", len(removed), root)
    d = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=root))  # 0700
    lock = DirLock(d)
    lock.acquire()
    return d, lock, True
