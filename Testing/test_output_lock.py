"""Two runs into one output folder (issue 14, item 14): the commit holds an advisory lock on the folder.

Either one run commits and the other exits 6 naming the folder, or (with ``--overwrite``) both commit
one after the other and the folder holds one run's complete set — never a mix. No lock file exists.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
from conftest import REPO, ct_phantom

from UNetSegmentLib.errors import OutputError
from UNetSegmentLib.image import to_sitk
from UNetSegmentLib.io.outputs import CONTRACT_FILES, StagedOutput, file_digests, lock_output_dir

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX advisory locks")

#: the files a fake run stages (summary.json last, as the real pipeline writes it)
FAKE_FILES = ("segmentation.nii.gz", "probability.nrrd", "lesions.csv", "lesions.tsv", "report.png")
TRIALS = 50


def _ctx():
    """fork where available (fast); the children only touch files."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _fake_commit(out_dir: str, run_id: str, overwrite: bool, barrier, errors) -> None:
    """Stage one run's files like the pipeline does, meet the other process, then commit (exit 0 or 6)."""
    try:
        stage = StagedOutput(out_dir, overwrite)
        stage.check()
        with stage:
            for f in FAKE_FILES:
                (stage.path / f).write_text(f"{run_id} {f}\n" * 200)
            summary = {"run_id": run_id, "files_sha256": file_digests(stage.path)}
            (stage.path / "summary.json").write_text(json.dumps(summary))
            barrier.wait(timeout=60)
    except OutputError as e:
        errors.put(str(e))
        sys.exit(6)
    sys.exit(0)


def assert_one_complete_run(out: Path, run_ids: set[str]) -> str:
    """The folder holds one run's complete, consistent set and no hidden leftovers; returns its run id."""
    names = set(os.listdir(out))
    assert not [n for n in names if n.startswith(".")], f"leftovers (staging or lock files): {sorted(names)}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run_id"] in run_ids
    digests = summary["files_sha256"]
    assert names - {"summary.json"} == set(digests), "a file not recorded by summary.json (or one missing)"
    for f, sha in digests.items():
        assert hashlib.sha256((out / f).read_bytes()).hexdigest() == sha, f"{f} is from another run"
    return summary["run_id"]


def _race(out: Path, overwrite: bool, trial: int) -> tuple[list[int], list[str]]:
    ctx = _ctx()
    barrier, errors = ctx.Barrier(2), ctx.Queue()
    ids = [f"run{trial}a", f"run{trial}b"]
    procs = [ctx.Process(target=_fake_commit, args=(str(out), i, overwrite, barrier, errors)) for i in ids]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    codes = sorted(p.exitcode for p in procs)
    messages = [errors.get(timeout=5) for c in codes if c == 6]
    return codes, messages


def test_racing_commits_into_a_new_folder_leave_one_run_and_the_loser_exits_6(tmp_path):
    for trial in range(TRIALS):
        out = tmp_path / f"out{trial}"
        codes, messages = _race(out, overwrite=False, trial=trial)
        assert codes == [0, 6], f"trial {trial}: exit codes {codes}"
        assert str(out) in messages[0] and "another" in messages[0] and "run" in messages[0]
        assert_one_complete_run(out, {f"run{trial}a", f"run{trial}b"})


def test_racing_overwrite_commits_never_mix_two_runs(tmp_path):
    out = tmp_path / "out"
    for trial in range(TRIALS):
        codes, messages = _race(out, overwrite=True, trial=trial)
        assert codes in ([0, 0], [0, 6]), f"trial {trial}: exit codes {codes}"
        for m in messages:
            assert f"another unetsegment run is writing its outputs into {out}" in m
        assert_one_complete_run(out, {f"run{trial}a", f"run{trial}b"})


def _hold_lock(out_dir: str, locked, release) -> None:
    with lock_output_dir(Path(out_dir)):
        locked.set()
        release.wait(60)


def _start_holder(out: Path):
    """Another process that holds ``out``'s lock until the returned event is set."""
    ctx = _ctx()
    locked, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(out), locked, release))
    holder.start()
    assert locked.wait(60)
    return holder, release


def test_a_commit_while_another_run_holds_the_folder_exits_6_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder, release = _start_holder(out)
    try:
        with pytest.raises(OutputError, match="another unetsegment run is writing its outputs into") as e:
            with StagedOutput(out, overwrite=True) as stage:
                (stage.path / "summary.json").write_text("{}")
        assert e.value.exit_code == 6 and str(out) in str(e.value)
        assert os.listdir(out) == []  # nothing committed, staging removed, no lock file
    finally:
        release.set()
        holder.join(60)


def test_the_lock_of_a_killed_run_is_released_by_the_kernel(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder, _ = _start_holder(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(60)
    assert holder.exitcode == -signal.SIGKILL
    with StagedOutput(out) as stage:  # no stale lock: the next run commits
        (stage.path / "summary.json").write_text("{}")
    assert os.listdir(out) == ["summary.json"]


@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [False, True])
def test_two_cli_segment_runs_into_one_folder(tmp_path, overwrite):
    img, _ = ct_phantom(shape_kji=(8, 48, 48))
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(to_sitk(img), str(ct))
    env = dict(os.environ, PYTHONPATH=str(REPO / "UNetSegment"))
    out = tmp_path / "out"
    for trial in range(3):
        cmd = [sys.executable, "-m", "UNetSegmentLib.cli", "segment", str(ct), "-o", str(out), "--model", "tiny-blob",
               "-q", "--heatmap", "none"] + (["--overwrite"] if overwrite else [])
        if not overwrite and out.exists():
            for f in os.listdir(out):
                os.unlink(out / f)
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [(p.wait(300), p.stderr.read()) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        codes = sorted(c for c, _ in results)
        assert codes == [0, 6] or (overwrite and codes == [0, 0]), results
        for c, err in results:
            if c == 6:
                assert str(out) in err and "another" in err and err.count("\n") == 1, err
        summary = json.loads((out / "summary.json").read_text())
        assert_one_complete_run(out, {summary["run_id"]})
        assert set(summary["files_sha256"]) >= {"segmentation.nii.gz", "probability.nrrd", "lesions.csv", "report.png"}
