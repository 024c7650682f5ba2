"""`deeplab serve` throughput and latency against `deeplab segment` on the same CamVid frames.

The baseline is ``deeplab segment`` on --images CamVid val frames (480x360) in one subprocess:
its images/s end to end (interpreter start, model load and all), and its images/s in the loop
without the model load and without the first image (oneDNN's kernel selection), from the
per-image seconds of its ``--summary`` CSV. It writes a label PNG and an overlay JPEG per image;
the service is asked for the label PNG only (``output=labels``).

The candidates are ``deeplab serve`` (``python -m deeplab serve``, a fresh server for every
configuration, so that its peak memory is its own) with batching (``--max-batch``, default 8)
and without (``--max-batch 1``), each at 1, 4 and 16 concurrent clients (--clients). A client
is a thread that posts one image's bytes at a time with urllib and waits for the answer; the
clients share the --images frames, each frame posted once. One untimed request per client comes
first (the first forward pass of each shape is slower).

Prints, per configuration: images/s and its ratio to segment's loop (and to segment end to end),
the client-side p50 / p95 latency, the mean batch size the server reported
(X-Deeplab-Batch-Size), the server's peak RSS (VmHWM) and the answers whose label PNG differs
from the one ``deeplab segment`` wrote for that frame (the figures mean nothing if the answers
are wrong; mismatches are listed).

Usage: python benchmarks/bench_serve.py [--images 32] [--clients 1,4,16] [--max-batch 8]
       [--workers 1] [--weights FILE] [--data-root ../shared/data/camvid_segnet] [--quick]
Run it under the shared lock: flock /tmp/deeplab-bench.lock python benchmarks/bench_serve.py
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from _machine import data_root, machine_line  # benchmarks/_machine.py (run as python benchmarks/X.py)


@dataclass
class _Run:
    """One server configuration at one client count."""

    name: str
    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    peak_rss_mib: float = float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _Server:
    """``python -m deeplab serve`` on 127.0.0.1 at a free port, its output in ``log``."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._fh = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deeplab", "serve", "--port", str(self.port), "--log-level", "warning", *args],
            stdout=self._fh, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if json.load(r)["status"] == "ok":
                        return
            except (OSError, ValueError):
                time.sleep(0.2)
        self.stop()
        sys.exit(f"the server did not answer /healthz in {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._fh.close()


def _post(url: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"{url}/v1/segment?output=labels", data=data, method="POST",
                                 headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def _differing_pixels(a: bytes, b: bytes) -> str:
    import numpy as np
    from PIL import Image

    try:
        x, y = (np.asarray(Image.open(io.BytesIO(v))) for v in (a, b))
    except OSError as e:
        return f"not a PNG ({e})"
    if x.shape != y.shape:
        return f"shape {x.shape} instead of {y.shape}"
    return f"{int((x != y).sum())} of {x.size} pixels differ"


def _segment_baseline(files: list[Path], out: Path, weights: Path | None) -> dict:
    """``deeplab segment`` on ``files``: wall time of the command, per-image seconds, peak RSS."""
    summary = out / "summary.csv"
    cmd = [sys.executable, "-m", "deeplab", "segment", *map(str, files), "--out", str(out), "--summary", str(summary)]
    if weights is not None:
        cmd += ["--weights", str(weights)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child alone: its own peak RSS
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
    if proc.returncode != 0:
        sys.exit(f"deeplab segment failed ({proc.returncode}):\n{stderr[-3000:]}")
    with open(summary, newline="") as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    line = next((ln for ln in stdout.splitlines() if ln.startswith("segmented ")), "")
    return {"wall": wall, "seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "line": line}


def _measure(name: str, server_args: list[str], clients: int, cases: list[tuple[str, bytes, bytes]],
             log: Path) -> tuple[_Run, dict]:
    run = _Run(name, clients)
    server = _Server(server_args, log)
    try:
        server.wait_ready()
        with urllib.request.urlopen(server.url + "/v1/model", timeout=30) as r:
            model = json.load(r)
        lock = threading.Lock()

        def one(case: tuple[str, bytes, bytes], timed: bool) -> None:
            stem, data, expected = case
            t0 = time.perf_counter()
            try:
                status, headers, body = _post(server.url, data)
            except OSError as e:
                status, headers, body = 0, {}, str(e).encode()
            latency = time.perf_counter() - t0
            with lock:
                if status != 200:
                    run.errors.append(f"{stem}: HTTP {status} {body[:200]!r}")
                    return
                if body != expected:
                    run.mismatches.append(f"{stem}: {_differing_pixels(body, expected)}")
                if timed:
                    run.latencies.append(latency)
                    run.batch_sizes.append(int(headers.get("x-deeplab-batch-size", 0)))

        with ThreadPoolExecutor(clients) as pool:
            # The warm-up: one request per client, together, untimed (still checked).
            list(pool.map(lambda c: one(c, False), [cases[i % len(cases)] for i in range(clients)]))
            t0 = time.perf_counter()
            list(pool.map(lambda c: one(c, True), cases))
            run.seconds = time.perf_counter() - t0
        run.peak_rss_mib = _vm_hwm_mib(server.proc.pid)
    finally:
        server.stop()
    return run, model


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", type=Path,
                    default=data_root() / "camvid_segnet")
    ap.add_argument("--images", type=int, default=None, help="CamVid val frames, each posted once per run "
                    "(default 32; 4 with --quick)")
    ap.add_argument("--clients", default=None, help="comma-separated concurrent clients (default 1,4,16; 1,4 with "
                    "--quick)")
    ap.add_argument("--max-batch", type=int, default=8, help="the batching server's --max-batch (the other has 1)")
    ap.add_argument("--workers", type=int, default=1, help="the servers' --workers")
    ap.add_argument("--weights", type=Path, default=None, help="weights (default: the packaged model)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few images and clients")
    args = ap.parse_args()

    n_images = args.images if args.images is not None else (4 if args.quick else 32)
    try:
        clients = [int(c) for c in (args.clients or ("1,4" if args.quick else "1,4,16")).split(",") if c.strip()]
    except ValueError:
        ap.error(f"--clients {args.clients!r}: expected comma-separated counts such as 1,4,16")
    if n_images < 2 or not clients or min(clients) < 1 or args.max_batch < 2 or args.workers < 1:
        ap.error("expected --images >= 2, --clients >= 1, --max-batch >= 2 and --workers >= 1")
    files = sorted((args.data_root / "val").glob("*.png"))[:n_images]
    if len(files) < n_images:
        sys.exit(f"{args.data_root / 'val'} holds {len(files)} frames; asked for {n_images}")
    import torch

    print(f"deeplab serve vs deeplab segment: {n_images} CamVid val frames ({args.data_root / 'val'}), "
          f"weights {args.weights or 'the packaged default'}, {args.workers} worker(s); torch {torch.__version__}, "
          f"{machine_line()}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        base = _segment_baseline(files, tmp_path / "segment", args.weights)
        cases = [(f.stem, f.read_bytes(), (tmp_path / "segment" / f"{f.stem}.png").read_bytes()) for f in files]
        print(f"  ran deeplab segment: {base['line']}", flush=True)
        common = ["--workers", str(args.workers)] + (["--weights", str(args.weights)] if args.weights else [])
        configs = [(f"batch {args.max_batch}", ["--max-batch", str(args.max_batch)]), ("batch 1", ["--max-batch", "1"])]
        runs, model = [], {}
        for name, extra in configs:
            for c in clients:
                run, model = _measure(name, [*common, *extra], c, cases, tmp_path / f"{name}_{c}.log".replace(" ", "_"))
                runs.append(run)
                print(f"  ran serve {name}, {c} client(s): {len(cases) / run.seconds:.2f} images/s", flush=True)

    loop_s = base["seconds"][1:]
    seg_loop = len(loop_s) / sum(loop_s)
    seg_e2e = n_images / base["wall"]
    print(f"\nmodel {model.get('name')}, precision {model.get('precision')}")
    print(f"{'variant':>22}  {'clients':>7}  {'images/s':>8}  {'x segment':>9}  {'x seg e2e':>9}  {'p50 ms':>7}  "
          f"{'p95 ms':>7}  {'mean batch':>10}  {'peak RSS MiB':>12}  {'wrong':>5}")
    print(f"{'segment (loop)':>22}  {'-':>7}  {seg_loop:8.2f}  {1.0:8.2f}x  {seg_loop / seg_e2e:8.2f}x  "
          f"{1000 * statistics.median(loop_s):7.0f}  {1000 * _percentile(loop_s, 95):7.0f}  {'1':>10}  "
          f"{base['peak_rss_mib']:12.0f}  {'-':>5}")
    print(f"{'segment (end to end)':>22}  {'-':>7}  {seg_e2e:8.2f}  {seg_e2e / seg_loop:8.2f}x  {1.0:8.2f}x  "
          f"{'':>7}  {'':>7}  {'1':>10}  {base['peak_rss_mib']:12.0f}  {'-':>5}")
    wrong_total = 0
    for run in runs:
        rate = len(run.latencies) / run.seconds if run.seconds else float("nan")
        mean_batch = statistics.mean(run.batch_sizes) if run.batch_sizes else float("nan")
        wrong = len(run.mismatches) + len(run.errors)
        wrong_total += wrong
        print(f"{'serve ' + run.name:>22}  {run.clients:7d}  {rate:8.2f}  {rate / seg_loop:8.2f}x  "
              f"{rate / seg_e2e:8.2f}x  {1000 * _percentile(run.latencies, 50):7.0f}  "
              f"{1000 * _percentile(run.latencies, 95):7.0f}  {mean_batch:10.2f}  {run.peak_rss_mib:12.0f}  {wrong:5d}")
    print("segment (loop): deeplab segment's images/s without the model load and the first image (its --summary "
          "seconds; it also draws and writes an overlay JPEG per image); segment (end to end): the whole command. "
          "x segment / x seg e2e: images/s over those. latency: per request, seen by the client (for segment: "
          "seconds per image). mean batch: X-Deeplab-Batch-Size. peak RSS: the server's VmHWM (segment's ru_maxrss). "
          "wrong: answers whose label PNG is not segment's, or errors.")
    for run in runs:
        for line in run.errors + run.mismatches:
            print(f"  serve {run.name}, {run.clients} client(s): {line}")
    if wrong_total:
        print(f"{wrong_total} answer(s) differ from deeplab segment's labels or failed: the figures above are not "
              "comparable", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
