"""``unetsegment batch``: a cohort of synthetic cases (some broken) on a local Dask cluster."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ct_phantom, write_bundle
from dicom_utils import write_ct_series

from UNetSegmentLib.models.bundle import load_bundle
from UNetSegmentLib.serving import batch
from UNetSegmentLib.serving.batch import COHORT_LESIONS, COHORT_SUMMARY, discover_cases, run_cohort
from UNetSegmentLib.cli import main
from UNetSegmentLib.errors import UsageError
from UNetSegmentLib.image import to_sitk
from UNetSegmentLib.io.readers import read_image
from UNetSegmentLib.serving.job import segment_files
from UNetSegmentLib.analysis.lesions import COLUMNS
from UNetSegmentLib.io.outputs import STAGING_PREFIX
from UNetSegmentLib.params import SegmentParams

PARAMS = SegmentParams(heatmaps=(), threads=1)
N_GOOD = 14  # + 1 DICOM case + 5 broken = 20 cases
BROKEN = {"truncated": "truncated", "junk": "cannot read junk.nrrd", "flat": "2D image", "nodicom": "no DICOM series",
          "fourd": "4D image"}


def _write(img, path: Path) -> Path:
    sitk.WriteImage(to_sitk(img), str(path))
    return path


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A folder of 20 cases (14 volume files, one DICOM series, 5 broken) and its run on 2 worker processes."""
    src = tmp_path_factory.mktemp("cohort")
    for n in range(N_GOOD):
        img, _ = ct_phantom(shape_kji=(6, 32, 32), seed=n, blob=n % 7 != 5)
        _write(img, src / f"case{n:02d}{'.nrrd' if n % 4 == 3 else '.nii.gz'}")
    img, _ = ct_phantom(shape_kji=(4, 32, 32), seed=99)
    write_ct_series(img, src / "dicomcase")
    good = (src / "case00.nii.gz").read_bytes()
    (src / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    (src / "junk.nrrd").write_bytes(b"this is not a volume\n")
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkInt16), str(src / "flat.nii.gz"))
    sitk.WriteImage(sitk.Image([8, 8, 4, 2], sitk.sitkInt16), str(src / "fourd.nii.gz"))
    (src / "nodicom").mkdir()
    (src / "nodicom" / "readme.txt").write_text("no images here")
    (src / "notes.txt").write_text("ignored")
    out = tmp_path_factory.mktemp("cohort-out")
    seen = []
    ENVIRONMENT["before"] = dict(os.environ)
    r = run_cohort(src, out, "tiny-blob", PARAMS, workers=2, progress=lambda row, d, f, t: seen.append((row["case_id"], d, f, t)))
    ENVIRONMENT["after"] = dict(os.environ)
    return src, out, r, seen


#: this process's environment before and after the cohort's run on a local cluster of worker processes
ENVIRONMENT: dict[str, dict] = {}


def test_a_local_cluster_leaves_the_environment_as_it_was(cohort):
    """Dask's nanny sets its workers' variables (OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_ …) in the
    calling process's environment; the cohort puts the caller's back."""
    assert ENVIRONMENT["after"] == ENVIRONMENT["before"]


def test_environment_kept_undoes_added_changed_and_removed_variables(monkeypatch):
    from UNetSegmentLib.serving.cluster import environment_kept

    monkeypatch.setenv("UNETSEGMENT_TEST_KEPT", "1")
    monkeypatch.setenv("UNETSEGMENT_TEST_GONE", "2")
    monkeypatch.delenv("UNETSEGMENT_TEST_ADDED", raising=False)
    before = dict(os.environ)
    with pytest.raises(RuntimeError):  # also when the block fails
        with environment_kept():
            os.environ["UNETSEGMENT_TEST_KEPT"] = "changed"
            del os.environ["UNETSEGMENT_TEST_GONE"]
            os.environ["UNETSEGMENT_TEST_ADDED"] = "3"
            raise RuntimeError("the cohort failed")
    assert dict(os.environ) == before


def test_cohort_runs_every_case_and_records_broken_ones(cohort):
    src, out, r, seen = cohort
    assert r["total"] == N_GOOD + 1 + len(BROKEN) and r["workers"] == 2
    assert (r["ok"], r["failed"], r["resumed"]) == (N_GOOD + 1, len(BROKEN), 0)
    assert r["notes"] and "notes.txt" in r["notes"][0]
    assert len(seen) == r["total"] and seen[-1][1:] == (N_GOOD + 1, len(BROKEN), r["total"])
    summary = _rows(out / COHORT_SUMMARY)
    assert [s["case_id"] for s in summary] == sorted(s["case_id"] for s in summary)
    by_id = {s["case_id"]: s for s in summary}
    for cid, words in BROKEN.items():
        assert by_id[cid]["status"] == "failed" and words in by_id[cid]["error"], by_id[cid]
        assert by_id[cid]["output_dir"] == "" and not (out / cid / "summary.json").exists()
    ok = [s for s in summary if s["status"] == "ok"]
    assert len(ok) == N_GOOD + 1 and all(s["error"] == "" and float(s["time_s"]) > 0 for s in ok)
    assert (out / "dicomcase" / "segmentation.dcm").is_file()  # a DICOM series case gets its DICOM SEG too
    for s in ok:
        names = os.listdir(out / s["case_id"])
        assert "summary.json" in names and not [n for n in names if n.startswith(STAGING_PREFIX)]


def test_cohort_tables_equal_the_per_case_tables(cohort):
    _, out, r, _ = cohort
    lesions = _rows(out / COHORT_LESIONS)
    with open(out / COHORT_LESIONS, newline="") as f:
        assert next(csv.reader(f)) == ["case_id", *COLUMNS]
    n_cases_with_lesions = 0
    for s in _rows(out / COHORT_SUMMARY):
        cid = s["case_id"]
        mine = [{k: v for k, v in row.items() if k != "case_id"} for row in lesions if row["case_id"] == cid]
        if s["status"] != "ok":
            assert mine == []
            continue
        per_case = [row for row in _rows(out / cid / "lesions.csv") if row["lesion"] != "total"]
        assert mine == per_case, cid
        summ = json.loads((out / cid / "summary.json").read_text())
        assert int(s["n_lesions"]) == summ["n_lesions"] == len(per_case)
        assert float(s["total_volume_ml"]) == pytest.approx(summ["total_volume_ml"], abs=1e-6)
        n_cases_with_lesions += bool(per_case)
    assert n_cases_with_lesions >= 8
    assert len(lesions) == sum(int(s["n_lesions"] or 0) for s in _rows(out / COHORT_SUMMARY))


def test_a_cohort_case_equals_segment(cohort, tmp_path):
    src, out, _, _ = cohort
    segment_files([str(src / "case01.nii.gz")], tmp_path / "single", "tiny-blob", PARAMS)
    assert (out / "case01" / "lesions.csv").read_text() == (tmp_path / "single" / "lesions.csv").read_text()
    a, b = read_image(out / "case01" / "segmentation.nii.gz"), read_image(tmp_path / "single" / "segmentation.nii.gz")
    np.testing.assert_array_equal(a.array, b.array)
    assert sorted(os.listdir(out / "case01")) == sorted(os.listdir(tmp_path / "single"))


def test_resume_skips_complete_cases_and_redoes_incomplete_ones(cohort, tmp_path):
    src, first, _, _ = cohort
    out = tmp_path / "resumed"
    shutil.copytree(first, out)
    (out / "case02" / "summary.json").unlink()  # as if the run died while moving case02's files into place
    lesions_before = (out / COHORT_LESIONS).read_text()
    rc = main(["batch", str(src), "-o", str(out), "--resume", "--model", "tiny-blob", "--heatmap", "none", "--threads", "1",
               "--workers", "1", "-q"])
    assert rc == batch.BATCH_PARTIAL_EXIT  # the broken cases still fail
    by_id = {s["case_id"]: s for s in _rows(out / COHORT_SUMMARY)}
    assert by_id["case02"]["status"] == "ok"
    assert sum(s["status"] == "resumed" for s in by_id.values()) == N_GOOD
    assert sum(s["status"] == "failed" for s in by_id.values()) == len(BROKEN)
    assert (out / COHORT_LESIONS).read_text() == lesions_before
    # other parameters: complete cases are not silently reused
    r = run_cohort(src, out, "tiny-blob", SegmentParams(heatmaps=(), threads=1, threshold=0.3), resume=True, workers=1, processes=False)
    assert r["resumed"] == 0 and r["ok"] == 0
    assert "threshold" in {s["case_id"]: s for s in r["rows"]}["case03"]["error"]
    # parameters compare as resolved: the model's own threshold given explicitly is the same run ...
    model_threshold = load_bundle("tiny-blob").meta["threshold"]
    r = run_cohort(src, out, "tiny-blob", SegmentParams(heatmaps=(), threads=1, threshold=model_threshold), resume=True,
                   workers=1, processes=False)
    assert r["resumed"] == N_GOOD + 1  # and the DICOM case


def test_resume_does_not_reuse_cases_made_at_another_threshold_when_the_default_is_asked(cohort, tmp_path):
    """A case made with --threshold 0.3 is not the run a later --resume at the model's default asks for."""
    src, _, _, _ = cohort
    out = tmp_path / "at03"
    r = run_cohort(src, out, "tiny-blob", SegmentParams(heatmaps=(), threads=1, threshold=0.3), workers=1, processes=False)
    assert r["ok"] == N_GOOD + 1  # and the DICOM case
    r = run_cohort(src, out, "tiny-blob", SegmentParams(heatmaps=(), threads=1), resume=True, workers=1, processes=False)
    assert r["resumed"] == 0
    assert all("threshold" in s["error"] for s in r["rows"] if s["status"] == "failed" and s["case_id"] not in BROKEN)


def test_csv_cohort_multichannel_on_an_existing_scheduler(tmp_path):
    from distributed import LocalCluster

    model = write_bundle(tmp_path / "mc", channels=("A", "B"))
    data = tmp_path / "data"
    data.mkdir()
    for n in range(2):
        img, _ = ct_phantom(shape_kji=(4, 32, 32), seed=n)
        _write(img, data / f"p{n}_a.nii.gz")
        _write(img, data / f"p{n}_b.nii.gz")
    lst = tmp_path / "cohort.csv"
    lst.write_text("case_id,B,a,site\n"
                   "p0,data/p1_b.nii.gz,data/p0_a.nii.gz,x\n"
                   "p1,data/p1_b.nii.gz,data/p1_a.nii.gz,x\n"
                   "p2,data/missing_b.nii.gz,data/p0_a.nii.gz,x\n"
                   "p3,,data/p0_a.nii.gz,x\n"
                   "../evil,data/p1_b.nii.gz,data/p1_a.nii.gz,x\n"
                   "p1,data/p1_b.nii.gz,data/p1_a.nii.gz,x\n")
    out = tmp_path / "out"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with pytest.raises(UsageError, match="--workers"):
            run_cohort(lst, out, str(model), PARAMS, scheduler=cluster.scheduler_address, workers=2)
        r = run_cohort(lst, out, str(model), PARAMS, scheduler=cluster.scheduler_address)
    by = [(s["case_id"], s["status"]) for s in r["rows"]]
    assert by == [("p0", "ok"), ("p1", "ok"), ("p2", "failed"), ("p3", "failed"), ("../evil", "failed"), ("p1", "failed")]
    err = [s["error"] for s in r["rows"]]
    assert "not found" in err[2] and "no path for B" in err[3] and "path separator" in err[4] and "duplicate" in err[5]
    summ = json.loads((out / "p0" / "summary.json").read_text())
    assert [Path(i["path"]).name for i in summ["inputs"]] == ["p0_a.nii.gz", "p1_b.nii.gz"]  # columns mapped by channel name
    assert not (tmp_path / "evil").exists()


def test_discovery_rules(tmp_path):
    img, _ = ct_phantom(shape_kji=(4, 16, 16))
    src = tmp_path / "src"
    src.mkdir()
    _write(img, src / "a.nii.gz")
    (src / "b").mkdir()
    _write(img, src / "b" / "scan.mha")  # a folder holding one volume
    (src / "c").mkdir()
    _write(img, src / "c" / "ct.nrrd")  # named after the channel
    _write(img, src / "c" / "other.nrrd")
    (src / ".hidden.nii.gz").write_bytes(b"")
    (src / "out").mkdir()  # the output folder inside the input folder is not a case
    cases, notes = discover_cases(src, ["CT"], exclude=src / "out")
    assert [(c.case_id, [Path(p).relative_to(src).as_posix() for p in c.inputs], c.error) for c in cases] == [
        ("a", ["a.nii.gz"], ""), ("b", ["b/scan.mha"], ""), ("c", ["c/ct.nrrd"], "")]
    cases, _ = discover_cases(src, ["CT", "PET"], exclude=src / "out")
    assert all(c.error for c in cases) and "CT, PET" in cases[0].error
    bad = tmp_path / "bad.csv"
    bad.write_text("id,CT\nx,a.nii.gz\n")
    with pytest.raises(UsageError, match="case_id"):
        discover_cases(bad, ["CT"])
    bad.write_text("case_id,path\nx,a.nii.gz\n")
    assert discover_cases(bad, ["CT"])[0][0].inputs == [str(tmp_path / "a.nii.gz")]  # 'path' for a one-channel model
    with pytest.raises(UsageError, match="no column for channel"):
        discover_cases(bad, ["CT", "PET"])
    with pytest.raises(UsageError, match="no cases"):
        (tmp_path / "empty").mkdir()
        discover_cases(tmp_path / "empty", ["CT"])


def test_local_cluster_size_respects_cores_and_cases():
    w, t = batch.local_cluster_size(100)
    cores = len(os.sched_getaffinity(0))
    assert 1 <= w <= cores and w * t <= cores
    assert batch.local_cluster_size(1)[0] == 1
    assert batch.local_cluster_size(100, workers=1) == (1, cores)
    assert batch.local_cluster_size(100, gpus=2) == (2, max(1, cores // 2))  # one worker per GPU
    assert batch.assign_gpus(["tcp://b", "tcp://a", "tcp://c"], 2, "auto") == {"tcp://a": "cuda:0", "tcp://b": "cuda:1", "tcp://c": "cuda:0"}
    assert batch.assign_gpus(["tcp://a"], 1, "cuda:1") is None and batch.assign_gpus(["tcp://a"], 0, "auto") is None
    assert batch.local_gpus("cpu") == 0


# --------------------------------------------------------------------------------------------
# Issue 14: stops leave nothing behind
# --------------------------------------------------------------------------------------------
def test_sigterm_to_batch_leaves_no_staging_folders(tmp_path):
    """SIGTERM while a worker is writing a case's outputs: exit 130, and no partial outputs anywhere."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    src = tmp_path / "src"
    src.mkdir()
    for n in range(3):
        img, _ = ct_phantom(shape_kji=(6, 32, 32), seed=n)
        _write(img, src / f"case{n}.nii.gz")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO / "UNetSegment"))
    p = subprocess.Popen([sys.executable, "-m", "UNetSegmentLib.cli", "batch", str(src), "-o", str(out), "--model", "tiny-blob",
                          "--heatmap", "none", "--threads", "1", "--workers", "1", "--device", "cpu", "-q"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker = None
    try:
        t0 = time.time()
        while worker is None:  # a worker has begun writing a case: freeze it there, mid-case
            for stage in out.glob(f"*/{STAGING_PREFIX}*") if out.is_dir() else ():
                worker = int(stage.name[len(STAGING_PREFIX):].split("-", 1)[0])
                try:
                    os.kill(worker, signal.SIGSTOP)
                except ProcessLookupError:
                    worker = None
                    continue
                if not stage.exists():  # it committed just before it stopped: wait for the next case
                    os.kill(worker, signal.SIGCONT)
                    worker = None
                    continue
                break
            assert p.poll() is None and time.time() - t0 < 180, p.communicate()[1][-2000:] if p.poll() is not None else "timeout"
            time.sleep(0.01)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
        if worker is not None:
            try:
                os.kill(worker, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert p.returncode == 130, err[-2000:]
    assert "cancelled" in err and "--resume" in err
    assert not list(out.rglob(f"{STAGING_PREFIX}*"))
    for d in (x for x in out.iterdir() if x.is_dir()):  # whatever a case folder holds is a complete set
        assert (d / "summary.json").is_file(), sorted(os.listdir(d))


def test_a_stop_after_the_last_window_is_honoured(tmp_path):
    """SIGTERM (the cancel token) after inference finished: exit 130 and no outputs, not a silent exit 0."""
    from UNetSegmentLib.errors import CancelledError
    from UNetSegmentLib.engine.inference import CancelToken

    img, _ = ct_phantom(shape_kji=(6, 32, 32), seed=1)
    vol = _write(img, tmp_path / "ct.nii.gz")
    for when in ("postprocess", "done"):  # after the last window; after the whole engine run
        token = CancelToken()

        def progress(stage, fraction, message="", when=when, token=token):
            if stage == when:
                token.cancel()

        with pytest.raises(CancelledError) as e:
            segment_files([str(vol)], tmp_path / when, "tiny-blob", PARAMS, progress=progress, cancel=token)
        assert e.value.exit_code == 130
        assert os.listdir(tmp_path / when) == []  # no outputs, no staging folder
