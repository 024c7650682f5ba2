"""Video throughput of `deeplab segment`: frames/s on a 480x360 clip, batch 1 against batch 8,
with and without the CRF, decoding and encoding shown apart from the network.

The clip is made here from consecutive CamVid val frames (480x360, H.264 at 15 frames/s, as a
camera would hand it over). Each variant runs ``deeplab.engine.video.segment_video`` in its own
subprocess (so that its peak memory, ru_maxrss, is its own) after one warm-up forward pass
outside the timing (oneDNN kernel selection, lazy imports):

1. baseline ``batch 1``: one frame per forward pass, no CRF;
2. ``batch 8``: eight frames per forward pass;
3. ``batch 1 + crf`` / ``batch 8 + crf``: the same with the dense CRF (the weights' parameters),
   on the first --crf-frames frames (the CRF dominates the time).

Prints frames/s of each and its ratio to the baseline, then milliseconds per frame spent in
decoding (incl. the RGB conversion), the network (forward passes), labels (upsampling, argmax,
CRF), overlay drawing, H.264 encoding and writing the CSV / label maps. Uses the packaged default
model unless --weights is given.

Usage: python benchmarks/bench_video.py [--frames 32] [--crf-frames 8] [--weights FILE]
       [--data-root ../shared/data/camvid_segnet]
Run it under the shared lock: flock /tmp/deeplab-bench.lock python benchmarks/bench_video.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _machine import data_root, run_child  # benchmarks/_machine.py (run as python benchmarks/X.py)

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np, torch
from deeplab.engine.inference import predict_logits
from deeplab.engine.segment import load_bundle
from deeplab.engine.video import segment_video
cfg = json.loads(sys.argv[1])
bundle = load_bundle(cfg["weights"])
crf = None
if cfg["crf"]:
    from deeplab.crf import DenseCRF
    crf = DenseCRF(**bundle.crf_params)
warm = np.zeros((360, 480, 3), np.uint8)
predict_logits(bundle.model, np.stack([warm] * cfg["batch"]), normalization=bundle.normalization,
               precision=bundle.precision)
if crf is not None:
    crf(warm, torch.full((bundle.num_classes, 360, 480), 1.0 / bundle.num_classes))
out = Path(cfg["out"])
out.mkdir()
r = segment_video(bundle, cfg["clip"], out, batch=cfg["batch"], crf=crf)
assert r.error is None, r.error
print(json.dumps({"frames": r.frames, "seconds": r.seconds, "timings": r.timings,
                  "precision": bundle.precision, "threads": torch.get_num_threads(),
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _make_clip(path: Path, frames: list[Path], rate: int = 15) -> None:
    import av
    import numpy as np
    from PIL import Image

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = 480, 360, "yuv420p"
        for f in frames:
            rgb = np.asarray(Image.open(f).convert("RGB"))
            for p in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", type=Path,
                    default=data_root() / "camvid_segnet")
    ap.add_argument("--frames", type=int, default=32, help="frames of the clip (consecutive CamVid val frames)")
    ap.add_argument("--crf-frames", type=int, default=8, help="frames for the CRF variants (0: skip them)")
    ap.add_argument("--weights", type=Path, default=None, help="weights (default: the packaged model)")
    args = ap.parse_args()

    weights = args.weights
    if weights is None:
        from deeplab.weights import default_weights_path

        weights = default_weights_path()
    files = sorted((args.data_root / "val").glob("*.png"))
    if len(files) < max(args.frames, args.crf_frames):
        sys.exit(f"{args.data_root / 'val'} holds {len(files)} frames; asked for {args.frames}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        clips = {"long": tmp_path / "clip.mp4", "short": tmp_path / "clip_crf.mp4"}
        _make_clip(clips["long"], files[: args.frames])
        if args.crf_frames > 0:
            _make_clip(clips["short"], files[: args.crf_frames])
        print(f"480x360 H.264 clip of {args.frames} CamVid val frames ({args.crf_frames} for the CRF), "
              f"weights {weights}")
        res = {}
        for name, batch, crf in (("batch 1", 1, False), ("batch 8", 8, False),
                                 ("batch 1 + crf", 1, True), ("batch 8 + crf", 8, True)):
            if crf and args.crf_frames <= 0:
                continue
            cfg = {"weights": str(weights), "batch": batch, "crf": crf,
                   "clip": str(clips["short" if crf else "long"]), "out": str(tmp_path / name.replace(" ", "_"))}
            res[name] = run_child(_CHILD, cfg, name)
    first = next(iter(res.values()))
    print(f"precision {first['precision']}, torch threads {first['threads']}")
    base = res["batch 1"]["frames"] / res["batch 1"]["seconds"]
    keys = ("decode", "network", "labels", "overlay", "encode", "write")
    print(f"{'variant':>14}  {'frames':>6}  {'frames/s':>8}  {'ratio':>6}  "
          + "  ".join(f"{k + ' ms':>10}" for k in keys) + "  peak RSS MB")
    for name, r in res.items():
        fps = r["frames"] / r["seconds"]
        per = "  ".join(f"{1000 * r['timings'][k] / r['frames']:10.1f}" for k in keys)
        print(f"{name:>14}  {r['frames']:6d}  {fps:8.2f}  {fps / base:5.2f}x  {per}  {r['maxrss_mb']:.0f}")
    print("ms: milliseconds per frame; ratio: frames/s against batch 1 without the CRF")


if __name__ == "__main__":
    main()
