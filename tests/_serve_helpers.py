"""Shared helpers of the `deeplab serve` tests (not a test module): a live server in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest


def skip_without(module: str) -> None:
    """Skip (or, in CI, fail) when the serve extra is missing."""
    try:
        __import__(module)
    except ImportError:
        msg = f"{module} is not installed: pip install -e '.[serve]'"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


class LiveServer:
    """``deeplab serve`` in a subprocess on 127.0.0.1:``port``, its output in ``log``."""

    def __init__(self, args: list[str], port: int, log: Path, env: dict | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._fh = open(log, "ab")
        # Two torch threads: the machine's cores; the tests' clients run in this process.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deeplab", "serve", "--port", str(port), "--log-level", "warning", *args],
            stdout=self._fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if json.load(r)["status"] == "ok":
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer /healthz in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def rss_mb(self) -> float:
        """The server process's resident memory (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._fh.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._fh.close()


def post_image(url: str, data: bytes, query: str = "output=labels", timeout: float = 60.0,
               headers: dict | None = None) -> tuple[int, dict, bytes]:
    """POST raw image bytes to /v1/segment; (status, headers by lower-case name, body), errors included."""
    req = urllib.request.Request(f"{url}/v1/segment?{query}", data=data, method="POST",
                                 headers={"Content-Type": "application/octet-stream", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def photo(seed: int, size=(40, 56)) -> np.ndarray:
    """A blocky random RGB picture (edges for the CRF to follow)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(size[0] // 8 + 1, size[1] // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[: size[0], : size[1]])
