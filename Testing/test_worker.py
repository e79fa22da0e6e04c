"""The JSON-lines worker, for real: spawned with this Python on a synthetic head with tiny-blob."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from UNetSegmentLib.io.readers import read_image
from UNetSegmentLib.io.writers import write_image
from UNetSegmentLib.io.outputs import CONTRACT_FILES, STAGING_PREFIX
from UNetSegmentLib.phantom import head_with_blob
from UNetSegmentLib.errors import UsageError
from UNetSegmentLib.params import SegmentParams
from UNetSegmentLib.serving.worker import STAGES, ProgressReporter, error_event, params_from_request

PKG_PARENT = Path(__file__).resolve().parents[1] / "UNetSegment"


def spawn(tmp_path, image, params=None, stop=True, name="req"):
    ct = tmp_path / f"{name}-ct.nrrd"
    write_image(image, ct)
    req = {"inputs": [str(ct)], "output_dir": str(tmp_path / f"{name}-out"), "model": "tiny-blob",
           "params": params or {"device": "cpu"}, "overwrite": False,
           "stop_file": str(tmp_path / f"{name}.stop") if stop else None}
    (tmp_path / f"{name}.json").write_text(json.dumps(req))
    proc = subprocess.Popen([sys.executable, "-m", "UNetSegmentLib.serving.worker", "--request", str(tmp_path / f"{name}.json")],
                            cwd=str(PKG_PARENT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, req


def events_of(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_worker_runs_and_reports_progress_then_done(tmp_path):
    image, blob = head_with_blob()
    proc, req = spawn(tmp_path, image, {"device": "cpu", "heatmaps": ["gradcam"]})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    evs = events_of(out)  # every stdout line is a JSON event (libraries' prints go to stderr)
    assert evs[0]["event"] == "started" and evs[-1]["event"] == "done"
    progress = [e for e in evs if e["event"] == "progress"]
    stages = [e["stage"] for e in progress]
    seen = list(dict.fromkeys(stages))
    assert seen == list(STAGES), seen  # load, preprocess, inference, gradcam, postprocess, write — in order
    overall = [e["overall"] for e in progress]
    assert overall == sorted(overall) and overall[-1] == 1.0
    assert all(0.0 <= e["fraction"] <= 1.0 for e in progress)
    assert any(e["eta_s"] is not None and e["eta_s"] >= 0 for e in progress if e["stage"] == "inference")
    done = evs[-1]
    assert done["output_dir"] == req["output_dir"]
    files = set(os.listdir(req["output_dir"]))
    assert {"segmentation.seg.nrrd", "segmentation.nii.gz", "probability.nrrd", "gradcam.nrrd", "lesions.csv",
            "lesions.tsv", "report.png", "summary.json"} <= files <= set(CONTRACT_FILES)
    summary = json.loads((Path(req["output_dir"]) / "summary.json").read_text())
    assert done["summary"]["lesions"] == summary["lesions"] and len(summary["lesions"]) == 1
    labels = read_image(Path(req["output_dir"]) / "segmentation.nii.gz").array > 0
    assert 2 * (labels & blob).sum() / (labels.sum() + blob.sum()) > 0.8


def test_worker_cancel_via_stop_file_exits_within_one_second_and_leaves_nothing(tmp_path):
    image, _ = head_with_blob(shape_kji=(48, 200, 200), spacing=(0.6, 0.6, 2.0))  # many windows: a long inference
    proc, req = spawn(tmp_path, image, {"device": "cpu", "heatmaps": []})
    seen = []
    for line in proc.stdout:
        ev = json.loads(line)
        seen.append(ev)
        if ev["event"] == "progress" and ev["stage"] == "inference" and ev["fraction"] > 0:
            break
    assert seen and seen[-1]["stage"] == "inference", seen[-3:]
    t0 = time.monotonic()
    Path(req["stop_file"]).touch()
    rest = proc.stdout.read()
    code = proc.wait(timeout=10)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"worker took {elapsed:.2f} s to stop"
    last = events_of(rest)[-1]
    assert code == 130 and last["event"] == "error" and last["kind"] == "CancelledError" and last["exit_code"] == 130
    out = Path(req["output_dir"])
    left = [p.name for p in out.iterdir()] if out.exists() else []
    assert not [f for f in left if f in CONTRACT_FILES or f.startswith(STAGING_PREFIX)], left


def test_worker_cancel_during_startup_is_also_fast(tmp_path):
    """A stop request while torch is still being imported: the watcher's deadline ends the process."""
    image, _ = head_with_blob(shape_kji=(8, 64, 64))
    proc, req = spawn(tmp_path, image)
    first = json.loads(proc.stdout.readline())
    assert first["event"] == "started"
    t0 = time.monotonic()
    Path(req["stop_file"]).touch()
    rest = proc.stdout.read()
    code = proc.wait(timeout=10)
    assert time.monotonic() - t0 < 1.0
    assert code == 130 and events_of(rest)[-1]["kind"] == "CancelledError"
    out = Path(req["output_dir"])
    assert not out.exists() or not [p for p in out.iterdir() if p.name in CONTRACT_FILES]


def test_worker_sigterm_cancels(tmp_path):
    image, _ = head_with_blob(shape_kji=(48, 200, 200), spacing=(0.6, 0.6, 2.0))
    proc, req = spawn(tmp_path, image, {"device": "cpu", "heatmaps": []}, stop=False)
    for line in proc.stdout:
        ev = json.loads(line)
        if ev["event"] == "progress" and ev["stage"] == "inference":
            break
    t0 = time.monotonic()
    proc.terminate()
    rest = proc.stdout.read()
    assert proc.wait(timeout=10) == 130 and time.monotonic() - t0 < 1.0
    assert events_of(rest)[-1]["kind"] == "CancelledError"


def test_worker_input_error_is_one_event_with_the_cli_exit_code(tmp_path):
    image, _ = head_with_blob(shape_kji=(8, 64, 64))
    ct = tmp_path / "ct.nrrd"
    write_image(image, ct)
    req = {"inputs": [str(ct), str(ct)], "output_dir": str(tmp_path / "out"), "model": "tiny-blob", "params": {}}
    (tmp_path / "r.json").write_text(json.dumps(req))
    p = subprocess.run([sys.executable, "-m", "UNetSegmentLib.serving.worker", "--request", str(tmp_path / "r.json")],
                       cwd=str(PKG_PARENT), capture_output=True, text=True, timeout=120)
    last = events_of(p.stdout)[-1]
    assert p.returncode == 3 and last["event"] == "error" and last["kind"] == "InputError" and last["exit_code"] == 3
    assert "expects 1 input" in last["message"] and last["fix"]


def test_worker_rejects_unknown_parameters(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"inputs": ["x.nrrd"], "output_dir": str(tmp_path / "o"),
                                                 "params": {"treshold": 0.3}}))
    p = subprocess.run([sys.executable, "-m", "UNetSegmentLib.serving.worker", "--request", str(tmp_path / "r.json")],
                       cwd=str(PKG_PARENT), capture_output=True, text=True, timeout=60)
    last = events_of(p.stdout)[-1]
    assert p.returncode == 2 and last["kind"] == "UsageError" and "treshold" in last["message"]


def test_request_params_are_read_through_the_one_definition():
    """What the Slicer logic writes (``as_dict``: JSON lists, nulls) comes back as the same parameters."""
    sent = SegmentParams(device="cpu", threshold=0.4, heatmaps=("gradcam", "uncertainty"), tta=True)
    assert params_from_request(json.loads(json.dumps(sent.as_dict()))) == sent
    assert params_from_request(None) == params_from_request({}) == SegmentParams()
    with pytest.raises(UsageError, match="threshold=1.5 is out of range"):
        params_from_request({"threshold": 1.5})
    with pytest.raises(UsageError, match="unknown heatmap kind 'saliency'"):
        params_from_request({"heatmaps": ["saliency"]})
    with pytest.raises(UsageError, match="not an object"):
        params_from_request(["cpu"])


def test_error_event_out_of_memory_offers_cpu():
    ev = error_event(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "cuda")
    assert ev["kind"] == "OutOfMemoryError" and ev["exit_code"] == 5 and ev["offer_cpu"] is True
    assert error_event(MemoryError("out of memory"), "cpu")["offer_cpu"] is False
    missing = error_event(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert missing["kind"] == "MissingDependency" and missing["module"] == "torch"


def test_progress_overall_is_monotonic_across_stages():
    class Sink:
        def __init__(self):
            self.events = []

        def emit(self, event, final=False, **f):
            self.events.append(f)

    sink = Sink()
    r = ProgressReporter(sink, heatmaps=())
    for stage in ("load", "preprocess", "inference", "postprocess", "done"):
        for frac in (0.0, 0.5, 1.0):
            r(stage, frac, "")
    overall = [e["overall"] for e in sink.events]
    assert overall == sorted(overall) and "gradcam" not in r.stages
    assert sink.events[-1]["stage"] == "write"


# --- warm mode: one process, many runs ----------------------------------------------------------------
class WarmProcess:
    """``worker --serve`` with its stdin piped and its events read line by line."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "UNetSegmentLib.serving.worker", "--serve", *args],
                                     cwd=str(PKG_PARENT), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def until(self, *kinds: str, or_end: bool = False) -> list[dict] | None:
        """Events up to and including the first of ``kinds``; if the stream ends first, None with
        ``or_end``, else an AssertionError."""
        evs = []
        for line in self.proc.stdout:
            evs.append(json.loads(line))
            if evs[-1]["event"] in kinds:
                return evs
        if or_end:
            return None
        raise AssertionError(f"the worker ended before {kinds}: {evs[-3:]}")

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.stdin.close()
        return self.proc.wait(timeout=60)


def request_file(tmp_path, image, name, params=None) -> tuple[Path, dict]:
    ct = tmp_path / f"{name}-ct.nrrd"
    write_image(image, ct)
    req = {"inputs": [str(ct)], "output_dir": str(tmp_path / f"{name}-out"), "model": "tiny-blob",
           "params": params or {"device": "cpu"}, "stop_file": str(tmp_path / f"{name}.stop")}
    (tmp_path / f"{name}.json").write_text(json.dumps(req))
    return tmp_path / f"{name}.json", req


def test_warm_worker_runs_request_after_request_in_one_process_reusing_the_network(tmp_path):
    image, _ = head_with_blob()
    w = WarmProcess()
    started = w.until("started")[0]
    assert started["warm"] is True and started["idle_timeout_s"] == 600
    dones = []
    for name in ("a", "b"):
        path, req = request_file(tmp_path, image, name)
        w.send(str(path))
        evs = w.until("ready")
        assert [e["event"] for e in evs[-2:]] == ["done", "ready"] and evs[-1]["exit_code"] == 0
        assert not [e for e in evs if e["event"] == "started"]  # no second process
        dones.append(evs[-2])
        assert set(os.listdir(req["output_dir"])) >= {"segmentation.seg.nrrd", "lesions.csv", "summary.json"}
    assert [d["networks_built"] for d in dones] == [1, 1]  # the second run reused the first one's network
    a, b = (read_image(Path(d["output_dir"]) / "segmentation.nii.gz").array for d in dones)
    assert np.array_equal(a, b)  # the same scan gives the same result, warm or not
    w.send("quit")
    assert w.close() == 0


def test_warm_worker_takes_a_request_as_json_and_reports_a_bad_one_then_goes_on(tmp_path):
    image, _ = head_with_blob((24, 64, 64), (1.5, 1.5, 3.0))
    w = WarmProcess()
    w.until("started")
    w.send(str(tmp_path / "missing.json"))
    evs = w.until("ready")
    assert evs[-2]["event"] == "error" and evs[-2]["exit_code"] == 2 and evs[-1]["exit_code"] == 2
    _, req = request_file(tmp_path, image, "inline")
    w.send(json.dumps({**req, "report": "no"}))  # a field of the wrong type is named
    evs = w.until("ready")
    assert evs[-2]["event"] == "error" and "'report' is not true or false" in evs[-2]["message"]
    w.send(json.dumps({**req, "report": False}))  # as the Slicer module asks: no report.png
    evs = w.until("ready")
    assert evs[-2]["event"] == "done" and evs[-2]["output_dir"] == req["output_dir"]
    files = set(os.listdir(req["output_dir"]))
    assert "report.png" not in files and {"segmentation.seg.nrrd", "probability.nrrd", "summary.json"} <= files
    summary = json.loads((Path(req["output_dir"]) / "summary.json").read_text())
    assert summary["report"]["file"] is None and "report.png" not in summary["files_sha256"]
    assert summary["timings_s"]["report_s"] == 0.0
    assert w.close() == 0  # the end of stdin ends it


def test_warm_worker_cancel_line_stops_the_run_and_the_next_request_still_runs(tmp_path):
    image, _ = head_with_blob((48, 200, 200), (0.6, 0.6, 2.0))
    w = WarmProcess()
    pid = w.until("started")[0]["pid"]
    path, req = request_file(tmp_path, image, "slow", {"device": "cpu", "heatmaps": []})
    w.send(str(path))
    for line in w.proc.stdout:  # wait until the network runs
        ev = json.loads(line)
        if ev["event"] == "progress" and ev["stage"] == "inference" and ev["fraction"] > 0:
            break
    w.send("cancel")
    evs = w.until("error", "ready")
    assert evs[-1]["event"] == "error" and evs[-1]["kind"] == "CancelledError", evs[-1]
    assert "cancel on stdin" in evs[-1]["message"]
    assert not Path(req["output_dir"]).exists() or not os.listdir(req["output_dir"])
    same = w.until("ready", or_end=True) is not None  # stopped between windows: it goes on
    if not same:  # it did not stop within the grace and ended itself: the client starts a fresh one
        w.close()
        w = WarmProcess()
        w.until("started")
    small, _ = head_with_blob((24, 64, 64), (1.5, 1.5, 3.0))
    path2, req2 = request_file(tmp_path, small, "after")
    w.send(str(path2))
    evs = w.until("done")
    assert evs[-1]["output_dir"] == req2["output_dir"]
    assert (w.proc.pid == pid) == same and not [e for e in evs if e["event"] == "started"]
    w.close()


def test_warm_worker_exits_by_itself_when_idle():
    w = WarmProcess("--idle-timeout", "0.5")
    w.until("started")
    evs = w.until("exit")
    assert evs[-1] == {"event": "exit", "reason": "idle", "idle_timeout_s": 0.5}
    assert w.proc.wait(timeout=60) == 0


@pytest.mark.skipif(not hasattr(os, "nice"), reason="POSIX niceness")
def test_low_priority_worker_runs_below_its_parent():
    w = WarmProcess("--low-priority")
    w.until("started")
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, w.proc.pid) == min(19, ours + 10)
    w.send("quit")
    assert w.close() == 0
