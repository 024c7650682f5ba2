"""Serve a model over HTTP: a JSON API and a page to try it in a browser.

Routes: GET / (the page: pick or drop an image, see the overlay and the legend), POST /v1/segment
(multipart field 'image' or the raw image bytes; ?output=json|labels|overlay|probs, crf, flip,
msc, alpha), GET /v1/model, GET /healthz, GET /metrics (Prometheus). Needs
pip install 'deeplab[serve]'.

Requests wait in a queue of --queue-size for --workers inference threads; requests of one image
size that arrive together share a forward pass (up to --max-batch, waiting at most
--batch-window-ms). A full queue answers 503 with Retry-After.

Binds to 127.0.0.1 unless --host says otherwise. With --api-key (or the environment variable
DEEPLAB_API_KEY, which keeps the key out of the process list) the API and the metrics need
'Authorization: Bearer KEY'. Browsers on other origins may call the API only with --cors-origin.

Examples:
  deeplab serve
  deeplab serve --weights my_model.safetensors --port 8080 --max-upload-mb 10
  deeplab serve --backend openvino          # the exported graph on OpenVINO (pip install 'deeplab[openvino]')
  DEEPLAB_API_KEY=s3cret deeplab serve --host 0.0.0.0 --workers 2 --cors-origin https://app.example.org
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from deeplab.cli.common import add_backend_argument, add_precision_argument, at_least, report_error

#: The environment variable that holds the API key when --api-key is not given.
API_KEY_ENV = "DEEPLAB_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, default=None,
                        help="weights .safetensors (or .onnx with --backend), or a packaged model by name (camvid-v2); "
                             "without it, the packaged default model")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0: every interface; then set an API key)")
    parser.add_argument("--port", type=at_least("--port", int, 0, "8000"), default=8000,
                        help="port to listen on (0: any free port)")
    parser.add_argument("--workers", type=at_least("--workers", int, 1, "2"), default=1,
                        help="inference worker threads (each runs one forward pass at a time)")
    parser.add_argument("--queue-size", type=at_least("--queue-size", int, 1, "64"), default=64,
                        help="requests that may wait for a worker; one more gets 503 with Retry-After")
    parser.add_argument("--max-batch", type=at_least("--max-batch", int, 1, "8"), default=8,
                        help="most same-size requests in one forward pass (1: no batching)")
    parser.add_argument("--batch-window-ms", type=at_least("--batch-window-ms", float, 0, "10"), default=10.0,
                        help="how long a worker waits for more same-size requests, only while others are in flight")
    parser.add_argument("--max-upload-mb", type=at_least("--max-upload-mb", float, 0.001, "20"), default=20.0,
                        help="largest request body in MiB (413 above)")
    parser.add_argument("--max-image-pixels", type=at_least("--max-image-pixels", int, 1, "40000000"),
                        default=None, metavar="N",
                        help="largest decoded image, width x height, checked before decoding (413 above); "
                        "unset: 40,000,000")
    parser.add_argument("--max-pixels", type=at_least("--max-pixels", int, 1, "6000000"), default=None,
                        metavar="N", help="larger images are downscaled for the network, as with segment's "
                        "--max-pixels (the answers stay full size); unset: 6,000,000")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help=f"require 'Authorization: Bearer KEY' on the API and the metrics; unset: the "
                        f"environment variable {API_KEY_ENV}, else no key")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="let pages of ORIGIN (e.g. https://app.example.org) call the API from a browser; "
                        "repeat for more; unset: CORS off")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    add_backend_argument(parser)
    add_precision_argument(parser)
    parser.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                        help="uvicorn's log level (info: one line per request)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        import prometheus_client  # noqa: F401
        import python_multipart  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        return report_error(f"deeplab serve needs the {e.name} package: pip install 'deeplab[serve]'")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not api_key.strip():
        return report_error("--api-key is empty: give a key, or leave the option out for no key")
    for origin in args.cors_origin:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            return report_error(f"--cors-origin {origin!r}: expected an origin such as https://app.example.org")

    from deeplab.engine.inference import DEFAULT_MAX_PIXELS
    from deeplab.engine.backends import load_backend_bundle
    from deeplab.serve import ServeConfig, create_app
    from deeplab.serve.app import DEFAULT_SERVE_IMAGE_PIXELS

    try:
        bundle = load_backend_bundle(args.weights, backend=args.backend, precision=args.precision, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        return report_error(str(e))
    config = ServeConfig(
        workers=args.workers, queue_size=args.queue_size, max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms, max_upload_mb=args.max_upload_mb,
        max_image_pixels=DEFAULT_SERVE_IMAGE_PIXELS if args.max_image_pixels is None else args.max_image_pixels,
        max_pixels=DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels, api_key=api_key,
        cors_origins=tuple(args.cors_origin),
    )
    try:
        app = create_app(bundle, config)
    except ValueError as e:
        return report_error(f"{args.weights or 'the default model'}: {e}")
    if not _is_loopback(args.host) and api_key is None:
        print(f"warning: listening on {args.host} without an API key: anyone who reaches this port can use the "
              f"model; set {API_KEY_ENV} or --api-key", file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    engine = bundle.precision if args.backend == "torch" else f"{args.backend}, {bundle.metadata['backend_precision']}"
    print(f"serving {bundle.name} ({bundle.num_classes} classes, {engine}, {args.workers} worker(s), "
          f"batches of up to {args.max_batch}) on http://{shown}:{args.port}/"
          f"{' (API key required)' if api_key else ''}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=10,
                server_header=False)
    return 0
