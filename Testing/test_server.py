"""``unetsegment serve``: auth, limits, bad uploads, concurrent jobs, cancel, retention — on real uvicorn (loopback)."""
from __future__ import annotations

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

from UNetSegmentLib.bundle import default_model_name
from UNetSegmentLib.errors import InputError, UsageError
from UNetSegmentLib.image import to_sitk
from UNetSegmentLib.io.readers import read_image
from UNetSegmentLib.job import segment_files
from UNetSegmentLib.params import SegmentParams
from UNetSegmentLib.server import InferenceServer, ServerConfig, _prepare_input, check_bind
from UNetSegmentLib.server_client import RemoteProcess, ServerClient, ServerError, _MultipartBody

TOKEN = "test-token-" + "x" * 24
PARAMS = SegmentParams(heatmaps=(), threads=1)


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
    seen = []
    st = client.wait(jid, poll_s=0.05, timeout=120, progress=lambda s, f, m: seen.append((s, f)))
    assert st["status"] == "done", st
    assert st["error"] == "" and st["fraction"] == 1.0 and "gradcam.nrrd" in st["files"] and st["n_lesions"] >= 1
    assert any(s == "inference" for s, _ in seen)
    files = client.download(jid, tmp_path / "remote")
    assert {p.name for p in files} == set(st["files"]) and all(p.is_file() for p in files)
    with pytest.raises(Exception, match="--overwrite"):  # same folder guarantees as segment
        client.download(jid, tmp_path / "remote")
    segment_files([str(ct)], tmp_path / "local", "tiny-blob", SegmentParams(threshold=0.4, heatmaps=("gradcam",), threads=1))
    assert sorted(os.listdir(tmp_path / "local")) == sorted(st["files"])
    assert (tmp_path / "remote" / "lesions.csv").read_text() == (tmp_path / "local" / "lesions.csv").read_text()
    np.testing.assert_array_equal(read_image(tmp_path / "remote" / "segmentation.nii.gz").array,
                                  read_image(tmp_path / "local" / "segmentation.nii.gz").array)
    summ = json.loads((tmp_path / "remote" / "summary.json").read_text())
    assert summ["parameters"]["threshold"] == 0.4 and summ["parameters"]["heatmaps"] == ["gradcam"]
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
    assert {p.name for p in srv.manager.work_dir.iterdir()} <= set(srv.manager.jobs)  # nothing left from refused uploads
    # a readable upload that is not a volume: accepted, then the job fails saying why
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"\x1f\x8b" + os.urandom(300))
    code, body, _ = raw("POST", url, files=[("input", junk)], fields={"min-lesion-ml": "0.1", "tta": "false", "heatmap": "none"})
    assert code == 202 and body["status"] == "queued" and body["channels"] == ["CT"]
    st = ServerClient(srv.url, token=TOKEN).wait(body["id"], poll_s=0.05, timeout=60)
    assert st["status"] == "failed" and "junk" not in st["error"] and "corrupt" in st["error"] and st["error_type"] == "InputError"
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
    assert {p.name for p in srv.manager.work_dir.iterdir()} <= set(srv.manager.jobs)


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
        accepted = [r[1] for r in results if r[0] == "ok"]
        refused = [r[1] for r in results if r[0] == "refused"]
        assert len(accepted) + len(refused) == len(vols) and accepted and refused and set(refused) == {429}
        c = ServerClient(s.url)
        finals = [c.wait(j, poll_s=0.1, timeout=120) for j in accepted]
        assert all(f["status"] == "done" for f in finals), finals
        spans = sorted((f["started"], f["finished"]) for f in finals)
        assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:]))  # one device, one job at a time


def test_delete_cancels_a_running_job(srv, tmp_path):
    vol = _vol(tmp_path / "slow.nii.gz", shape=(40, 96, 96))
    c = ServerClient(srv.url, token=TOKEN)
    jid = c.submit([vol], params={"tta": True, "heatmaps": ("gradcam", "uncertainty"), "overlap": 0.75})
    t0 = time.time()
    while c.status(jid)["status"] == "queued" and time.time() - t0 < 30:
        time.sleep(0.02)
    assert c.cancel(jid) == {"id": jid, "status": "cancelled"}
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
           "params": SegmentParams(heatmaps=(), threshold=0.45).as_dict(), "overwrite": False, "stop_file": None}
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
    proc.start(str(tmp_path / "request.json"), None)
    proc.stop()
    _drive(proc)
    assert codes == [130] and events[-1]["kind"] == "CancelledError" and not (tmp_path / "out2" / "summary.json").exists()
    # a model the server does not have: a ModelError event, exit code 4
    events.clear(), codes.clear()
    req["model"] = str(tiny_bundle)  # a local bundle folder named 'bundle'
    (tmp_path / "request.json").write_text(json.dumps(req))
    proc.start(str(tmp_path / "request.json"), None)
    _drive(proc)
    assert codes == [4] and events[-1]["kind"] == "ModelError" and "'bundle'" in events[-1]["message"]
