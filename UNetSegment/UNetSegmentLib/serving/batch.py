"""Cohort batch: many cases through the same ``segment`` pipeline, on a Dask cluster.

``run_cohort(source, output_dir, ...)`` finds the cases of ``source`` (a folder or a CSV list), runs
each with :func:`.job.segment_files` on Dask workers — a local cluster by default, or an existing
cluster given by its scheduler address — and writes:

* ``DIR/<case_id>/``: the ``segment`` file set of each case, moved into place atomically
  (:class:`.outputs.StagedOutput`; ``summary.json`` last, so its presence means the case is complete);
* ``DIR/cohort_lesions.csv``: every lesion of every completed case, ``case_id`` first, then
  :data:`.lesions.COLUMNS`, copied verbatim from the case's ``lesions.csv`` (its ``total`` row left out);
* ``DIR/cohort_summary.csv``: one row per case (:data:`SUMMARY_COLUMNS`).

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

import csv
import io
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..errors import CancelledError, OutputError, UNetSegmentError, UsageError
from ..engine.inference import CancelToken
from ..analysis.lesions import COLUMNS, _fmt
from ..io.outputs import CONTRACT_FILES, ensure_output_dir, pid_alive
from ..params import SegmentParams

#: columns of ``cohort_summary.csv``
SUMMARY_COLUMNS = ("case_id", "status", "n_lesions", "total_volume_ml", "time_s", "error", "output_dir", "inputs")
#: ``status`` values: ran now, skipped because complete (``resume``), failed
STATUS_OK, STATUS_RESUMED, STATUS_FAILED = "ok", "resumed", "failed"
COHORT_LESIONS = "cohort_lesions.csv"
#: exit status of ``unetsegment batch`` when some cases failed (0: all complete)
BATCH_PARTIAL_EXIT = 7
COHORT_SUMMARY = "cohort_summary.csv"
#: memory a worker is given room for when sizing a local cluster
MEMORY_PER_WORKER_BYTES = 4 << 30
#: parameters that change the result: a complete case made with other values is not reused by ``resume``
_RESULT_PARAMS = ("threshold", "min_lesion_ml", "connectivity", "overlap", "tta", "heatmaps", "gradcam_layer", "cam_method", "engine")
_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_BAD_ID = re.compile(r"[/\\\x00-\x1f\x7f]")


@dataclass
class Case:
    """One case: its id (the output sub-folder) and one input path per model channel, in order."""

    case_id: str
    inputs: list[str] = field(default_factory=list)
    #: set when the case is known bad before running (bad id, missing channel …)
    error: str = ""


# --------------------------------------------------------------------------------------------
# Finding cases
# --------------------------------------------------------------------------------------------
def check_case_id(case_id: str) -> str:
    """'' when ``case_id`` is usable as a folder name inside the output folder, else the reason."""
    if not case_id:
        return "empty case_id"
    if _BAD_ID.search(case_id):
        return f"case_id {case_id!r} holds a path separator or control character"
    if case_id.startswith("."):
        return f"case_id {case_id!r} starts with '.'"
    if len(case_id) > 200:
        return f"case_id {case_id[:20]!r}… is longer than 200 characters"
    if case_id in (COHORT_LESIONS, COHORT_SUMMARY):
        return f"case_id {case_id!r} is the name of a cohort table"
    return ""


def _volume_stem(name: str) -> str | None:
    low = name.lower()
    for s in _VOLUME_SUFFIXES:
        if low.endswith(s) and len(name) > len(s):
            return name[: -len(s)]
    return None


def discover_cases(source: str | os.PathLike, channels: Sequence[str], exclude: str | os.PathLike | None = None) -> tuple[list[Case], list[str]]:
    """Cases of a folder or CSV list (see the module doc) and notes on what was ignored."""
    src = Path(source)
    if not src.exists():
        raise UsageError(f"{src} does not exist", "give a folder of cases or a CSV list with case_id and one column per channel")
    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise UsageError(f"{src.name} is not a folder or a .csv list", "give a folder of cases or a CSV with case_id and one column per channel")
        cases, notes = _cases_from_csv(src, channels), []
    else:
        cases, notes = _cases_from_folder(src, channels, Path(exclude).resolve() if exclude else None)
    seen: set[str] = set()
    for c in cases:
        if not c.error:
            c.error = check_case_id(c.case_id)
        if c.case_id in seen and not c.error:
            c.error = f"duplicate case_id {c.case_id!r}: an earlier case has the same id"
        seen.add(c.case_id)
    if not cases:
        raise UsageError(f"no cases found in {src}", "put one volume file, DICOM folder or per-case folder per case there, or give a CSV list")
    return cases, notes


def _cases_from_csv(path: Path, channels: Sequence[str]) -> list[Case]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path.name}: {e}", "give a UTF-8 CSV file") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    lower = {h.lower(): h for h in header}
    if "case_id" not in lower:
        raise UsageError(f"{path.name} has no case_id column (columns: {', '.join(header) or 'none'})",
                         "add a header row: case_id," + ",".join(channels))
    cols = []
    for ch in channels:
        col = lower.get(ch.lower())
        if col is None and len(channels) == 1:
            col = lower.get("path") or lower.get("input")
        if col is None:
            raise UsageError(f"{path.name} has no column for channel {ch}",
                             "give a header row case_id," + ",".join(channels) + " (one column per model channel)")
        cols.append(col)
    base = path.parent
    cases = []
    for n, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        cid = row.get(lower["case_id"], "")
        if not cid and not any(row.values()):
            continue
        case = Case(cid or f"row{n}")
        missing = [ch for ch, col in zip(channels, cols) if not row.get(col)]
        if not cid:
            case.error = f"row {n} of {path.name} has no case_id"
        elif missing:
            case.error = f"row {n} of {path.name} has no path for {', '.join(missing)}"
        case.inputs = [str((base / row[col]) if row.get(col) else "") for col in cols]
        cases.append(case)
    return cases


def _cases_from_folder(folder: Path, channels: Sequence[str], exclude: Path | None) -> tuple[list[Case], list[str]]:
    cases: list[Case] = []
    ignored: list[str] = []
    multi = len(channels) > 1
    for p in sorted(folder.iterdir(), key=lambda q: q.name):
        if p.name.startswith("."):
            continue
        if exclude is not None and (p.resolve() == exclude or p.resolve() in exclude.parents):
            continue  # the output folder inside the input folder
        if p.is_dir():
            cases.append(_case_from_subfolder(p, channels))
        elif (stem := _volume_stem(p.name)) is not None:
            if multi:
                cases.append(Case(stem, [str(p)], f"{p.name} is a single file but the model needs {len(channels)} channels "
                                                   f"({', '.join(channels)}): put them in a per-case folder or list them in a CSV"))
            else:
                cases.append(Case(stem, [str(p)]))
        else:
            ignored.append(p.name)
    notes = [f"ignored {len(ignored)} file(s) that are not volumes: {', '.join(ignored[:5])}{' …' if len(ignored) > 5 else ''}"] if ignored else []
    return cases, notes


def _case_from_subfolder(d: Path, channels: Sequence[str]) -> Case:
    entries = [e for e in sorted(d.iterdir(), key=lambda q: q.name) if not e.name.startswith(".")]
    by_stem: dict[str, Path] = {}
    for e in entries:
        stem = e.name if e.is_dir() else _volume_stem(e.name)
        if stem is not None:
            by_stem.setdefault(stem.lower(), e)
    named = [by_stem.get(ch.lower()) for ch in channels]
    if all(named):
        return Case(d.name, [str(p) for p in named])
    if len(channels) > 1:
        missing = [ch for ch, p in zip(channels, named) if p is None]
        return Case(d.name, [], f"case folder {d.name} has no volume for {', '.join(missing)} "
                                f"(expects one file or DICOM folder per channel named {', '.join(channels)}, e.g. {channels[0]}.nii.gz)")
    volumes = [e for e in entries if e.is_file() and _volume_stem(e.name) is not None]
    if len(volumes) == 1 and len(entries) == 1:
        return Case(d.name, [str(volumes[0])])
    return Case(d.name, [str(d)])  # a DICOM series folder (read_image says what is wrong if it is not)


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
    row = {"case_id": case_id, "status": STATUS_FAILED, "n_lesions": "", "total_volume_ml": "", "time_s": 0.0,
           "error": "", "output_dir": "", "inputs": ";".join(inputs)}
    try:
        p = SegmentParams(**{**params, "heatmaps": tuple(params.get("heatmaps", ()))})
        if p.threads is None:
            p.threads = _threads_here(threads)
        if devices:
            p.device = devices.get(_worker_address(), p.device)
        from .job import segment_files

        _quiet_itk()
        summary = segment_files(list(inputs), case_dir, model, p, overwrite=overwrite)
        row.update(status=STATUS_OK, n_lesions=int(summary["n_lesions"]), total_volume_ml=_fmt(float(summary["total_volume_ml"])),
                   output_dir=case_id)
    except UNetSegmentError as e:
        row["error"] = str(e)
    except Exception as e:  # noqa: BLE001 - one bad case must not stop the cohort
        row["error"] = f"internal error: {type(e).__name__}: {e}"
    row["time_s"] = round(time.perf_counter() - t, 3)
    return row


def _quiet_itk() -> None:
    """ITK's own warnings (e.g. GDCM on a folder without DICOM) would interleave on the workers' stderr;
    the case's error row already says what is wrong."""
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalWarningDisplay(False)
    except ImportError:
        pass


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


def _threads_here(threads: int | dict | None) -> int | None:
    if isinstance(threads, int) or threads is None:
        return threads
    try:
        from distributed import get_worker

        return threads.get(get_worker().address) or max(1, (os.cpu_count() or 1) // max(1, get_worker().state.nthreads))
    except (ImportError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------
def complete_case(case_dir: Path, model_name: str, model_version: str, params: SegmentParams) -> tuple[bool, str]:
    """(True, '') when ``case_dir`` holds a complete set made by this model with these parameters."""
    import json

    sj = case_dir / "summary.json"
    if not sj.is_file():
        return False, ""
    try:
        s = json.loads(sj.read_text(encoding="utf-8"))
        m, rec = s["model"], s["parameters"]
    except (OSError, ValueError, KeyError, TypeError):
        return False, f"{sj} is unreadable"
    if (m.get("name"), m.get("version")) != (model_name, model_version):
        return False, f"{case_dir.name} holds outputs of model {m.get('name')} {m.get('version')}"
    want = params.as_dict()
    for k in _RESULT_PARAMS:
        if want.get(k) is not None and want[k] != rec.get(k):
            return False, f"{case_dir.name} holds outputs made with {k}={rec.get(k)!r}, not {want[k]!r}"
    return True, ""


def _resumed_row(case: Case, case_dir: Path) -> dict:
    import json

    s = json.loads((case_dir / "summary.json").read_text(encoding="utf-8"))
    return {"case_id": case.case_id, "status": STATUS_RESUMED, "n_lesions": int(s["n_lesions"]),
            "total_volume_ml": _fmt(float(s["total_volume_ml"])), "time_s": round(float(s.get("timings_s", {}).get("total_s", 0.0)), 3),
            "error": "", "output_dir": case.case_id, "inputs": ";".join(case.inputs)}


# --------------------------------------------------------------------------------------------
# Cohort tables
# --------------------------------------------------------------------------------------------
def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)


def write_cohort_tables(out_dir: Path, rows: Sequence[dict]) -> None:
    """``cohort_summary.csv`` from ``rows`` and ``cohort_lesions.csv`` from the completed cases' ``lesions.csv``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SUMMARY_COLUMNS)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in SUMMARY_COLUMNS])
    _atomic_write(out_dir / COHORT_SUMMARY, buf.getvalue())

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("case_id", *COLUMNS))
    for r in rows:
        if r["status"] not in (STATUS_OK, STATUS_RESUMED):
            continue
        with open(out_dir / r["case_id"] / "lesions.csv", newline="", encoding="utf-8") as f:
            rd = csv.reader(f)
            header = next(rd)
            idx = [header.index(c) for c in COLUMNS]
            for rec in rd:
                if rec and rec[0] != "total":
                    w.writerow([r["case_id"], *(rec[i] for i in idx)])
    _atomic_write(out_dir / COHORT_LESIONS, buf.getvalue())


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------
#: called after each case: (row, done, failed, total)
CohortProgressFn = Callable[[dict, int, int, int], None]


class CohortProgress:
    """A tqdm bar (cases, done/failed, ETA) on a terminal; one line per case otherwise.

    Cases known before running (failed at discovery, resumed) are counted but not timed, so the
    ETA is the rate of the cases run now times the cases left.
    """

    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        self.t0: float | None = None
        self.known = 0

    def __call__(self, row: dict, done: int, failed: int, total: int) -> None:
        if not self.enabled:
            return
        n = done + failed
        pre = row["status"] == STATUS_RESUMED or (row["status"] == STATUS_FAILED and row["time_s"] == 0.0 and self.t0 is None)
        if self.t0 is None and pre:
            self.known = n
        elif self.t0 is None:
            self.t0 = time.perf_counter() - float(row.get("time_s") or 0.0)
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="cases", unit="case", file=self.stream, dynamic_ncols=True)
            self.bar.set_postfix_str(f"done {done}, failed {failed}", refresh=False)
            self.bar.update(1)
            return
        ran = n - self.known
        eta = (time.perf_counter() - self.t0) / ran * (total - n) if self.t0 is not None and ran > 0 else None
        msg = f"[{n}/{total}] {row['case_id']}: {row['status']}"
        if row["status"] == STATUS_FAILED:
            msg += f" — {row['error']}"
        elif row["status"] == STATUS_OK:
            msg += f", {row['n_lesions']} lesion(s), {row['time_s']:.1f} s"
        print(f"{msg}  (done {done}, failed {failed}, ETA {_hms(eta) if eta is not None else '?'})", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# --------------------------------------------------------------------------------------------
# Cluster
# --------------------------------------------------------------------------------------------
def local_cluster_size(n_cases: int, workers: int | None = None, gpus: int = 0) -> tuple[int, int]:
    """(workers, torch threads per worker) for a local cluster on this machine: one worker per GPU
    when inference runs on GPUs, else as many as cores and memory (4 GiB each) allow."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
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


def _open_client(scheduler: str | None, workers: int | None, n_cases: int, processes: bool, device: str = "auto"):
    """(client, cluster or None, threads per case: int or {worker address: int}, devices or None)."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise UsageError(f"cannot reach the Dask scheduler at {scheduler}: {e}",
                             "start it with `dask scheduler` and check the address (tcp://HOST:8786)") from None
        return client, None, _threads_by_worker(client), None
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


def _threads_by_worker(client) -> dict:
    """torch threads per worker of a remote cluster: the host's cores ÷ the Dask threads on that host."""
    try:
        cores = client.run(lambda: len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    except Exception:  # noqa: BLE001 - sizing is a hint, never a failure
        return {}
    info = client.scheduler_info().get("workers", {})
    per_host: dict[str, int] = {}
    for addr, w in info.items():
        per_host[w.get("host", addr)] = per_host.get(w.get("host", addr), 0) + int(w.get("nthreads", 1))
    return {addr: max(1, int(cores.get(addr, 1)) // max(1, per_host.get(w.get("host", addr), 1)))
            for addr, w in info.items()}


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

    if scheduler and workers:
        raise UsageError("--workers sizes the local cluster; it does nothing with --scheduler",
                         "start as many `dask worker` processes as you want on the cluster instead")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other", "use --resume to keep complete cases, --overwrite to redo them")
    params = params or SegmentParams()
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    out = Path(output_dir)
    _check_output_dir(out)
    # workers get a path when the model is a bundle path, else the name (resolved on each worker)
    bundle = load_bundle(model or default_model_name())
    model_arg = str(Path(model).resolve()) if model and Path(model).exists() else (model or bundle.name)
    cases, notes = discover_cases(source, bundle.channel_names, exclude=out)

    rows: dict[str, dict] = {}
    todo: list[tuple[str, Case, bool]] = []
    order: list[str] = []
    for i, c in enumerate(cases):
        key = c.case_id if c.case_id not in order else f"{c.case_id}#{i}"
        order.append(key)
        if c.error:
            rows[key] = {"case_id": c.case_id, "status": STATUS_FAILED, "n_lesions": "", "total_volume_ml": "", "time_s": 0.0,
                         "error": c.error, "output_dir": "", "inputs": ";".join(c.inputs)}
            continue
        if resume:
            ok, why = complete_case(out / c.case_id, bundle.name, bundle.version, params)
            if ok:
                rows[key] = _resumed_row(c, out / c.case_id)
                continue
            if why:
                rows[key] = {"case_id": c.case_id, "status": STATUS_FAILED, "n_lesions": "", "total_volume_ml": "", "time_s": 0.0,
                             "error": f"{why} — pass --overwrite to redo it, or use another --output-dir",
                             "output_dir": "", "inputs": ";".join(c.inputs)}
                continue
        # under resume, a case folder with some contract files but no summary.json is our own unfinished case: redo it
        redo = overwrite or (resume and any((out / c.case_id / f).exists() for f in CONTRACT_FILES))
        todo.append((key, c, redo))

    total = len(cases)
    counts = {"done": 0, "failed": 0}

    def record(key: str, row: dict) -> None:
        rows[key] = row
        counts["done" if row["status"] != STATUS_FAILED else "failed"] += 1
        if progress:
            progress(row, counts["done"], counts["failed"], total)

    for key in order:  # known outcomes first, so the bar starts where the cohort stands
        if key in rows:
            record(key, rows[key])

    n_workers = 0
    try:
        if todo:
            n_workers = _run_on_dask(todo, out, model_arg, params, record, cancel,
                                     scheduler, workers, processes, client)
    except KeyboardInterrupt:
        cancel.cancel()
    finally:
        ordered = [rows[k] for k in order if k in rows]
        write_cohort_tables(out, ordered)
    if cancel.cancelled:
        raise CancelledError(f"cohort cancelled after {len(ordered)} of {total} cases (their outputs and the cohort tables are written)",
                             "rerun with --resume to finish the rest")
    ordered = [rows[k] for k in order]
    wall = time.perf_counter() - t0
    return {
        "rows": ordered,
        "total": total,
        "ok": sum(r["status"] == STATUS_OK for r in ordered),
        "resumed": sum(r["status"] == STATUS_RESUMED for r in ordered),
        "failed": sum(r["status"] == STATUS_FAILED for r in ordered),
        "wall_s": wall,
        "workers": n_workers,
        "notes": notes,
        "output_dir": str(out),
        "cohort_lesions": str(out / COHORT_LESIONS),
        "cohort_summary": str(out / COHORT_SUMMARY),
    }


def _check_output_dir(out: Path) -> None:
    ensure_output_dir(out)


def _run_on_dask(todo, out, model_arg, params, record, cancel, scheduler, workers, processes, client) -> int:
    from distributed import TimeoutError as DaskTimeoutError, wait

    own = client is None
    cluster = None
    devices = None
    if own:
        client, cluster, threads, devices = _open_client(scheduler, workers, len(todo), processes, params.device)
    else:
        threads = _threads_by_worker(client) if processes else None
    pdict = params.as_dict()
    settled = False  # every case has ended: no worker is writing any more
    try:
        n_workers = len(client.scheduler_info().get("workers", {}))
        futures = {}
        for key, c, redo in todo:
            f = client.submit(run_case, c.case_id, c.inputs, str(out / c.case_id), model_arg, pdict, redo, threads, devices,
                              key=f"unetsegment-case-{c.case_id}-{os.urandom(4).hex()}", pure=False, retries=0)
            futures[f] = (key, c)
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
                    row = {"case_id": c.case_id, "status": STATUS_FAILED, "n_lesions": "", "total_volume_ml": "", "time_s": 0.0,
                           "error": f"the case's worker failed: {type(e).__name__}: {e}", "output_dir": "",
                           "inputs": ";".join(c.inputs)}
                record(key, row)
        settled = not pending
        return n_workers
    finally:
        if own:
            client.close()
            if cluster is not None:
                cluster.close()  # a local cluster's workers are gone after this, with the cases they were writing
                settled = True
        if settled:  # partial outputs of workers killed mid-case (SIGTERM, out of memory): none stay behind
            remove_dead_staging([out / c.case_id for _key, c, _redo in todo])


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


