#!/usr/bin/env python3
"""Load test of ``unetsegment serve`` on loopback: concurrent clients submitting and polling.

Starts the server as its own process (``unetsegment serve`` on 127.0.0.1, a free port, a bearer
token, the bundled tiny model, ``--heatmap none``), then runs ``--clients`` threads. Each client
submits ``--jobs`` small synthetic head volumes one after another: on HTTP 429 (queue full) it
waits the server's Retry-After (capped at ``--retry-s``) and tries again; once accepted it polls
``GET /jobs/{id}`` every ``--poll-s`` until the job ends, then downloads ``summary.json``.
Everything is bounded: a client stops submitting at ``--time-limit``; jobs still queued then are
cancelled and counted as unfinished.

Prints: throughput (finished jobs per second), latency percentiles (submit, poll, job end to end),
peak server RSS (sampled every 50 ms, server process and children), and the fate of every job:
done / failed / refused (429 answers) / unfinished at the time limit / lost. *Lost* means a job the
server accepted that the client could not follow to an end state (vanished, 5xx, connection
errors) — the figure that must be 0.

usage: python bench/server_load.py [--clients 50] [--jobs 1] [--max-queued 16] [--time-limit 300]
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "UNetSegment"))
sys.path.insert(0, str(REPO / "Testing"))

from UNetSegmentLib.serving.client import ServerClient, ServerError  # noqa: E402


def pct(values, q) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_volumes(folder: Path, n: int, shape) -> list[Path]:
    import SimpleITK as sitk
    from conftest import ct_phantom

    from UNetSegmentLib.image import to_sitk

    out = []
    for i in range(n):
        img, _ = ct_phantom(shape_kji=shape, seed=i)
        p = folder / f"vol{i}.nii.gz"
        sitk.WriteImage(to_sitk(img), str(p))
        out.append(p)
    return out


class RssSampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self):
        import psutil

        while not self.stop.is_set():
            try:
                rss = self.proc.memory_info().rss + sum(c.memory_info().rss for c in self.proc.children(recursive=True))
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=1, help="jobs per client")
    ap.add_argument("--max-queued", type=int, default=16)
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds after which clients stop submitting")
    ap.add_argument("--poll-s", type=float, default=0.5)
    ap.add_argument("--retry-s", type=float, default=2.0, help="longest wait before re-submitting after a 429")
    ap.add_argument("--shape", type=int, nargs=3, default=(8, 48, 48), metavar=("K", "J", "I"))
    ap.add_argument("--threads", type=int, default=None, help="server --threads (default: all cores)")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="unetsegment-load-"))
    vols = make_volumes(work, 8, tuple(a.shape))
    token = secrets.token_urlsafe(32)
    (work / "token").write_text(token)
    os.chmod(work / "token", 0o600)
    port = free_port()
    cmd = [sys.executable, "-m", "UNetSegmentLib.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--token-file",
           str(work / "token"), "--max-queued", str(a.max_queued), "--heatmap", "none", "--work-dir", str(work / "serve")]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "UNetSegment"))
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "server.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        c0 = ServerClient(url, token=token)
        t0 = time.time()
        while True:
            try:
                c0.health()
                break
            except ServerError:
                if server.poll() is not None or time.time() - t0 > 60:
                    print((work / "server.log").read_text(), file=sys.stderr)
                    return 1
                time.sleep(0.1)
        sampler = RssSampler(server.pid)
        sampler.start()
        rss_idle = sampler.proc.memory_info().rss

        lock = threading.Lock()
        submit_lat, poll_lat, job_lat = [], [], []
        fate = {"done": 0, "failed": 0, "unfinished": 0, "lost": 0, "gave_up": 0}
        refusals = {"429": 0, "other": 0}
        errors: list[str] = []
        start = threading.Event()
        deadline = [0.0]

        def client(ci: int):
            c = ServerClient(url, token=token, timeout=30)
            c._health = {"max_upload_bytes": 1 << 40}  # skip the per-client /health before each upload
            start.wait()
            for jn in range(a.jobs):
                vol = vols[(ci + jn) % len(vols)]
                t_first = time.perf_counter()
                jid = None
                while jid is None:
                    if time.time() > deadline[0]:
                        with lock:
                            fate["gave_up"] += 1
                        return
                    t = time.perf_counter()
                    try:
                        jid = c.submit([vol])
                        with lock:
                            submit_lat.append(time.perf_counter() - t)
                    except ServerError as e:
                        with lock:
                            refusals["429" if e.status == 429 else "other"] += 1
                            if e.status != 429:
                                errors.append(f"submit: {e}")
                        time.sleep(min(a.retry_s, 0.5 + 1.5 * np.random.rand()))
                while True:
                    t = time.perf_counter()
                    try:
                        st = c.status(jid)
                    except ServerError as e:
                        with lock:
                            fate["lost"] += 1
                            errors.append(f"poll {jid}: {e}")
                        break
                    with lock:
                        poll_lat.append(time.perf_counter() - t)
                    if st["status"] in ("done", "failed", "cancelled"):
                        with lock:
                            if st["status"] == "done":
                                job_lat.append(time.perf_counter() - t_first)
                                fate["done"] += 1
                            else:
                                fate["failed"] += 1
                                errors.append(f"job {jid}: {st['status']} {st.get('error')}")
                        if st["status"] == "done":
                            try:
                                c.download_file(jid, "summary.json", work / f"summary-{jid}.json")
                            except ServerError as e:
                                with lock:
                                    errors.append(f"download {jid}: {e}")
                        break
                    if time.time() > deadline[0] + 120:  # accepted but not finished long after the limit
                        try:
                            c.cancel(jid)
                        except ServerError:
                            pass
                        with lock:
                            fate["unfinished"] += 1
                        break
                    time.sleep(a.poll_s)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
        for t in threads:
            t.start()
        t_start = time.perf_counter()
        deadline[0] = time.time() + a.time_limit
        start.set()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
        sampler.stop.set()
        sampler.join()
        downloaded = len(list(work.glob("summary-*.json")))
        submitted = a.clients * a.jobs
        accounted = fate["done"] + fate["failed"] + fate["unfinished"] + fate["lost"] + fate["gave_up"]

        print(f"server: {url} (loopback), tiny-blob, --heatmap none, volumes {tuple(a.shape)} KJI, max_queued {a.max_queued}, "
              f"{os.cpu_count()} CPU cores, python {sys.version.split()[0]}")
        print(f"clients: {a.clients} threads × {a.jobs} job(s) = {submitted} jobs; poll every {a.poll_s} s; time limit {a.time_limit:.0f} s")
        print(f"wall: {wall:.1f} s   throughput: {fate['done'] / wall:.3f} jobs/s ({fate['done'] / wall * 60:.1f} jobs/min)")
        print(f"submit latency (accepted uploads): p50 {pct(submit_lat, 50) * 1e3:.0f} ms  p90 {pct(submit_lat, 90) * 1e3:.0f} ms  "
              f"p99 {pct(submit_lat, 99) * 1e3:.0f} ms  (n={len(submit_lat)})")
        print(f"poll latency (GET /jobs/id):        p50 {pct(poll_lat, 50) * 1e3:.1f} ms  p90 {pct(poll_lat, 90) * 1e3:.1f} ms  "
              f"p99 {pct(poll_lat, 99) * 1e3:.1f} ms  (n={len(poll_lat)})")
        print(f"job latency (first try → done):    p50 {pct(job_lat, 50):.1f} s  p90 {pct(job_lat, 90):.1f} s  p99 {pct(job_lat, 99):.1f} s")
        print(f"peak server RSS: {sampler.peak / 2**20:.0f} MiB (idle after start {rss_idle / 2**20:.0f} MiB)")
        print(f"jobs: done {fate['done']}, failed {fate['failed']}, unfinished at limit {fate['unfinished']}, "
              f"gave up (refused until the limit) {fate['gave_up']}, lost {fate['lost']}   "
              f"[accounted {accounted}/{submitted}; summaries downloaded {downloaded}]")
        print(f"refusals: {refusals['429']} × HTTP 429 (queue full, retried), {refusals['other']} other")
        for e in errors[:10]:
            print(f"  error: {e}")
        ok = fate["lost"] == 0 and accounted == submitted and refusals["other"] == 0 and downloaded == fate["done"]
        print("result: every job finished or was refused cleanly — none lost" if ok else "result: PROBLEMS (see above)")
        return 0 if ok else 1
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
