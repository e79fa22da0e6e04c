"""Cohort batch: many cases through the same ``segment`` pipeline, on a Dask cluster.

``run_cohort(source, output_dir, ...)`` finds the cases of ``source`` (a folder or a CSV list), runs
each with :func:`.job.segment_files` on Dask workers — a local cluster by default, or an existing
cluster given by its scheduler address — and writes:

* ``DIR/<case_id>/``: the ``segment`` file set of each case, moved into place atomically
  (:class:`.outputs.StagedOutput`; ``summary.json`` last, so its presence means the case is complete);
* ``DIR/cohort_lesions.csv``: every lesion of every completed case, ``case_id`` first, then
  :data:`.lesions.COLUMNS`, copied verbatim from the case's ``lesions.csv`` (its ``total`` row left out);
* ``DIR/cohort_summary.csv``: one row per case (:data:`SUMMARY_COLUMNS`).

This module runs the cohort; finding the cases is :mod:`.cohort_discovery`, sizing the cluster
:mod:`.cluster`, the rows and tables :mod:`.cohort_tables`, the terminal progress :mod:`.cohort_progress`.

One bad case never stops the cohort: every exception of a case (and a worker that dies under it)
becomes that case's ``failed`` row. ``resume`` skips cases whose ``summary.json`` exists and was
made by the same model and parameters.

Sources
-------
* **Folder**: every visible volume file (``.nii[.gz]``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) is a
  case named after the file; every sub-folder is a case named after the folder: a DICOM series, or
  a folder holding one volume file, or (multi-channel models) one file or DICOM folder per channel
  named after the channel (``case01/CBF.nii.gz``, ``case01/CBV.nii.gz`` …). Other files are ignored.
* **CSV**: a ``case_id`` column and one column per model channel (named as in the bundle, any case;
  a one-channel model also accepts ``path``). Relative paths are relative to the CSV's folder.

Workers
-------
A local cluster has worker *processes* with one Dask thread each (one case at a time per worker)
and ``torch`` threads = cores ÷ workers, so workers never oversubscribe the CPUs; the number of
workers defaults to ``min(cores, memory ÷ 4 GiB, cases)``, or to one per GPU (``cuda:0``,
``cuda:1`` … round robin) when ``--device`` is ``auto``/``cuda`` and CUDA is present. With ``scheduler=ADDRESS`` the same
code runs on any Dask cluster; inputs, the model bundle and ``DIR`` must then be at the same paths
on every worker machine (a shared file system), and the package installed in the workers' Python.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from ..analysis.lesions import format_cell
from ..engine.inference import CancelToken
from ..errors import CancelledError, UNetSegmentError, UsageError
from ..io.outputs import CONTRACT_FILES, ensure_output_dir, pid_alive
from ..io.readers import quiet_itk
from ..params import SegmentParams
from .cluster import (
    MEMORY_PER_WORKER_BYTES,
    assign_gpus,
    environment_kept,
    local_cluster_size,
    local_gpus,
    open_client,
    threads_by_worker,
    threads_here,
    worker_address,
)
from .cohort_discovery import Case, check_case_id, discover_cases
from .cohort_progress import CohortProgress, CohortProgressFn
from .cohort_tables import (
    COHORT_LESIONS,
    COHORT_SUMMARY,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_RESUMED,
    SUMMARY_COLUMNS,
    complete_case,
    failed_row,
    resumed_row,
    write_cohort_tables,
)

__all__ = [
    "BATCH_PARTIAL_EXIT", "COHORT_LESIONS", "COHORT_SUMMARY", "MEMORY_PER_WORKER_BYTES", "STATUS_FAILED", "STATUS_OK",
    "STATUS_RESUMED", "SUMMARY_COLUMNS", "Case", "CohortProgress", "CohortProgressFn", "assign_gpus", "check_case_id",
    "complete_case", "discover_cases", "local_cluster_size", "local_gpus", "remove_dead_staging", "run_case", "run_cohort",
    "write_cohort_tables",
]

#: exit status of ``unetsegment batch`` when some cases failed (0: all complete)
BATCH_PARTIAL_EXIT = 7
#: a case to run: (its key in the cohort's order, the case, whether to replace what its folder holds)
_Todo = tuple[str, Case, bool]


# --------------------------------------------------------------------------------------------
# One case (runs on a Dask worker)
# --------------------------------------------------------------------------------------------
def run_case(case_id: str, inputs: Sequence[str], case_dir: str, model: str | None, params: dict,
             overwrite: bool = False, threads: int | dict | None = None, devices: dict | None = None) -> dict:
    """Segment one case into ``case_dir``; never raises: a failure is returned as a ``failed`` row.

    ``threads`` (torch CPU threads) is a number or a mapping worker address → number; ``devices``
    maps worker address → torch device (one GPU per worker of a local cluster).
    """
    t = time.perf_counter()
    row = failed_row(case_id, inputs)
    try:
        p = SegmentParams.from_mapping(params)
        p = replace(p, threads=p.threads if p.threads is not None else threads_here(threads),
                    device=devices.get(worker_address(), p.device) if devices else p.device)
        from .job import segment_files

        quiet_itk()  # the case's error row already says what is wrong
        summary = segment_files(list(inputs), case_dir, model, p, overwrite=overwrite)
        row.update(status=STATUS_OK, n_lesions=int(summary["n_lesions"]),
                   total_volume_ml=format_cell(float(summary["total_volume_ml"])), output_dir=case_id)
    except UNetSegmentError as e:
        row["error"] = str(e)
    except Exception as e:  # noqa: BLE001 - one bad case must not stop the cohort
        row["error"] = f"internal error: {type(e).__name__}: {e}"
    row["time_s"] = round(time.perf_counter() - t, 3)
    return row


# --------------------------------------------------------------------------------------------
# The cohort
# --------------------------------------------------------------------------------------------
def run_cohort(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    model: str | None = None,
    params: SegmentParams | None = None,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: CohortProgressFn | None = None,
    cancel: CancelToken | None = None,
    processes: bool = True,
    client=None,
) -> dict:
    """Run every case of ``source`` into ``output_dir``; returns ``{rows, done, failed, resumed, total, wall_s, notes, …}``.

    ``processes=False`` runs a local cluster's workers as threads in this process (quicker to start;
    used by the tests). ``client`` reuses an open :class:`distributed.Client` (then ``scheduler`` and
    ``workers`` are ignored).
    """
    from ..models.bundle import default_model_name, load_bundle

    _check_options(scheduler, workers, resume, overwrite)
    params = params or SegmentParams()
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    out = Path(output_dir)
    ensure_output_dir(out)
    # workers get a path when the model is a bundle path, else the name (resolved on each worker)
    bundle = load_bundle(model or default_model_name())
    model_arg = str(Path(model).resolve()) if model and Path(model).exists() else (model or bundle.name)
    cases, notes = discover_cases(source, bundle.channel_names, exclude=out)
    rows, todo, order = _plan_cases(cases, out, bundle, params, resume, overwrite)
    record = _recorder(rows, len(cases), progress)
    for key in order:  # known outcomes first, so the bar starts where the cohort stands
        if key in rows:
            record(key, rows[key])

    n_workers = 0
    try:
        if todo:
            n_workers = _run_on_dask(todo, out, model_arg, params, record, cancel, scheduler, workers, processes, client)
    except KeyboardInterrupt:
        cancel.cancel()
    finally:
        ordered = [rows[k] for k in order if k in rows]
        write_cohort_tables(out, ordered)
    if cancel.cancelled:
        raise CancelledError(f"cohort cancelled after {len(ordered)} of {len(cases)} cases (their outputs and the cohort tables are written)",
                             "rerun with --resume to finish the rest")
    return _cohort_result([rows[k] for k in order], out, time.perf_counter() - t0, n_workers, notes)


def _check_options(scheduler: str | None, workers: int | None, resume: bool, overwrite: bool) -> None:
    if scheduler and workers:
        raise UsageError("--workers sizes the local cluster; it does nothing with --scheduler",
                         "start as many `dask worker` processes as you want on the cluster instead")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other", "use --resume to keep complete cases, --overwrite to redo them")


def _plan_cases(cases: Sequence[Case], out: Path, bundle, params: SegmentParams, resume: bool,
                overwrite: bool) -> tuple[dict[str, dict], list[_Todo], list[str]]:
    """(rows known before running: failed at discovery or resumed, the cases to run, every case's key in order).

    A key is the case id, made unique (``id#index``) for a repeated id, whose row says it is a duplicate.
    """
    rows: dict[str, dict] = {}
    todo: list[_Todo] = []
    order: list[str] = []
    for i, c in enumerate(cases):
        key = c.case_id if c.case_id not in order else f"{c.case_id}#{i}"
        order.append(key)
        if c.error:
            rows[key] = failed_row(c.case_id, c.inputs, c.error)
            continue
        if resume:
            ok, why = complete_case(out / c.case_id, bundle, params)
            if ok:
                rows[key] = resumed_row(c.case_id, c.inputs, out / c.case_id)
                continue
            if why:
                rows[key] = failed_row(c.case_id, c.inputs, f"{why} — pass --overwrite to redo it, or use another --output-dir")
                continue
        # under resume, a case folder with some contract files but no summary.json is our own unfinished case: redo it
        redo = overwrite or (resume and any((out / c.case_id / f).exists() for f in CONTRACT_FILES))
        todo.append((key, c, redo))
    return rows, todo, order


def _recorder(rows: dict[str, dict], total: int, progress: CohortProgressFn | None) -> Callable[[str, dict], None]:
    """``record(key, row)``: keep a case's row, count it as done or failed, report progress."""
    counts = {"done": 0, "failed": 0}

    def record(key: str, row: dict) -> None:
        rows[key] = row
        counts["done" if row["status"] != STATUS_FAILED else "failed"] += 1
        if progress:
            progress(row, counts["done"], counts["failed"], total)

    return record


def _cohort_result(rows: list[dict], out: Path, wall_s: float, n_workers: int, notes: list[str]) -> dict:
    return {
        "rows": rows,
        "total": len(rows),
        "ok": sum(r["status"] == STATUS_OK for r in rows),
        "resumed": sum(r["status"] == STATUS_RESUMED for r in rows),
        "failed": sum(r["status"] == STATUS_FAILED for r in rows),
        "wall_s": wall_s,
        "workers": n_workers,
        "notes": notes,
        "output_dir": str(out),
        "cohort_lesions": str(out / COHORT_LESIONS),
        "cohort_summary": str(out / COHORT_SUMMARY),
    }


def _run_on_dask(todo: list[_Todo], out: Path, model_arg: str, params: SegmentParams, record: Callable[[str, dict], None],
                 cancel: CancelToken, scheduler: str | None, workers: int | None, processes: bool, client) -> int:
    """Run ``todo`` on a Dask cluster (``client``'s, else one opened and closed here); returns its worker count.
    A cluster opened here leaves this process's environment as it found it (:func:`.cluster.environment_kept`)."""
    with environment_kept() if client is None else contextlib.nullcontext():
        own = client is None
        cluster = None
        devices = None
        if own:
            client, cluster, threads, devices = open_client(scheduler, workers, len(todo), processes, params.device)
        else:
            threads = threads_by_worker(client) if processes else None
        pdict = params.as_dict()
        settled = False  # every case has ended: no worker is writing any more
        try:
            n_workers = len(client.scheduler_info().get("workers", {}))
            futures = {}
            for key, c, redo in todo:
                f = client.submit(run_case, c.case_id, c.inputs, str(out / c.case_id), model_arg, pdict, redo, threads,
                                  devices, key=f"unetsegment-case-{c.case_id}-{os.urandom(4).hex()}", pure=False, retries=0)
                futures[f] = (key, c)
            settled = _collect(futures, client, record, cancel)
            return n_workers
        finally:
            if own:
                client.close()
                if cluster is not None:
                    cluster.close()  # a local cluster's workers are gone after this, with the cases they were writing
                    settled = True
            if settled:  # partial outputs of workers killed mid-case (SIGTERM, out of memory): none stay behind
                remove_dead_staging([out / c.case_id for _key, c, _redo in todo])


def _collect(futures: dict, client, record: Callable[[str, dict], None], cancel: CancelToken) -> bool:
    """Record each case's row as it ends (a worker that died under it: a ``failed`` row); on cancel,
    cancel the cases left. Returns whether every case ended."""
    from distributed import TimeoutError as DaskTimeoutError
    from distributed import wait

    pending = set(futures)
    while pending:
        if cancel.cancelled:
            client.cancel(list(pending))
            break
        try:
            done, pending = wait(pending, timeout=0.5, return_when="FIRST_COMPLETED")
        except (TimeoutError, DaskTimeoutError):
            continue
        for f in done:
            key, c = futures[f]
            try:
                row = f.result()
            except Exception as e:  # noqa: BLE001 - a worker that died under the case, a lost connection …
                row = failed_row(c.case_id, c.inputs, f"the case's worker failed: {type(e).__name__}: {e}")
            record(key, row)
    return not pending


def remove_dead_staging(case_dirs: Sequence[Path]) -> int:
    """Remove the staging folders (partial outputs) that workers killed mid-case left in ``case_dirs``;
    a staging folder of a live process is kept. Returns how many were removed."""
    import shutil

    from ..io.outputs import STAGING_PREFIX

    n = 0
    for d in case_dirs:
        try:
            stages = [p for p in d.iterdir() if p.name.startswith(STAGING_PREFIX) and p.is_dir()]
        except OSError:
            continue
        for p in stages:
            pid = p.name[len(STAGING_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
                continue
            shutil.rmtree(p, ignore_errors=True)
            n += 1
        try:
            d.rmdir()  # a case folder the run created and left empty
        except OSError:
            pass
    return n
