"""`deeplab serve` as a real server on 127.0.0.1: 200 requests from 16 concurrent clients, each
answer equal to `deeplab segment`'s label PNG, batching seen and memory stable; killed mid-load,
the clients get errors within their timeout, not hangs; restarted, it serves again.

The tiny seeded model and small images keep the 200 requests to a few seconds; the packaged
model is served in test_serve_page.py.
"""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _evaluation_helpers import free_port, run_cli, tiny_weights
from _serve_helpers import LiveServer, photo, post_image, skip_without

skip_without("starlette")
skip_without("uvicorn")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, camvid_root):
    """Tiny weights, six small images of two sizes (CamVid frames and two synthetic pictures),
    and `deeplab segment`'s label PNG of each."""
    root = tmp_path_factory.mktemp("live")
    weights = tiny_weights(root / "tiny.safetensors")
    images = root / "images"
    images.mkdir()
    frames = sorted((camvid_root / "val").glob("*.png"))[:4]
    for i, frame in enumerate(frames):
        with Image.open(frame) as im:
            im.convert("RGB").resize((96, 72), Image.BILINEAR).save(images / f"frame{i}.png")
    for seed in (1, 2):
        Image.fromarray(photo(seed, (64, 80))).save(images / f"photo{seed}.png")
    out = root / "segment"
    assert run_cli(["segment", str(images), "--out", str(out), "--weights", str(weights)]) == 0
    cases = [(p.read_bytes(), (out / f"{p.stem}.png").read_bytes()) for p in sorted(images.glob("*.png"))]
    return root, weights, cases


def _server(root: Path, weights: Path, port: int, name: str) -> LiveServer:
    server = LiveServer(["--weights", str(weights), "--max-batch", "8", "--batch-window-ms", "20"], port,
                        root / f"{name}.log")
    server.wait_ready()
    return server


def test_200_requests_from_16_clients_are_all_correct_and_memory_is_stable(setup):
    root, weights, cases = setup
    server = _server(root, weights, free_port(), "load")
    try:
        def one(i: int):
            data, expected = cases[i % len(cases)]
            status, headers, body = post_image(server.url, data, timeout=60)
            return status, body == expected, int(headers.get("x-deeplab-batch-size", 0))

        with ThreadPoolExecutor(16) as pool:
            warm = list(pool.map(one, range(48)))
            rss_warm = server.rss_mb()
            t0 = time.perf_counter()
            rest = list(pool.map(one, range(48, 200)))
            seconds = time.perf_counter() - t0
        rss_end = server.rss_mb()
        results = warm + rest
        assert [s for s, _, _ in results] == [200] * 200
        assert all(ok for _, ok, _ in results), f"{sum(not ok for _, ok, _ in results)} answers differ from segment's"
        assert max(b for _, _, b in results) > 1, "16 concurrent clients never shared a forward pass"
        # Memory: the 152 requests after the warm-up add no more than allocator noise.
        assert rss_end - rss_warm < 80, (rss_warm, rss_end)
        print(f"152 requests in {seconds:.1f} s; RSS {rss_warm:.0f} -> {rss_end:.0f} MB; "
              f"batch sizes {sorted({b for _, _, b in results})}")
        import urllib.request

        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert 'deeplab_http_requests_total{method="POST",route="/v1/segment",status="200"} 200.0' in metrics
    finally:
        server.stop()


def test_killed_mid_load_the_clients_get_errors_and_a_restart_serves_again(setup):
    root, weights, cases = setup
    port = free_port()
    server = _server(root, weights, port, "kill")
    outcomes: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:
        # Bounded: at most 30 requests each, and no request may outlive its 20 s timeout.
        for i in range(30):
            if stop.is_set():
                return
            data, expected = cases[(k + i) % len(cases)]
            try:
                status, _, body = post_image(server.url, data, timeout=20)
                outcome = "ok" if status == 200 and body == expected else f"status {status}"
            except OSError as e:  # connection refused / reset, a read cut short: an error, not a hang
                outcome = f"error {type(e).__name__}"
            with lock:
                outcomes.append(outcome)
            if outcome.startswith("error"):
                return

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(16)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while sum(o == "ok" for o in outcomes) < 16 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()
    killed_at = time.monotonic()
    for t in threads:
        t.join(max(0.1, killed_at + 25 - time.monotonic()))
    stop.set()
    assert not any(t.is_alive() for t in threads), "a client hung after the server was killed"
    assert sum(o == "ok" for o in outcomes) >= 16
    assert all(o == "ok" or o.startswith("error") for o in outcomes), set(outcomes)
    assert sum(o.startswith("error") for o in outcomes) >= 1  # the kill was seen, mid-load

    restarted = _server(root, weights, port, "restart")
    try:
        data, expected = cases[0]
        status, _, body = post_image(restarted.url, data)
        assert status == 200 and body == expected
    finally:
        restarted.stop()


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_runtime_backend_serves_the_same_labels_as_torch(setup, backend):
    """--backend runs the exported graph (exported once into the cache); two workers share it.
    Reference: the torch backend in fp32, through `deeplab segment` (the module's fixture)."""
    import importlib.util
    import os

    if importlib.util.find_spec(backend) is None:  # optional extras; CI installs both with .[dev]
        assert not os.environ.get("CI"), f"CI installs .[dev], which includes {backend}"
        pytest.skip(f"{backend} is not installed")
    root, weights, cases = setup
    images = sorted((root / "images").glob("*.png"))
    reference = root / "segment_fp32"
    if not reference.is_dir():
        assert run_cli(["segment", str(root / "images"), "--out", str(reference), "--weights", str(weights),
                        "--precision", "fp32"]) == 0
    cases = [(p.read_bytes(), np.asarray(Image.open(reference / f"{p.stem}.png"))) for p in images]
    server = LiveServer(["--weights", str(weights), "--backend", backend, "--precision", "fp32", "--workers", "2",
                         "--max-batch", "4"], free_port(), root / f"{backend}.log",
                        env={"XDG_CACHE_HOME": str(root / f"cache-{backend}")})
    server.wait_ready()
    try:
        import json
        import urllib.request

        with urllib.request.urlopen(server.url + "/v1/model", timeout=10) as r:
            info = json.load(r)
        assert info["backend"] == backend and info["precision"] == "fp32"

        def one(i: int):
            data, expected = cases[i % len(cases)]
            status, _, body = post_image(server.url, data, timeout=60)
            if status != 200:
                return status, False
            # fp32 on both sides; the runtimes' kernels may sum in another order: a pixel in 10,000
            return status, (np.asarray(Image.open(io.BytesIO(body))) != expected).mean() <= 1e-4

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(24)))
        assert [s for s, _ in results] == [200] * 24
        assert all(ok for _, ok in results), f"{sum(not ok for _, ok in results)} answers differ from torch's"
    finally:
        server.stop()
