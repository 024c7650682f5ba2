"""The HTTP service of ``deeplab serve``: a Starlette application around one model.

Routes (the API needs ``Authorization: Bearer KEY`` when the service has an API key):

- ``GET /``: the page (one HTML file with its script and style inline, no external asset);
- ``GET /healthz``: liveness, never behind the key;
- ``GET /metrics``: Prometheus text format (requests, errors, latency, batch sizes, queue depth);
- ``GET /v1/model``: the model's name, classes, palette, normalisation and its card's figures;
- ``POST /v1/segment``: one image, as the multipart field ``image`` or as the raw body.

Every error is JSON, ``{"error": MESSAGE, "status": CODE}``. Requests never name files on the
server: the only input is the uploaded bytes, and the options below.

Starlette rather than FastAPI: the service has five routes and validates its few options by
hand (unknown options are refused by name), and FastAPI's interactive documentation pages load
their scripts from a CDN, which an offline service cannot.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

from deeplab.engine.inference import DEFAULT_MAX_PIXELS
from deeplab.engine.segment import ModelBundle, class_pixels
from deeplab.fileio import jsonable
from deeplab.serve.batching import BatchingQueue, Job, QueueClosed, QueueFull
from deeplab.serve.codec import UploadError, decode_image, jpeg_bytes, label_png_bytes, npy_bytes

__all__ = ["ServeConfig", "create_app", "OUTPUTS", "OPTIONS"]

#: What ``POST /v1/segment`` can answer with (``output=``).
OUTPUTS = ("json", "labels", "overlay", "probs")
#: The options of ``POST /v1/segment`` (query parameters or multipart fields).
OPTIONS = ("output", "crf", "flip", "msc", "alpha", "include_labels")
#: Most extra scales ``msc`` may name, and the largest: each scale is one more forward pass,
#: and a scale above 1 enlarges it, so a request cannot ask for an unbounded amount of work.
MAX_MSC_SCALES = 4
MAX_MSC_SCALE = 2.0
#: Default cap on an upload's decoded pixels (segment's --max-image-pixels is 64 M for trusted
#: files; a service takes files from anyone).
DEFAULT_SERVE_IMAGE_PIXELS = 40_000_000

_MEDIA = {"labels": "image/png", "overlay": "image/jpeg", "probs": "application/octet-stream"}
_SUFFIX = {"labels": ".png", "overlay": "_overlay.jpg", "probs": ".npy"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class ServeConfig:
    """How the service runs; ``deeplab serve``'s options.

    Attributes:
        workers: inference worker threads.
        queue_size: most requests waiting for a worker; one more is answered 503.
        max_batch: most same-size requests in one forward pass (1: no batching).
        batch_window_ms: how long a worker waits for more requests of one size (only while
            other requests are in flight).
        max_upload_mb: largest request body, in MiB (413 above).
        max_image_pixels: largest decoded image, width x height (413 above).
        max_pixels: larger images are downscaled for the network, as ``deeplab segment
            --max-pixels`` (the outputs stay full size).
        api_key: when set, the API and the metrics need ``Authorization: Bearer <api_key>``.
        cors_origins: origins allowed to call the API from a browser (none: CORS off).
    """

    workers: int = 1
    queue_size: int = 64
    max_batch: int = 8
    batch_window_ms: float = 10.0
    max_upload_mb: float = 20.0
    max_image_pixels: int = DEFAULT_SERVE_IMAGE_PIXELS
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    api_key: str | None = None
    cors_origins: tuple[str, ...] = field(default_factory=tuple)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class ApiError(Exception):
    """An answer other than 200: the status, the message of the JSON body, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class _Options:
    output: str = "json"
    crf: bool = False
    flip: bool = False
    msc: tuple[float, ...] = ()
    alpha: float = 0.5
    include_labels: bool = False


def _flag(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ApiError(400, f"option {name}={value!r}: expected true or false")


def _parse_options(items: list[tuple[str, str]]) -> _Options:
    """Options from query parameters and multipart fields; unknown or repeated ones refused."""
    seen: dict[str, str] = {}
    for name, value in items:
        if name not in OPTIONS:
            raise ApiError(400, f"unknown option {name!r}: the options are {', '.join(OPTIONS)}")
        if name in seen:
            raise ApiError(400, f"option {name!r} given twice: give it once (as a query parameter or a form field)")
        seen[name] = value
    output = seen.get("output", "json").strip().lower()
    if output not in OUTPUTS:
        raise ApiError(400, f"output={seen['output']!r}: use one of {', '.join(OUTPUTS)}")
    msc: tuple[float, ...] = ()
    if seen.get("msc", "").strip():
        text = seen["msc"]
        try:
            scales = tuple(float(s) for s in text.split(",") if s.strip())
        except ValueError:
            raise ApiError(400, f"msc={text!r}: expected comma-separated scales such as 0.5,0.75") from None
        if not all(0 < s <= MAX_MSC_SCALE for s in scales) or not all(math.isfinite(s) for s in scales):
            raise ApiError(400, f"msc={text!r}: each scale must lie in (0, {MAX_MSC_SCALE:g}]")
        msc = tuple(sorted({s for s in scales if s != 1.0}))
        if len(msc) > MAX_MSC_SCALES:
            raise ApiError(400, f"msc={text!r}: at most {MAX_MSC_SCALES} scales besides 1")
    alpha = 0.5
    if "alpha" in seen:
        try:
            alpha = float(seen["alpha"])
        except ValueError:
            alpha = float("nan")
        if not 0.0 <= alpha <= 1.0:
            raise ApiError(400, f"alpha={seen['alpha']!r}: expected a colour weight in [0, 1]")
    return _Options(
        output=output,
        crf=_flag("crf", seen["crf"]) if "crf" in seen else False,
        flip=_flag("flip", seen["flip"]) if "flip" in seen else False,
        msc=msc,
        alpha=alpha,
        include_labels=_flag("include_labels", seen["include_labels"]) if "include_labels" in seen else False,
    )


# --------------------------------------------------------------------------- inference


@dataclass
class _Work:
    image: np.ndarray
    options: _Options


@dataclass
class _Result:
    labels: np.ndarray
    probs: np.ndarray | None
    network_s: float  # the batch's forward pass
    finish_s: float  # this image's upsampling, argmax and CRF
    notice: str | None


def _batch_runner(bundle: ModelBundle, crf: Any, max_pixels: int | None):
    """``run_batch`` for :class:`BatchingQueue`: the steps of ``deeplab segment``'s images."""
    import torch

    from deeplab.engine.inference import finish_prediction, model_align_corners, predict_logits

    align_corners = model_align_corners(bundle.model)

    def run(jobs: list[Job]) -> list[_Result]:
        first: _Options = jobs[0].payload.options
        notices: list[str] = []
        t0 = time.perf_counter()
        batch = np.stack([job.payload.image for job in jobs])
        logits = predict_logits(
            bundle.model, batch, normalization=bundle.normalization, msc_scales=first.msc or None,
            flip=first.flip, precision=bundle.precision, max_pixels=max_pixels, notice=notices.append,
            input_scale=bundle.scale_for(None),
        )
        network = time.perf_counter() - t0
        results = []
        for k, job in enumerate(jobs):
            work: _Work = job.payload
            t1 = time.perf_counter()
            with torch.inference_mode():
                labels, probs = finish_prediction(
                    logits[k : k + 1], work.image, crf=crf if work.options.crf else None,
                    want_probs=work.options.output == "probs", align_corners=align_corners,
                )
            results.append(_Result(
                labels=labels.numpy().astype(np.uint8),
                probs=None if probs is None else probs.numpy(),
                network_s=network, finish_s=time.perf_counter() - t1,
                notice=notices[0] if notices else None,
            ))
        return results

    return run


# --------------------------------------------------------------------------- metrics


class _Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per application)."""

    def __init__(self, queue: BatchingQueue) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("deeplab_http_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.errors = Counter("deeplab_http_errors", "HTTP requests answered with a status of 400 or more",
                              ["route", "status"], registry=self.registry)
        self.latency = Histogram("deeplab_http_request_duration_seconds", "time from request to answer",
                                 ["route"], registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.batch = Histogram("deeplab_inference_batch_size", "images per forward pass", registry=self.registry,
                               buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
        self.queue_depth = Gauge("deeplab_queue_depth", "requests waiting for an inference worker",
                                 registry=self.registry)
        self.queue_depth.set_function(lambda: queue.depth)
        self.in_flight = Gauge("deeplab_inference_in_flight", "requests queued or being segmented",
                               registry=self.registry)
        self.in_flight.set_function(lambda: queue.outstanding)
        Gauge("deeplab_inference_workers", "inference worker threads", registry=self.registry).set(queue.workers)


_ROUTES = {"/", "/healthz", "/metrics", "/v1/model", "/v1/segment"}


class _MetricsMiddleware:
    """Counts every answer and times it (pure ASGI: sees the status of every response)."""

    def __init__(self, app, state: dict) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics: _Metrics | None = self.state.get("metrics")
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if metrics is not None:
                route = scope["path"] if scope["path"] in _ROUTES else "other"
                code = str(status["code"])
                metrics.requests.labels(route, scope["method"], code).inc()
                if status["code"] >= 400:
                    metrics.errors.labels(route, code).inc()
                metrics.latency.labels(route).observe(time.perf_counter() - t0)


# --------------------------------------------------------------------------- the page


def _page() -> tuple[bytes, str]:
    """The page's HTML and its Content-Security-Policy (inline script and style allowed by hash)."""
    html = resources.files("deeplab.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
                        for s in found)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")
    return html.encode("utf-8"), csp


# --------------------------------------------------------------------------- the application


def create_app(bundle: ModelBundle, config: ServeConfig | None = None):
    """The service for one prepared model.

    Args:
        bundle: from :func:`deeplab.engine.segment.load_bundle` (or ``bundle_from_model``).
        config: limits, batching, the API key and CORS (None: the defaults of :class:`ServeConfig`).

    Returns:
        A Starlette application; serve it with uvicorn (``deeplab serve`` does). Its worker
        threads start now and stop when the application shuts down (its lifespan).

    Raises:
        ValueError: the model has more than 256 classes (a label PNG holds at most 256).
    """
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    config = config or ServeConfig()
    if bundle.num_classes > 256:
        raise ValueError(f"the model has {bundle.num_classes} classes but a label PNG holds at most 256 class indices")
    from deeplab.crf import DenseCRF

    crf = DenseCRF(**bundle.crf_params)  # the weights' parameters, as deeplab segment --crf
    state: dict[str, Any] = {}
    queue = BatchingQueue(
        _batch_runner(bundle, crf, config.max_pixels), workers=config.workers, capacity=config.queue_size,
        max_batch=config.max_batch, batch_window=config.batch_window_ms / 1000.0,
        on_batch=lambda n: state["metrics"].batch.observe(n),
    )
    metrics = _Metrics(queue)
    state["metrics"] = metrics
    page, csp = _page()
    palette = np.asarray(bundle.palette, dtype=np.uint8)
    classes = [{"index": i, "name": n, "color": [int(v) for v in palette[i]]} for i, n in enumerate(bundle.class_names)]
    model_info = jsonable({
        "name": bundle.name,
        "num_classes": bundle.num_classes,
        "classes": classes,
        "palette": palette.tolist(),
        "normalization": bundle.normalization,
        "input_scale": bundle.input_scale,
        "precision": bundle.metadata.get("backend_precision", bundle.precision),
        "backend": bundle.metadata.get("backend", "torch"),
        "device": bundle.device,
        "dataset": bundle.metadata.get("dataset"),
        "crf": bundle.crf_params,
        "card": bundle.metadata.get("record") or {},
        "limits": {"max_upload_mb": config.max_upload_mb, "max_image_pixels": config.max_image_pixels,
                   "max_pixels": config.max_pixels, "max_msc_scales": MAX_MSC_SCALES,
                   "max_msc_scale": MAX_MSC_SCALE},
        "batching": {"workers": config.workers, "queue_size": config.queue_size, "max_batch": config.max_batch,
                     "batch_window_ms": config.batch_window_ms},
    })
    key = config.api_key.encode() if config.api_key else None

    def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)

    def check_key(request: Request) -> None:
        if key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise ApiError(401, "this service needs an API key: send the header 'Authorization: Bearer KEY'"
                           if not auth else "the API key is wrong",
                           headers={"WWW-Authenticate": 'Bearer realm="deeplab"'})

    async def read_body(request: Request) -> bytes:
        limit = config.max_upload_bytes
        declared = request.headers.get("content-length")
        too_big = f"the upload is larger than this service's limit of {config.max_upload_mb:g} MiB (--max-upload-mb)"
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise ApiError(413, too_big)
            except ValueError:
                raise ApiError(400, f"Content-Length {declared!r} is not a number") from None
        chunks, size = [], 0
        async for chunk in request.stream():  # also bounds chunked uploads, which declare no length
            size += len(chunk)
            if size > limit:
                raise ApiError(413, too_big)
            chunks.append(chunk)
        return b"".join(chunks)

    async def image_and_fields(request: Request) -> tuple[bytes | None, list[tuple[str, str]]]:
        """The image's bytes (None: a form without the field) and the form's other fields."""
        body = await read_body(request)
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            return body, []  # the raw image bytes, whatever the declared type (curl --data-binary sends a form's)
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def once():
            yield body
            yield b""

        try:
            form = await MultiPartParser(request.headers, once(), max_files=1, max_fields=len(OPTIONS) + 1).parse()
        except MultiPartException as e:
            raise ApiError(400, f"the multipart form cannot be read: {e.message}") from None
        try:
            image, fields = None, []
            for name, value in form.multi_items():
                if name == "image":
                    if not isinstance(value, UploadFile):
                        raise ApiError(400, "the form field 'image' must be a file upload (curl -F image=@photo.jpg), "
                                            "not text: the service reads no file of its own")
                    if image is not None:
                        raise ApiError(400, "the form holds more than one 'image': send one image per request")
                    image = await value.read()
                elif isinstance(value, UploadFile):
                    raise ApiError(400, f"unexpected file field {name!r}: send the image as the field 'image'")
                else:
                    fields.append((name, value))
        finally:
            await form.close()
        return image, fields

    async def segment(request: Request) -> Response:
        t0 = time.perf_counter()
        check_key(request)
        options = _parse_options(list(request.query_params.multi_items()))  # refused before the upload is read
        data, fields = await image_and_fields(request)
        if fields:
            options = _parse_options([*request.query_params.multi_items(), *fields])
        if data is None:
            raise ApiError(400, "the multipart form has no field 'image': send the image as "
                                "-F image=@photo.jpg (curl), or as the raw request body")
        t_read = time.perf_counter()
        try:
            image = await run_in_threadpool(decode_image, data, max_pixels=config.max_image_pixels)
        except UploadError as e:
            raise ApiError(e.status, str(e)) from None
        del data
        t_decoded = time.perf_counter()
        try:
            job = queue.submit((image.shape, options.flip, options.msc), _Work(image, options))
        except QueueFull as e:
            raise ApiError(503, str(e), headers={"Retry-After": str(e.retry_after)}) from None
        except QueueClosed as e:
            raise ApiError(503, str(e), headers={"Retry-After": "5"}) from None
        try:
            result: _Result = await asyncio.wrap_future(job.future)
        except QueueClosed as e:
            raise ApiError(503, str(e), headers={"Retry-After": "5"}) from None
        except (ValueError, RuntimeError) as e:
            raise ApiError(500, f"inference failed: {e}") from None
        t_done = time.perf_counter()
        encoded = await run_in_threadpool(encode, image, result, options)
        t_end = time.perf_counter()
        timings = {
            "read": t_read - t0, "decode": t_decoded - t_read, "queue": max(0.0, job.started - job.submitted),
            "network": result.network_s, "labels": result.finish_s, "encode": t_end - t_done, "total": t_end - t0,
        }
        headers = {"X-Deeplab-Batch-Size": str(job.batch_size),
                   "Server-Timing": ", ".join(f"{k};dur={1000 * v:.1f}" for k, v in timings.items())}
        if result.notice:
            headers["X-Deeplab-Notice"] = result.notice
        if isinstance(encoded, dict):
            return JSONResponse({**encoded, "batch_size": job.batch_size,
                                 "timings": {f"{k}_ms": round(1000 * v, 2) for k, v in timings.items()}},
                                headers=headers)
        name = f"segmentation{_SUFFIX[options.output]}"
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
        return Response(encoded, media_type=_MEDIA[options.output], headers=headers)

    def encode(image: np.ndarray, result: _Result, options: _Options) -> bytes | dict:
        """The answer's body: the file's bytes, or the JSON summary as a dict."""
        if options.output == "labels":
            return label_png_bytes(result.labels, palette)
        if options.output == "overlay":
            from deeplab.engine.segment import overlay

            return jpeg_bytes(overlay(image, result.labels, palette, bundle.class_names, alpha=options.alpha))
        if options.output == "probs":
            return npy_bytes(result.probs)
        counts = class_pixels(result.labels, bundle.num_classes)
        total = max(1, int(counts.sum()))
        present = [{**classes[c], "pixels": int(counts[c]), "share": round(float(counts[c]) / total, 6)}
                   for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
        body = {
            "model": bundle.name,
            "width": int(image.shape[1]), "height": int(image.shape[0]),
            "options": {"crf": options.crf, "flip": options.flip, "msc": list(options.msc)},
            "classes": present,
            "notice": result.notice,
        }
        if options.include_labels:
            body["labels_png"] = base64.b64encode(label_png_bytes(result.labels, palette)).decode("ascii")
        return body

    async def model(request: Request) -> Response:
        check_key(request)
        return JSONResponse(model_info)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": bundle.name, "queue_depth": queue.depth})

    async def metrics_route(request: Request) -> Response:
        check_key(request)
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers={
            "Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})

    async def on_api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.message, exc.headers)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no such route: {request.method} {request.url.path} (see GET /v1/model, "
                        "POST /v1/segment)",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

    async def on_error(request: Request, exc: Exception) -> Response:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(queue.close)

    middleware = [Middleware(_MetricsMiddleware, state=state)]
    if config.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                                     expose_headers=["X-Deeplab-Batch-Size", "X-Deeplab-Notice", "Server-Timing"]))
    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics_route, methods=["GET"]),
            Route("/v1/model", model, methods=["GET"]),
            Route("/v1/segment", segment, methods=["POST"]),
        ],
        middleware=middleware,
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, Exception: on_error},
        lifespan=lifespan,
    )
    app.state.queue = queue
    app.state.metrics = metrics
    app.state.bundle = bundle
    app.state.config = config
    return app
