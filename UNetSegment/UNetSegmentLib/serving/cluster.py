"""Dask cluster sizing for a cohort: workers and torch threads of a local cluster (one worker per GPU
when inference runs on GPUs), the client to a local or remote cluster, and what a worker reads
back about itself (its address, its threads).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

from ..errors import UsageError

#: memory a worker is given room for when sizing a local cluster
MEMORY_PER_WORKER_BYTES = 4 << 30


def _cores_here() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_cluster_size(n_cases: int, workers: int | None = None, gpus: int = 0) -> tuple[int, int]:
    """(workers, torch threads per worker) for a local cluster on this machine: one worker per GPU
    when inference runs on GPUs, else as many as cores and memory (4 GiB each) allow."""
    cores = _cores_here()
    if workers is None and gpus:
        workers = max(1, min(gpus, n_cases))
    if workers is None:
        try:
            import psutil

            mem = psutil.virtual_memory().available
        except ImportError:
            mem = MEMORY_PER_WORKER_BYTES * cores
        workers = max(1, min(cores, mem // MEMORY_PER_WORKER_BYTES, max(1, n_cases)))
    return int(workers), max(1, cores // int(workers))


def local_gpus(device: str) -> int:
    """GPUs a local cluster spreads its workers over: all visible ones for ``auto``/``cuda``, one
    for ``cuda:N``, none for CPU/MPS or without CUDA."""
    d = (device or "auto").strip().lower()
    if d not in ("auto", "cuda") and not d.startswith("cuda:"):
        return 0
    try:
        import torch
    except ImportError:
        return 0
    if not torch.cuda.is_available():
        return 0
    return 1 if d.startswith("cuda:") else torch.cuda.device_count()


def assign_gpus(addresses: Sequence[str], gpus: int, device: str) -> dict | None:
    """worker address → ``cuda:i`` (round robin) for ``auto``/``cuda`` on several GPUs; None otherwise."""
    d = (device or "auto").strip().lower()
    if gpus < 1 or d.startswith("cuda:"):
        return None
    return {a: f"cuda:{i % gpus}" for i, a in enumerate(sorted(addresses))}


def open_client(scheduler: str | None, workers: int | None, n_cases: int, processes: bool, device: str = "auto"):
    """(client, cluster or None, threads per case: int or {worker address: int}, devices or None)."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise UsageError(f"cannot reach the Dask scheduler at {scheduler}: {e}",
                             "start it with `dask scheduler` and check the address (tcp://HOST:8786)") from None
        return client, None, threads_by_worker(client), None
    import dask

    gpus = local_gpus(device)
    n, threads = local_cluster_size(n_cases, workers, gpus)
    # loopback only (threads-only workers talk in-process, inproc://); a case that kills its worker
    # (e.g. out of memory) is retried once on another worker, then recorded as failed
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=processes, host="127.0.0.1" if processes else None,
                               dashboard_address=None, memory_limit="auto" if processes else 0, silence_logs=40)
    client = Client(cluster)
    return client, cluster, threads, assign_gpus(client.scheduler_info().get("workers", {}), gpus, device)


@contextlib.contextmanager
def environment_kept() -> Iterator[None]:
    """This process's environment as it was, once the block ends.

    Dask's nanny sets its workers' variables (``MALLOC_TRIM_THRESHOLD_``, ``OMP_NUM_THREADS=1`` and
    others of ``distributed.nanny.pre-spawn-environ``) in the *calling* process's own environment
    before each worker starts. Left there, every later subprocess of the caller (a program that ran a
    cohort through the Python API, then starts anything else) would run single-threaded with Dask's
    malloc settings."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for name in [n for n in os.environ if n not in saved]:
            del os.environ[name]
        for name, value in saved.items():
            if os.environ.get(name) != value:
                os.environ[name] = value


def threads_by_worker(client) -> dict:
    """torch threads per worker of a remote cluster: the host's cores ÷ the Dask threads on that host."""
    try:
        cores = client.run(_cores_here)
    except Exception:  # noqa: BLE001 - sizing is a hint, never a failure
        return {}
    info = client.scheduler_info().get("workers", {})
    per_host: dict[str, int] = {}
    for addr, w in info.items():
        per_host[w.get("host", addr)] = per_host.get(w.get("host", addr), 0) + int(w.get("nthreads", 1))
    return {addr: max(1, int(cores.get(addr, 1)) // max(1, per_host.get(w.get("host", addr), 1)))
            for addr, w in info.items()}


def worker_address() -> str | None:
    """The Dask worker this code runs on (None outside a worker)."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


def threads_here(threads: int | dict | None) -> int | None:
    """torch threads for a case on this worker: ``threads`` itself, or its entry for this worker's address
    (default: the host's cores ÷ this worker's Dask threads)."""
    if isinstance(threads, int) or threads is None:
        return threads
    try:
        from distributed import get_worker

        return threads.get(get_worker().address) or max(1, (os.cpu_count() or 1) // max(1, get_worker().state.nthreads))
    except (ImportError, ValueError):
        return None
