"""Shared helper of the runtime tests (not a test module): a Predictor's outputs, OpenVINO in a child process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from deeplab.runtime import Predictor


def predict(path: Path, backend: str, images: list[np.ndarray], tmp: Path, *, precision: str = "fp32",
            flip: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Predictor(path, backend).predict on each image. OpenVINO runs in a child process: loaded into
    the long-lived pytest process it made a later, unrelated test crash (segmentation fault) in
    1 of 3 full runs."""
    if backend != "openvino":
        predictor = Predictor(path, backend, precision=precision)
        return [predictor.predict(im, flip=flip) for im in images]
    np.save(tmp / "images.npy", np.stack(images))
    code = (f"import numpy as np; from deeplab.runtime import Predictor; "
            f"p = Predictor({str(path)!r}, 'openvino', precision={precision!r}); "
            f"out = [p.predict(im, flip={flip}) for im in np.load({str(tmp / 'images.npy')!r})]; "
            f"np.savez({str(tmp / 'out.npz')!r}, labels=np.stack([o[0] for o in out]), probs=np.stack([o[1] for o in out]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = np.load(tmp / "out.npz")
    return list(zip(out["labels"], out["probs"]))
