"""``unetsegment serve``: auth, limits, bad uploads, concurrent jobs, cancel, retention — on real uvicorn (loopback)."""
from __future__ import annotations

import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO, ct_phantom, write_bundle
from dicom_utils import write_ct_series

from UNetSegmentLib.models.bundle import default_model_name
from UNetSegmentLib.errors import InputError, UsageError
from UNetSegmentLib.image import to_sitk
from UNetSegmentLib.io.readers import read_image
from UNetSegmentLib.serving.job import segment_files
from UNetSegmentLib.params import SegmentParams
from UNetSegmentLib.serving.auth import check_bind, read_token_file
from UNetSegmentLib.serving.dicom_zip import prepare_input as _prepare_input
from UNetSegmentLib.serving.jobs import JobManager
from UNetSegmentLib.serving.server import InferenceServer, ServerConfig
from UNetSegmentLib.serving.workdir import LOCK_NAME, DirLock, server_cache_root
from UNetSegmentLib.serving.client import RemoteProcess, ServerClient, ServerError, _MultipartBody

TOKEN = "test-token-" + "x" * 24
# The volumes here are small phantoms, not heads: the server's mechanics are under test, so the default model's
# input-domain check is told to let them through (test_refused_input_is_a_failed_job_that_names_the_fix checks it is on).
PARAMS = SegmentParams(heatmaps=(), threads=1, allow_unusual_input=True)


def _vol(path: Path, shape=(6, 32, 32), seed=0) -> Path:
    img, _ = ct_phantom(shape_kji=shape, seed=seed)
    sitk.WriteImage(to_sitk(img), str(path))
    return path


def raw(method: str, url: str, token: str | None = TOKEN, fields=None, files=None, body=None, headers=None):
    """(status, json body, headers) of one request, errors included."""
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    data = body
    if fields is not None or files is not None:
        mp = _MultipartBody(fields or {}, [(k, Path(v)) for k, v in (files or [])])
        data = b"".join(mp)
        h["Content-Type"] = mp.content_type
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method, headers=h), timeout=30) as r:
            return r.status, json.loads(r.read() or b"null"), r.headers
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            payload = json.loads(text or b"null")
        except ValueError:
            payload = text
        return e.code, payload, e.headers


def _job_dirs(srv_or_manager) -> set[str]:
    """Names in the server's work folder other than its lock: the job folders."""
    m = getattr(srv_or_manager, "manager", srv_or_manager)
    return {p.name for p in m.work_dir.iterdir()} - {LOCK_NAME}


class Hold:
    """A :attr:`JobManager.on_stage` hook that stops each job's thread at ``stage`` until released: tests
    act on a job at a known point instead of racing it."""

    def __init__(self, stage: str):
        self.stage = stage
        self.reached = threading.Event()
        self.release = threading.Event()

    def __call__(self, job, stage: str) -> None:
        if stage == self.stage:
            self.reached.set()
            assert self.release.wait(60), "the test never released the job"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    cfg = ServerConfig(token=TOKEN, max_upload_bytes=256 << 10, max_queued=8, retention_s=3600, params=PARAMS,
                       work_dir=tmp_path_factory.mktemp("serve-work"))
    with InferenceServer(cfg) as s:
        yield s


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    return _vol(tmp_path_factory.mktemp("srv-data") / "ct.nii.gz")


@pytest.fixture
def client(srv) -> ServerClient:
    return ServerClient(srv.url, token=TOKEN)


def test_every_request_needs_the_token(srv, ct):
    for method, path in (("GET", "/health"), ("GET", "/models"), ("GET", "/jobs/" + "0" * 32), ("DELETE", "/jobs/" + "0" * 32),
                         ("GET", "/nonexistent")):
        for tok in (None, "wrong-" + TOKEN[6:], TOKEN + "x"):
            code, body, headers = raw(method, srv.url + path, token=tok)
            assert code == 401 and "bearer token" in body["error"] and headers["WWW-Authenticate"].startswith("Bearer")
    code, body, _ = raw("POST", srv.url + "/jobs", token=None, files=[("CT", ct)])
    assert code == 401
    assert raw("GET", srv.url + "/health", headers={"Authorization": f"Basic {TOKEN}"}, token=None)[0] == 401
    code, body, _ = raw("GET", srv.url + "/health")
    assert code == 200 and body["status"] == "ok" and body["auth"] is True and body["max_upload_bytes"] == 256 << 10
    with pytest.raises(ServerError, match="bearer token") as e:
        ServerClient(srv.url).health()
    assert e.value.status == 401


def test_job_end_to_end_gives_the_same_files_as_segment(srv, client, ct, tmp_path):
    models = client.models()
    assert models["default"] == default_model_name() and models["models"][0]["channels"] == ["CT"]
    jid = client.submit({"ct": ct}, model="tiny-blob", params=SegmentParams(threshold=0.4, heatmaps=("gradcam",)))
    st = client.wait(jid, poll_s=0.05, timeout=120)
    assert st["status"] == "done", st
    assert st["error"] == "" and st["fraction"] == 1.0 and "gradcam.nrrd" in st["files"] and st["n_lesions"] >= 1
    # the recorded stage history, not whatever a poll happened to catch
    assert [s for s in st["stages"] if s in ("preprocess", "inference", "gradcam", "postprocess", "done")] == \
        ["preprocess", "inference", "gradcam", "postprocess", "done"]
    files = client.download(jid, tmp_path / "remote")
    assert {p.name for p in files} == set(st["files"]) and all(p.is_file() for p in files)
    with pytest.raises(Exception, match="--overwrite"):  # same folder guarantees as segment
        client.download(jid, tmp_path / "remote")
    segment_files([str(ct)], tmp_path / "local", "tiny-blob", SegmentParams(threshold=0.4, heatmaps=("gradcam",), threads=1))
    assert sorted(os.listdir(tmp_path / "local")) == sorted(st["files"])
    assert (tmp_path / "remote" / "lesions.csv").read_text() == (tmp_path / "local" / "lesions.csv").read_text()
    np.testing.assert_array_equal(read_image(tmp_path / "remote" / "segmentation.nii.gz").array,
                                  read_image(tmp_path / "local" / "segmentation.nii.gz").array)
    text = (tmp_path / "remote" / "summary.json").read_text()
    summ = json.loads(text)
    assert summ["parameters"]["threshold"] == 0.4 and summ["parameters"]["heatmaps"] == ["gradcam"]
    # no server-side path in what is served: inputs by the client's file name, the model by its name
    assert summ["inputs"] == [{"channel": "CT", "path": "ct.nii.gz"}] and summ["model"]["path"] == "tiny-blob"
    assert str(srv.manager.work_dir) not in text and str(REPO) not in text and str(Path.home()) not in text
    # media types by kind
    for name, mtype in (("lesions.csv", "text/csv"), ("report.png", "image/png"), ("summary.json", "application/json"),
                        ("segmentation.nii.gz", "application/octet-stream")):
        with urllib.request.urlopen(urllib.request.Request(f"{srv.url}/jobs/{jid}/files/{name}",
                                                           headers={"Authorization": f"Bearer {TOKEN}"})) as r:
            assert r.headers.get_content_type() == mtype, name
    # only the contract's names are served: no traversal through the file name
    for name in ("..%2F..%2Fetc%2Fpasswd", "%2E%2E%2Fsummary.json", "inputs", "summary.json%00", "SUMMARY.JSON", "uncertainty.nrrd"):
        code, body, _ = raw("GET", f"{srv.url}/jobs/{jid}/files/{name}")
        assert code == 404, name
    assert raw("GET", f"{srv.url}/jobs/..%2F{jid}")[0] == 404
    assert client.cancel(jid) == {"id": jid, "status": "deleted"}
    assert raw("GET", f"{srv.url}/jobs/{jid}")[0] == 404
    assert not (srv.manager.work_dir / jid).exists()


def test_bad_uploads_are_refused_with_a_clear_message(srv, ct, tmp_path):
    url = srv.url + "/jobs"
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    txt = tmp_path / "ct.txt"
    txt.write_text("hello")
    cases = [
        (dict(files=[("PET", ct)]), 400, "not one of this model's channels"),
        (dict(files=[("input", ct), ("input", ct)]), 400, "expects 1 input"),
        (dict(files=[("CT", ct), ("input", ct)]), 400, "mixing"),
        (dict(files=[("CT", txt)]), 400, "not a supported file type"),
        (dict(files=[("CT", empty)]), 400, "is empty"),
        (dict(fields={"threshold": "0.4"}), 400, "no files"),
        (dict(files=[("CT", ct)], fields={"threshold": "2"}), 400, "bad parameter"),
        (dict(files=[("CT", ct)], fields={"colour": "red"}), 400, "unknown form field"),
        (dict(files=[("CT", ct)], fields={"device": "cuda"}), 400, "set by the server"),
        (dict(files=[("CT", ct)], fields={"tta": "maybe"}), 400, "not a boolean"),
        (dict(files=[("CT", ct)], fields={"model": "/etc"}), 400, "unknown model"),
        (dict(files=[("CT", ct)], fields={"model": "../tiny-blob"}), 400, "unknown model"),
        (dict(body=b'{"CT": "x"}', headers={"Content-Type": "application/json"}), 415, "multipart/form-data"),
        (dict(body=b"--x\r\ngarbage", headers={"Content-Type": "multipart/form-data; boundary=x"}), 400, ""),
    ]
    for kw, code, words in cases:
        got, body, _ = raw("POST", url, **kw)
        assert got == code and words in body["error"] + body.get("fix", ""), (kw, got, body)
    assert _job_dirs(srv) <= set(srv.manager.jobs)  # nothing left from refused uploads
    # a readable upload that is not a volume: accepted, then the job fails saying why
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"\x1f\x8b" + os.urandom(300))
    code, body, _ = raw("POST", url, files=[("input", junk)], fields={"min-lesion-ml": "0.1", "tta": "false", "heatmap": "none"})
    assert code == 202 and body["status"] == "queued" and body["channels"] == ["CT"]
    st = ServerClient(srv.url, token=TOKEN).wait(body["id"], poll_s=0.05, timeout=60)
    assert st["status"] == "failed" and "junk" not in st["error"] and "corrupt" in st["error"] and st["error_type"] == "InputError"
    assert str(srv.manager.work_dir) not in st["error"] and "/" not in st["error"].split(" — ")[0]  # no server path
    code, _, _ = raw("GET", f"{srv.url}/jobs/{body['id']}/files/summary.json")
    assert code == 409


def test_upload_size_limit(srv, tmp_path):
    big = tmp_path / "big.nrrd"
    big.write_bytes(os.urandom(400 << 10))
    code, body, _ = raw("POST", srv.url + "/jobs", files=[("CT", big)])  # Content-Length over the cap
    assert code == 413 and "limit of 0.2 MiB" in body["error"] and "--max-upload-mb" in body["fix"]
    # chunked (no Content-Length): cut off while streaming
    mp = _MultipartBody({}, [("CT", big)])
    host, port = srv.url.rsplit("/", 1)[-1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/jobs", body=iter(mp), headers={"Content-Type": mp.content_type, "Authorization": f"Bearer {TOKEN}"},
                 encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and "limit" in json.loads(r.read())["error"]
    conn.close()
    with pytest.raises(ServerError, match="exceeds the server's limit") as e:  # the client refuses before sending
        ServerClient(srv.url, token=TOKEN).submit([big])
    assert e.value.status == 413
    assert _job_dirs(srv) <= set(srv.manager.jobs)


def test_queue_limit_and_delete_of_queued_jobs(tmp_path, ct):
    cfg = ServerConfig(max_queued=2, devices=(), work_dir=tmp_path / "w")  # no inference thread: jobs stay queued
    with InferenceServer(cfg) as s:
        c = ServerClient(s.url)
        a, b = c.submit([ct]), c.submit([ct])
        assert c.status(b)["queue_position"] == 1
        code, body, headers = raw("POST", s.url + "/jobs", token=None, files=[("CT", ct)])
        assert code == 429 and "2 jobs waiting" in body["error"] and headers["Retry-After"]
        with pytest.raises(ServerError) as e:
            c.submit([ct])
        assert e.value.status == 429
        assert c.cancel(a) == {"id": a, "status": "cancelled"}
        assert c.status(a)["status"] == "cancelled" and not (s.manager.work_dir / a).exists()
        assert c.status(b)["queue_position"] == 0
        c.submit([ct])  # a slot is free again
        assert c.health()["queued"] == 2


def test_concurrent_jobs_run_one_at_a_time_and_none_is_lost(tmp_path):
    cfg = ServerConfig(max_queued=1, params=PARAMS, work_dir=tmp_path / "w")
    vols = [_vol(tmp_path / f"v{i}.nii.gz", seed=i) for i in range(6)]
    with InferenceServer(cfg) as s:
        hold = Hold("started")  # the first job to start waits until every submit has been answered
        s.manager.on_stage = hold
        results = [None] * len(vols)

        def go(i):
            try:
                results[i] = ("ok", ServerClient(s.url).submit([vols[i]]))
            except ServerError as e:
                results[i] = ("refused", e.status)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(vols))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        hold.release.set()
        accepted = [r[1] for r in results if r[0] == "ok"]
        refused = [r[1] for r in results if r[0] == "refused"]
        # one job running (held) and one waiting at most: at least 4 of the 6 were refused
        assert len(accepted) + len(refused) == len(vols) and 1 <= len(accepted) <= 2 and set(refused) == {429}
        c = ServerClient(s.url)
        finals = [c.wait(j, poll_s=0.1, timeout=120) for j in accepted]
        assert all(f["status"] == "done" for f in finals), finals
        spans = sorted((f["started"], f["finished"]) for f in finals)
        assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:]))  # one device, one job at a time


def test_delete_cancels_a_running_job(srv, ct):
    c = ServerClient(srv.url, token=TOKEN)
    hold = Hold("inference")  # the job stops at its first window until the DELETE has been answered
    srv.manager.on_stage = hold
    try:
        jid = c.submit([ct])
        assert hold.reached.wait(60)
        assert c.status(jid)["status"] == "running"
        assert c.cancel(jid) == {"id": jid, "status": "cancelled"}
    finally:
        srv.manager.on_stage = None
        hold.release.set()
    st = c.wait(jid, poll_s=0.05, timeout=60)
    assert st["status"] == "cancelled" and "files" not in st
    assert not (srv.manager.work_dir / jid).exists()
    assert raw("GET", f"{srv.url}/jobs/{jid}/files/summary.json")[0] == 409


def test_retention_removes_finished_jobs(srv, ct):
    c = ServerClient(srv.url, token=TOKEN)
    jid = c.submit([ct])
    assert c.wait(jid, poll_s=0.05, timeout=60)["status"] == "done"
    assert srv.manager.cleanup(now=time.time() + 10) == 0  # not yet
    assert srv.manager.cleanup(now=time.time() + 3601) >= 1
    assert raw("GET", f"{srv.url}/jobs/{jid}")[0] == 404 and not (srv.manager.work_dir / jid).exists()


def test_refused_input_is_a_failed_job_that_names_the_fix(tmp_path, ct):
    """The server's own parameters do not switch the input-domain check off: a phantom that is no head is refused."""
    cfg = ServerConfig(params=SegmentParams(heatmaps=(), threads=1), work_dir=tmp_path / "w")
    with InferenceServer(cfg) as s:
        c = ServerClient(s.url)
        st = c.wait(c.submit([ct]), poll_s=0.05, timeout=60)
        assert st["status"] == "failed" and st["error_type"] == "UnusualInputError", st
        assert "--allow-unusual-input" in st["error"] and str(tmp_path) not in st["error"]
        ok = c.wait(c.submit([ct], params={"allow_unusual_input": True}), poll_s=0.05, timeout=60)
        assert ok["status"] == "done", ok


def test_named_channels_and_zipped_dicom(tmp_path):
    model = write_bundle(tmp_path / "mc", channels=("CBF", "Tmax"))
    a, b = _vol(tmp_path / "a.nii.gz"), _vol(tmp_path / "b.mha")
    with InferenceServer(ServerConfig(model=str(model), devices=(), work_dir=tmp_path / "w")) as s:
        c = ServerClient(s.url)
        assert c.models()["models"][0]["channels"] == ["CBF", "Tmax"]
        jid = c.submit([f"tmax={b}", f"CBF={a}"])
        job = s.manager.jobs[jid]
        assert [p.name for p in job.inputs] == ["input1.nii.gz", "input0.mha"]  # stored names, in channel order
        with pytest.raises(ServerError, match="missing input"):
            c.submit({"CBF": a})
    # DICOM series as a zip: extracted into a folder, wrapper folders skipped, traversal refused
    img, _ = ct_phantom(shape_kji=(4, 16, 16))
    series = tmp_path / "series"
    write_ct_series(img, series)
    z = tmp_path / "up" / "input0.zip"
    z.parent.mkdir()
    with zipfile.ZipFile(z, "w") as zf:
        for f in series.iterdir():
            zf.write(f, f"wrapper/series/{f.name}")
    folder = _prepare_input(z, 1 << 30)
    assert folder.name == "series" and folder.parent.parent == z.parent / "input0"
    assert read_image(folder).shape_ijk == img.shape_ijk
    evil = tmp_path / "up" / "input1.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape.txt", "x")
    with pytest.raises(InputError, match="unsafe path"):
        _prepare_input(evil, 1 << 30)
    assert not (tmp_path / "escape.txt").exists()


def test_bind_rules():
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", TOKEN)
    with pytest.raises(UsageError, match="--token-file"):
        check_bind("0.0.0.0", None)


def test_cli_serve_end_to_end(tmp_path):
    tok = tmp_path / "token"
    tok.write_text(TOKEN + "\n")
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO / "UNetSegment"))
    cmd = [sys.executable, "-m", "UNetSegmentLib.cli", "serve", "--port", str(port), "--token-file", str(tok), "--heatmap", "none",
           "--threads", "1", "--work-dir", str(tmp_path / "w")]
    r = subprocess.run(cmd[:4] + ["--host", "0.0.0.0"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "--token-file" in r.stderr
    tok.chmod(0o644)  # readable by others: refused like ssh refuses such a key
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "accessible by other users" in r.stderr and f"chmod 600 {tok}" in r.stderr
    tok.chmod(0o600)
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        c = ServerClient(f"http://127.0.0.1:{port}", token_file=tok)
        t0 = time.time()
        while True:
            try:
                c.health()
                break
            except ServerError:
                assert p.poll() is None and time.time() - t0 < 60, p.stderr.read() if p.poll() is not None else "timeout"
                time.sleep(0.1)
        assert raw("GET", f"http://127.0.0.1:{port}/health", token=None)[0] == 401
        assert c.health()["auth"] is True and c.models()["default"] == default_model_name()
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)
    assert p.returncode == 0


def _drive(proc: RemoteProcess, timeout: float = 120.0) -> None:
    """What the GUI timer does: poll until the run has finished."""
    t0 = time.time()
    while proc.poll():
        assert time.time() - t0 < timeout
        time.sleep(0.02)


def test_remote_process_has_the_local_workers_interface(srv, ct, tiny_bundle, tmp_path):
    events, codes = [], []
    req = {"inputs": [str(ct)], "output_dir": str(tmp_path / "out"), "model": None,
           "params": SegmentParams(heatmaps=(), threshold=0.45, allow_unusual_input=True).as_dict(), "overwrite": False, "stop_file": None}
    (tmp_path / "request.json").write_text(json.dumps(req))
    proc = RemoteProcess(events.append, codes.append, ServerClient(srv.url, token=TOKEN), poll_s=0.05)
    proc.start(str(tmp_path / "request.json"), None)
    assert proc.is_running()
    _drive(proc)
    assert codes == [0] and not proc.is_running()
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "done" and "progress" in kinds
    done = events[-1]
    assert done["output_dir"] == req["output_dir"] and done["summary"]["parameters"]["threshold"] == 0.45
    assert (tmp_path / "out" / "segmentation.seg.nrrd").is_file()
    assert raw("GET", f"{srv.url}/jobs/{proc.job_id}")[0] == 404  # the server's copy was removed after the download
    # stop right away: CancelledError / 130, no outputs
    events.clear(), codes.clear()
    req["output_dir"] = str(tmp_path / "out2")
    (tmp_path / "request.json").write_text(json.dumps(req))
    hold = Hold("started")  # the job cannot finish before the stop, however the threads are scheduled
    srv.manager.on_stage = hold
    try:
        proc.start(str(tmp_path / "request.json"), None)
        proc.stop()
        _drive(proc)
    finally:
        srv.manager.on_stage = None
        hold.release.set()
    assert codes == [130] and events[-1]["kind"] == "CancelledError" and not (tmp_path / "out2" / "summary.json").exists()
    # a model the server does not have: a ModelError event, exit code 4
    events.clear(), codes.clear()
    req["model"] = str(tiny_bundle)  # a local bundle folder named 'bundle'
    (tmp_path / "request.json").write_text(json.dumps(req))
    proc.start(str(tmp_path / "request.json"), None)
    _drive(proc)
    assert codes == [4] and events[-1]["kind"] == "ModelError" and "'bundle'" in events[-1]["message"]


# --------------------------------------------------------------------------------------------
# Issue 14: private storage, owned work folder, slow uploads, error shape, OpenAPI, devices
# --------------------------------------------------------------------------------------------
def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def test_uploads_and_job_folders_are_private(tmp_path, ct, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    old = os.umask(0o022)  # the usual umask, which would give 0644 files in 0755 folders
    try:
        _check_private_storage(tmp_path, ct)
    finally:
        os.umask(old)


def _check_private_storage(tmp_path: Path, ct: Path) -> None:
    for given in (tmp_path / "given", None):  # a --work-dir it creates, and its own folder under the cache
        with InferenceServer(ServerConfig(devices=(), work_dir=given)) as s:  # no inference thread: the job stays queued
            jid = ServerClient(s.url).submit([ct])
            job = s.manager.work_dir / jid
            upload = job / "inputs" / "input0.nii.gz"
            assert upload.is_file()
            assert [_mode(p) for p in (s.manager.work_dir, job, job / "inputs", job / "out", upload)] == [0o700] * 4 + [0o600]
            if given is None:
                assert s.manager.work_dir.parent == server_cache_root() == tmp_path / "cache" / "unetsegment" / "server"
                assert _mode(server_cache_root()) == 0o700
                assert (s.manager.work_dir / LOCK_NAME).read_text().strip() == str(os.getpid())
        assert given is not None or not s.manager.work_dir.exists()  # its own folder goes at the end


def test_a_zipped_series_is_extracted_privately(tmp_path):
    img, _ = ct_phantom(shape_kji=(3, 16, 16))
    write_ct_series(img, tmp_path / "series")
    up = tmp_path / "up"
    up.mkdir(mode=0o700)
    with zipfile.ZipFile(up / "input0.zip", "w") as zf:
        for f in (tmp_path / "series").iterdir():
            zf.write(f, f"a/b/{f.name}")
    folder = _prepare_input(up / "input0.zip", 1 << 30)
    assert {_mode(p) for p in (up / "input0", up / "input0" / "a", folder)} == {0o700}
    assert {_mode(p) for p in folder.iterdir()} == {0o600}


def test_stale_work_folders_of_dead_servers_are_removed_on_start(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = server_cache_root()
    root.mkdir(parents=True)
    dead = root / "srv-dead"  # lock file present, nobody holds it: a killed server (even if its pid is reused)
    (dead / ("0" * 32) / "inputs").mkdir(parents=True)
    (dead / LOCK_NAME).write_text(f"{os.getpid()}\n")  # a live pid, but no lock: still stale
    live = root / "srv-live"
    live.mkdir()
    held = DirLock(live)
    assert held.acquire()
    starting = root / "srv-starting"  # no lock yet and just made: a server that is starting
    starting.mkdir()
    other = root / "notes"  # not ours
    other.mkdir()
    m = JobManager(ServerConfig(devices=()))
    try:
        assert not dead.exists() and live.is_dir() and starting.is_dir() and other.is_dir()
        assert m.work_dir.parent == root and m.work_dir.name.startswith("srv-")
        # a second server cannot take a folder in use
        with pytest.raises(UsageError, match="another unetsegment server uses the work folder"):
            JobManager(ServerConfig(devices=(), work_dir=m.work_dir))
    finally:
        m.stop()
        held.release()
    assert not m.work_dir.exists()
    JobManager(ServerConfig(devices=())).stop()  # the live one's lock is released now: removed like any dead one
    assert not live.exists()


def test_a_killed_server_leaves_no_uploads_behind(tmp_path, ct, monkeypatch):
    """kill -9 a real `unetsegment serve` holding an upload; the next server start removes its folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    env = dict(os.environ, PYTHONPATH=str(REPO / "UNetSegment"))
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "UNetSegmentLib.cli", "serve", "--port", str(port), "--heatmap", "none",
                          "--device", "cpu", "--threads", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        c = ServerClient(f"http://127.0.0.1:{port}")
        t0 = time.time()
        while not c._reachable():
            assert p.poll() is None and time.time() - t0 < 60, "the server did not start"
            time.sleep(0.1)
        c.submit([ct])
    finally:
        p.kill()
        p.wait(timeout=30)
        p.stderr.close()
    root = tmp_path / "cache" / "unetsegment" / "server"
    [left] = [d for d in root.iterdir() if d.name.startswith("srv-")]
    assert list(left.glob("*/inputs")) or list(left.glob("*/out"))  # the killed server's job folder is still there
    m = JobManager(ServerConfig(devices=()))  # with the same cache: the next start
    m.stop()
    assert not left.exists() and not list(root.iterdir())


def test_token_file_readable_by_others_is_refused(tmp_path):
    tok = tmp_path / "token"
    tok.write_text(TOKEN + "\n")
    for mode in (0o644, 0o640, 0o604):
        tok.chmod(mode)
        with pytest.raises(UsageError, match="accessible by other users") as e:
            read_token_file(tok)
        assert e.value.fix == f"chmod 600 {tok}"
    tok.chmod(0o600)
    assert read_token_file(tok) == TOKEN


def _zip(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def test_broken_zips_are_a_clean_400_without_server_paths(srv, tmp_path):
    cases = {
        "empty.zip": ([], "empty zip"),
        "clash.zip": ([("a", b"x"), ("a/b.dcm", b"y")], "both a file and a folder"),
        "clash2.zip": ([("a/b.dcm", b"y"), ("a", b"x")], "both a file and a folder"),
        "hidden.zip": ([("__MACOSX/x", b"y")], "only hidden"),
    }
    for name, (entries, words) in cases.items():
        code, body, _ = raw("POST", srv.url + "/jobs", files=[("CT", _zip(tmp_path / name, entries))])
        assert code == 400 and set(body) == {"error", "fix"}, (name, body)
        assert words in body["error"] and name in body["error"] and "internal" not in body["error"], body
        assert str(srv.manager.work_dir) not in json.dumps(body) and " /" not in body["error"] and "'/" not in body["error"], body
    assert _job_dirs(srv) <= set(srv.manager.jobs)


def test_job_errors_are_redacted(srv):
    m = srv.manager
    msg = f"cannot read {m.work_dir}/{'a' * 32}/inputs/input0.nii.gz and /opt/site/models/x/model.json"
    out = m.redact(msg)
    assert str(m.work_dir) not in out and "/opt" not in out and "input0.nii.gz" in out and "model.json" in out
    assert m.redact("upload too slow: 12 KiB/s, see http://127.0.0.1:8000/jobs") == "upload too slow: 12 KiB/s, see http://127.0.0.1:8000/jobs"


def test_one_error_shape_openapi_docs_and_devices(srv):
    import torch

    for method, path, code in (("GET", "/nonexistent", 404), ("PUT", "/health", 405), ("POST", "/models", 405),
                               ("GET", "/jobs/" + "0" * 32, 404), ("GET", "/jobs/x/files/summary.json", 404)):
        got, body, headers = raw(method, srv.url + path)
        assert got == code and set(body) == {"error", "fix"} and body["error"] and body["fix"], (path, body)
        assert headers.get_content_type() == "application/json"
        if code == 405:
            assert "Allow" in headers
    # 422 (FastAPI's own validation) gets the same shape: a route with a typed parameter
    app = srv.app.app  # behind BearerAuth
    app.add_api_route("/probe-422", lambda n: {"n": n}, methods=["GET"])  # ``n`` untyped: required query parameter
    got, body, _ = raw("GET", srv.url + "/probe-422")
    assert got == 422 and set(body) == {"error", "fix"} and "n" in body["error"]
    # schema and docs: behind the token like everything else
    assert raw("GET", srv.url + "/openapi.json", token=None)[0] == 401 and raw("GET", srv.url + "/docs", token=None)[0] == 401
    got, schema, headers = raw("GET", srv.url + "/openapi.json")
    assert got == 200 and headers.get_content_type() == "application/json"
    assert {"/health", "/models", "/jobs", "/jobs/{jid}", "/jobs/{jid}/files/{name}"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/jobs"]["post"]["requestBody"]["content"]
    assert {"text/csv", "image/png", "application/json"} <= set(
        schema["paths"]["/jobs/{jid}/files/{name}"]["get"]["responses"]["200"]["content"])
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    with urllib.request.urlopen(urllib.request.Request(srv.url + "/docs", headers={"Authorization": f"Bearer {TOKEN}"})) as r:
        page = r.read().decode()
        assert r.headers.get_content_type() == "text/html" and "SwaggerUIBundle" in page and '"/jobs/{jid}"' in page
    # /health: the devices inference really runs on
    h = ServerClient(srv.url, token=TOKEN).health()
    assert h["cuda_available"] == torch.cuda.is_available() and len(h["gpus"]) == (torch.cuda.device_count() if h["cuda_available"] else 0)
    [dev] = h["devices"]
    assert dev["worker"] == "auto"
    if torch.cuda.is_available():
        assert dev["device"] == "cuda:0" and dev["name"] == torch.cuda.get_device_name(0)
    else:
        assert dev == {"worker": "auto", "device": "cpu", "name": "cpu"}
    assert h["uploading"] == 0


def _slow_upload(port: int, body_prefix: bytes, total: int) -> socket.socket:
    """A raw POST /jobs that announces ``total`` body bytes and sends only ``body_prefix``."""
    sk = socket.create_connection(("127.0.0.1", port), timeout=30)
    sk.sendall(b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=zzz\r\n"
               + f"Content-Length: {total}\r\n\r\n".encode() + body_prefix)
    return sk


def _answer(sk: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            dict(l.split(b": ", 1) for l in data.split(b"\r\n\r\n")[0].split(b"\r\n")[1:] if b": " in l).get(b"content-length", b"0")):
        chunk = sk.recv(65536)
        if not chunk:
            break
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def test_slow_uploads_neither_hold_the_queue_nor_stay_open(tmp_path, ct):
    n_slow = 6
    # a grace period no test run reaches: the slow uploads stay open until the test changes the limits
    cfg = ServerConfig(devices=(), max_queued=2, max_uploads=n_slow + 2, upload_grace_s=3600.0, upload_min_rate=4096,
                       work_dir=tmp_path / "w")
    part = b"--zzz\r\nContent-Disposition: form-data; name=\"CT\"; filename=\"ct.nii.gz\"\r\n\r\n" + b"\x1f\x8b"
    with InferenceServer(cfg) as s:
        c = ServerClient(s.url)
        slow = [_slow_upload(s.port, part, 1 << 20) for _ in range(n_slow)]
        try:
            t0 = time.time()
            while c.health()["uploading"] < n_slow:  # wait until the server is receiving every one of them
                assert time.time() - t0 < 30, c.health()
                time.sleep(0.02)
            # real uploads are accepted meanwhile (the slow ones hold no queue slot) up to the queue's limit
            jobs = [c.submit([ct]), c.submit([ct])]
            h = c.health()
            assert (h["queued"], h["uploading"]) == (2, n_slow)
            with pytest.raises(ServerError) as e:
                c.submit([ct])
            assert e.value.status == 429
            # a trickle is no better than a stall: past the grace period, the next byte below the rate ends it
            cfg.upload_grace_s, cfg.upload_min_rate = 0.0, 1e12
            for sk in slow:
                sk.sendall(b"\x00")
                code, body = _answer(sk)
                assert code == 408 and "upload too slow" in body["error"] and "KiB/s" in body["error"] and body["fix"], body
        finally:
            for sk in slow:
                sk.close()
        h = c.health()
        assert h["uploading"] == 0 and h["queued"] == 2
        assert _job_dirs(s) == set(jobs)  # nothing left from the cut-off uploads
    # a stalled client is cut off by the rate after the grace period, and by the body deadline
    for limits, words in ((dict(upload_grace_s=0.2, upload_timeout_s=3600.0), "upload too slow"),
                          (dict(upload_grace_s=3600.0, upload_timeout_s=0.2), "not complete after")):
        with InferenceServer(dataclasses.replace(cfg, work_dir=tmp_path / "w2", upload_min_rate=4096, **limits)) as s2:
            sk = _slow_upload(s2.port, part, 1 << 20)
            try:
                code, body = _answer(sk)
            finally:
                sk.close()
            assert code == 408 and words in body["error"], body


def test_uploads_beyond_max_uploads_get_503(tmp_path, ct):
    cfg = ServerConfig(devices=(), max_uploads=1, upload_grace_s=3600.0, work_dir=tmp_path / "w")
    part = b"--zzz\r\nContent-Disposition: form-data; name=\"CT\"; filename=\"ct.nii.gz\"\r\n\r\n" + b"\x1f\x8b"
    with InferenceServer(cfg) as s:
        c = ServerClient(s.url)
        sk = _slow_upload(s.port, part, 1 << 20)
        try:
            t0 = time.time()
            while c.health()["uploading"] < 1:
                assert time.time() - t0 < 30
                time.sleep(0.02)
            with pytest.raises(ServerError, match="receiving 1 uploads") as e:
                c.submit([ct])
            assert e.value.status == 503
        finally:
            sk.close()  # the client goes away: its upload ends and its folder is removed
        t0 = time.time()
        while c.health()["uploading"]:
            assert time.time() - t0 < 30
            time.sleep(0.02)
        assert c.submit([ct]) and len(_job_dirs(s)) == 1
