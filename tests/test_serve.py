"""`deeplab serve`'s API through Starlette's test client: the answers against `deeplab segment`'s
files, the errors (400 / 401 / 413 / 415 / 503, always JSON), the API key, CORS, the metrics.

The live server (load, kill and restart) is in test_serve_live.py, the page in test_serve_page.py.
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _evaluation_helpers import run_cli, tiny_weights
from _serve_helpers import photo, skip_without

skip_without("starlette")
skip_without("httpx")

# Starlette's test client asks for the httpx2 package and warns about httpx; both work.
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return tiny_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors")


@pytest.fixture(scope="module")
def bundle(weights):
    from deeplab.engine.segment import load_bundle

    return load_bundle(weights)


def _client(bundle, **config):
    from starlette.testclient import TestClient

    from deeplab.serve import ServeConfig, create_app

    return TestClient(create_app(bundle, ServeConfig(**config)))


@pytest.fixture(scope="module")
def client(bundle):
    with _client(bundle) as c:
        yield c


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _segment_files(paths: list[Path], out: Path, *extra: str) -> None:
    assert run_cli(["segment", *map(str, paths), "--out", str(out), *extra]) == 0


# --------------------------------------------------------------------------- answers = deeplab segment


def test_labels_and_overlay_equal_deeplab_segment_with_the_packaged_model(camvid_root, tmp_path):
    """The real model on a CamVid frame: the label PNG byte for byte, the overlay JPEG too, and
    the JSON's shares counted from those labels."""
    from starlette.testclient import TestClient

    from deeplab.engine.segment import load_bundle
    from deeplab.serve import create_app

    image = camvid_root / "val" / "0016E5_07959.png"
    _segment_files([image], tmp_path)
    expected = (tmp_path / "0016E5_07959.png").read_bytes()
    data = image.read_bytes()
    with TestClient(create_app(load_bundle(None))) as c:
        r = c.post("/v1/segment?output=labels", files={"image": ("frame.png", data, "image/png")})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content == expected
        r = c.post("/v1/segment?output=overlay", content=data)  # the raw body
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert r.content == (tmp_path / "0016E5_07959_overlay.jpg").read_bytes()
        r = c.post("/v1/segment", content=data)
        body = r.json()
    from deeplab.weights import default_weights_path, read_metadata

    names = read_metadata(default_weights_path())["class_names"]
    labels = np.asarray(Image.open(tmp_path / "0016E5_07959.png"))
    counts = np.bincount(labels.ravel(), minlength=len(names))
    assert (body["width"], body["height"]) == (480, 360)
    assert {c["name"]: c["pixels"] for c in body["classes"]} == {
        names[i]: int(counts[i]) for i in np.flatnonzero(counts)}
    shares = {c["index"]: c["share"] for c in body["classes"]}
    assert set(shares) == set(np.flatnonzero(counts).tolist())
    for i, share in shares.items():
        assert share == pytest.approx(counts[i] / labels.size, abs=1e-6)
    assert [c["share"] for c in body["classes"]] == sorted(shares.values(), reverse=True)
    assert body["model"] == "deeplab_v2_resnet18" and "labels_png" not in body
    assert body["timings"]["total_ms"] >= body["timings"]["network_ms"] > 0


@pytest.mark.parametrize("options,flags", [
    ("crf=true", ["--crf"]),
    ("flip=1&msc=0.5,0.75", ["--flip", "--msc", "0.5,0.75"]),
])
def test_options_give_the_labels_of_segment_with_the_same_flags(client, weights, tmp_path, options, flags):
    files = []
    for seed, size in ((0, (40, 56)), (1, (33, 47))):
        path = tmp_path / f"p{seed}.png"
        Image.fromarray(photo(seed, size)).save(path)
        files.append(path)
    _segment_files(files, tmp_path / "out", "--weights", str(weights), *flags)
    for path in files:
        r = client.post(f"/v1/segment?output=labels&{options}", content=path.read_bytes())
        assert r.status_code == 200, r.text
        assert r.content == (tmp_path / "out" / f"{path.stem}.png").read_bytes()


def test_probs_equal_segment_save_probs(client, weights, tmp_path):
    path = tmp_path / "p.png"
    Image.fromarray(photo(5, (36, 52))).save(path)
    _segment_files([path], tmp_path / "out", "--weights", str(weights), "--save-probs")
    r = client.post("/v1/segment?output=probs", files={"image": ("p.png", path.read_bytes())})
    assert r.status_code == 200
    probs = np.load(io.BytesIO(r.content))
    assert probs.dtype == np.float16 and probs.shape == (4, 36, 52)
    assert np.array_equal(probs, np.load(tmp_path / "out" / "p.npy"))


def test_json_with_the_labels_and_options_as_form_fields(client):
    data = _png(photo(2))
    r = client.post("/v1/segment", files={"image": ("x.png", data)},
                    data={"include_labels": "on", "alpha": "0.2"})
    body = r.json()
    assert r.status_code == 200, body
    labels = np.asarray(Image.open(io.BytesIO(__import__("base64").b64decode(body["labels_png"]))))
    ref = client.post("/v1/segment?output=labels", content=data)
    assert np.array_equal(labels, np.asarray(Image.open(io.BytesIO(ref.content))))
    assert sum(c["pixels"] for c in body["classes"]) == labels.size
    assert body["batch_size"] == 1 and r.headers["x-deeplab-batch-size"] == "1"


def test_large_images_are_downscaled_for_the_network_as_segment_does(bundle, weights, tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(photo(7, (64, 96))).save(path)
    _segment_files([path], tmp_path / "out", "--weights", str(weights), "--max-pixels", "1500")
    with _client(bundle, max_pixels=1500) as c:
        r = c.post("/v1/segment?output=labels", content=path.read_bytes())
        assert r.status_code == 200
        assert "above the inference cap of 1500 pixels" in r.headers["x-deeplab-notice"]
        assert r.content == (tmp_path / "out" / "big.png").read_bytes()


def test_model_route(client, bundle):
    m = client.get("/v1/model").json()
    assert m["name"] == "deeplab_v2_resnet18" and m["num_classes"] == 4
    assert [c["name"] for c in m["classes"]] == ["bg", "red", "green", "blue"]
    assert m["palette"] == bundle.palette.tolist()
    assert m["normalization"] == bundle.normalization
    assert m["limits"]["max_upload_mb"] == 20.0


def test_model_route_has_the_packaged_cards_figures():
    from starlette.testclient import TestClient

    from deeplab.engine.segment import load_bundle
    from deeplab.serve import create_app
    from deeplab.weights import default_weights_path, read_metadata

    record = read_metadata(default_weights_path())["record"]
    with TestClient(create_app(load_bundle(None))) as c:
        m = c.get("/v1/model").json()
    assert m["card"]["val_miou"] == record["val_miou"]
    assert m["card"]["val_per_class_iou"] == record["val_per_class_iou"]
    assert m["dataset"] == "camvid" and len(m["classes"]) == 11


# --------------------------------------------------------------------------- errors


def _error(r, status: int, *words: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["status"] == status
    for w in words:
        assert w in body["error"], body["error"]
    return body["error"]


def test_bad_uploads_are_named(client):
    data = _png(photo(3))
    _error(client.post("/v1/segment", content=b""), 400, "empty")
    _error(client.post("/v1/segment", content=b"%PDF-1.4 hello"), 415, "not an image", "%PDF")
    _error(client.post("/v1/segment", content=data[: len(data) // 2]), 400, "truncated")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    _error(client.post("/v1/segment", content=eps), 415, "not an image")  # never handed to Ghostscript
    _error(client.post("/v1/segment", files={"other": ("x.png", data)}), 400, "unexpected file field 'other'")
    _error(client.post("/v1/segment", files={"image": (None, "/etc/passwd")}), 400, "must be a file upload")
    _error(client.post("/v1/segment", files={"x": (None, "1")}), 400, "unknown option 'x'")
    _error(client.post("/v1/segment", files={"crf": (None, "1")}), 400, "no field 'image'")
    _error(client.post("/v1/segment", files={"image": ("a.png", data), "output": (None, "labels")},
                       params={"output": "json"}), 400, "given twice")


@pytest.mark.parametrize("query,words", [
    ("output=svg", ("output='svg'", "json, labels, overlay, probs")),
    ("crf=maybe", ("crf='maybe'", "true or false")),
    ("msc=0.5,x", ("msc=",)),
    ("msc=4", ("(0, 2]",)),
    ("msc=0.25,0.5,0.75,1.25,1.5", ("at most 4",)),
    ("alpha=2", ("alpha='2'",)),
    ("weights=/etc/passwd", ("unknown option 'weights'",)),
])
def test_bad_options_are_refused_before_the_upload_is_read(client, query, words):
    _error(client.post(f"/v1/segment?{query}", content=_png(photo(4))), 400, *words)


def test_upload_and_pixel_limits_give_413(bundle):
    data = _png(photo(1, (64, 64)))
    with _client(bundle, max_upload_mb=0.001, max_image_pixels=64 * 64 - 1) as c:
        _error(c.post("/v1/segment", content=b"x" * 2000), 413, "larger than this service's limit of 0.001 MiB")

        def chunks():  # no Content-Length: the limit is counted as the body arrives
            for _ in range(4):
                yield b"x" * 600

        _error(c.post("/v1/segment", content=chunks()), 413, "--max-upload-mb")
    with _client(bundle, max_image_pixels=64 * 64 - 1) as c:
        _error(c.post("/v1/segment", content=data), 413, "64x64 = 4096 pixels", "--max-image-pixels")


def test_unknown_routes_and_methods_answer_json(client):
    _error(client.get("/v1/nothing"), 404, "no such route")
    _error(client.get("/v1/segment"), 405, "GET is not allowed")


def test_a_full_queue_answers_503_with_retry_after(weights, tmp_path):
    """One worker held by a request, one request waiting (queue of 1): the next is refused at
    once, not left hanging."""
    from deeplab.engine.segment import bundle_from_model
    from deeplab.weights import build_from_weights, read_metadata

    model, meta = build_from_weights(weights)
    gate, entered = threading.Event(), threading.Event()

    class Held(type(model)):
        def forward(self, x):
            entered.set()
            assert gate.wait(30)
            return super().forward(x)

    model.__class__ = Held
    held = bundle_from_model(model, read_metadata(weights), precision="fp32", optimize=False)
    data = _png(photo(6))
    results: list[int] = []
    with _client(held, queue_size=1, max_batch=1) as c:
        threads = [threading.Thread(target=lambda: results.append(c.post("/v1/segment", content=data).status_code))
                   for _ in range(2)]
        threads[0].start()
        assert entered.wait(30)
        threads[1].start()
        deadline = time.monotonic() + 10
        while c.app.state.queue.depth < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        t0 = time.monotonic()
        r = c.post("/v1/segment", content=data)
        assert time.monotonic() - t0 < 5
        _error(r, 503, "queue is full")
        assert int(r.headers["retry-after"]) >= 1
        gate.set()
        for t in threads:
            t.join(60)
        assert results == [200, 200]
        metrics = c.get("/metrics").text
    assert 'deeplab_http_errors_total{route="/v1/segment",status="503"} 1.0' in metrics


# --------------------------------------------------------------------------- security


def test_api_key_guards_the_api_and_the_metrics_not_the_page_or_health(bundle):
    data = _png(photo(8))
    with _client(bundle, api_key="s3cret") as c:
        _error(c.post("/v1/segment", content=data), 401, "Authorization: Bearer")
        r = c.post("/v1/segment", content=data, headers={"Authorization": "Bearer wrong"})
        _error(r, 401, "wrong")
        assert r.headers["www-authenticate"].startswith("Bearer")
        _error(c.get("/v1/model"), 401)
        _error(c.get("/metrics"), 401)
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/segment", content=data, headers=ok).status_code == 200
        assert c.get("/v1/model", headers=ok).status_code == 200
        assert c.get("/metrics", headers=ok).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200


def test_cors_is_off_unless_an_origin_is_given(bundle, client):
    origin = {"Origin": "https://app.example.org"}
    r = client.get("/v1/model", headers=origin)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = {**origin, "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/v1/segment", headers=pre).headers
    with _client(bundle, cors_origins=("https://app.example.org",)) as c:
        assert c.get("/v1/model", headers=origin).headers["access-control-allow-origin"] == "https://app.example.org"
        r = c.options("/v1/segment", headers={**pre, "Access-Control-Request-Headers": "authorization"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.org"
        r = c.get("/v1/model", headers={"Origin": "https://evil.example.com"})
        assert "access-control-allow-origin" not in r.headers


def test_the_page_is_self_contained_with_a_strict_policy(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    # No external asset: no URL of another host anywhere in the page, nothing loaded by
    # attribute but the empty data: favicon, no CSS url() or @import.
    import re

    assert not re.search(r"https?://|['\"]//", html)
    assert re.findall(r"\b(?:src|href)=\"([^\"]*)\"", html) == ["data:,", "#"]
    assert "url(" not in html and "@import" not in html
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert "script-src 'sha256-" in csp and r.headers["x-content-type-options"] == "nosniff"


def test_metrics_count_requests_errors_latency_and_batches(bundle):
    data = _png(photo(9))
    with _client(bundle) as c:
        for _ in range(3):
            assert c.post("/v1/segment", content=data).status_code == 200
        c.post("/v1/segment", content=b"nope")
        text = c.get("/metrics").text
    assert 'deeplab_http_requests_total{method="POST",route="/v1/segment",status="200"} 3.0' in text
    assert 'deeplab_http_errors_total{route="/v1/segment",status="415"} 1.0' in text
    assert 'deeplab_http_request_duration_seconds_count{route="/v1/segment"} 4.0' in text
    assert "deeplab_inference_batch_size_count 3.0" in text
    assert "deeplab_queue_depth 0.0" in text and "deeplab_inference_workers 1.0" in text


# --------------------------------------------------------------------------- the command


def test_serve_command_refuses_bad_settings(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("DEEPLAB_API_KEY", raising=False)
    assert run_cli(["serve", "--weights", str(tmp_path / "none.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err
    assert run_cli(["serve", "--api-key", " "]) == 2
    assert "--api-key is empty" in capsys.readouterr().err
    assert run_cli(["serve", "--cors-origin", "example.org"]) == 2
    assert "expected an origin" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(["serve", "--workers", "0"])
    assert "--workers '0'" in capsys.readouterr().err


def test_loopback_detection():
    from deeplab.cli.serve import _is_loopback

    assert all(map(_is_loopback, ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"]))
    assert not any(map(_is_loopback, ["0.0.0.0", "::", "192.168.1.4", "example.org"]))
