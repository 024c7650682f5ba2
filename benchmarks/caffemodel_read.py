"""Reading a ResNet-101-sized caffemodel: the memory-mapped reader against reading the whole file.

Writes a fake DeepLab-v2 ResNet-101 caffemodel (the official layer names, random values, 21
classes, optionally with the MSC ``_res05`` / ``_res075`` copies the official training
snapshots carry) into a temporary folder, then runs, each in its own subprocess so that peak
memory (VmHWM) is its own:

1. baseline: ``f.read()`` the whole file into memory and parse that buffer;
2. candidate: ``read_caffemodel`` (memory-mapped, the data copied out of the map once);
3. the full import: ``load_weights`` into ``deeplab_v2_resnet101`` (read + name mapping +
   BatchNorm/Scale folding + strict checks).

Usage: python benchmarks/caffemodel_read.py [--msc-copies] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, sys, time
from pathlib import Path
mode, path, repeat = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
times = []
if mode == "load":
    from deeplab.models import build_model
    from deeplab.weights import load_weights
    model = build_model("deeplab_v2_resnet101", num_classes=21)
for _ in range(repeat):
    t0 = time.perf_counter()
    if mode == "bytes":
        from deeplab.weights.caffe import _parse_net
        data = path.read_bytes()
        layers = _parse_net(memoryview(data), len(data))
        n = sum(b.size for layer in layers for b in layer.blobs)
        del data
    elif mode == "mmap":
        from deeplab.weights.caffe import read_caffemodel
        layers = read_caffemodel(path)
        n = sum(b.size for layer in layers for b in layer.blobs)
    else:
        load_weights(model, path, strict=True)
        n = sum(t.numel() for t in model.state_dict().values())
    times.append(time.perf_counter() - t0)
    layers = None
# VmHWM (peak resident set of this process image): unlike ru_maxrss, not inherited across exec.
hwm_kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"best_s": min(times), "values": n, "peak_mib": hwm_kib / 1024}))
"""


def _write_fake(path: Path, msc_copies: bool) -> None:
    import numpy as np

    from deeplab.models import build_model
    from deeplab.weights.caffe import CaffeLayer, write_caffemodel
    from deeplab.weights.mapping import _units_for

    # Names come from the mapping's own table here: this is a speed benchmark, not a test.
    model = build_model("deeplab_v2_resnet101", num_classes=21)
    modules = dict(model.named_modules())
    rng = np.random.default_rng(0)
    layers = []
    for unit in _units_for(modules):
        m = modules[unit.prefix]
        if unit.kind == "conv":
            name = unit.candidates[0] if unit.candidates else f"fc1_voc12_c{unit.prefix.split('.')[-1]}"
            blobs = [rng.standard_normal(tuple(m.weight.shape), dtype=np.float32)]
            if m.bias is not None:
                blobs.append(np.zeros(tuple(m.bias.shape), np.float32))
            layers.append(CaffeLayer(name, "Convolution", blobs))
        else:
            c = m.num_features
            layers.append(CaffeLayer(unit.candidates[0], "BatchNorm",
                                     [np.zeros(c, np.float32), np.ones(c, np.float32), np.ones(1, np.float32)]))
            layers.append(CaffeLayer(unit.scale_candidates[0], "Scale",
                                     [np.ones(c, np.float32), np.zeros(c, np.float32)]))
    if msc_copies:
        layers += [CaffeLayer(f"{layer.name}_{s}", layer.type, layer.blobs) for s in ("res05", "res075")
                   for layer in list(layers)]
    write_caffemodel(path, layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--msc-copies", action="store_true", help="add the MSC copies (3x the file size)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant (the best is reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train_iter_20000.caffemodel"
        t0 = time.perf_counter()
        _write_fake(path, args.msc_copies)
        size_mib = path.stat().st_size / 2**20
        print(f"fake caffemodel: {size_mib:.0f} MiB, written in {time.perf_counter() - t0:.1f} s")
        results = {}
        for mode in ("bytes", "mmap", "load"):
            out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(path), str(args.repeat)],
                                 check=True, capture_output=True, text=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    labels = {"bytes": "baseline: read() + parse", "mmap": "read_caffemodel (mmap)",
              "load": "load_weights -> deeplab_v2_resnet101"}
    for mode, r in results.items():
        print(f"{labels[mode]:<40} {r['best_s']:6.2f} s  {r['values'] / 1e6:6.1f} M values  "
              f"{r['values'] * 4 / 2**20 / r['best_s']:7.0f} MiB/s  peak {r['peak_mib']:6.0f} MiB")
    print(f"mmap vs read(): speed x{results['bytes']['best_s'] / results['mmap']['best_s']:.2f}, "
          f"peak memory {results['mmap']['peak_mib']:.0f} vs {results['bytes']['peak_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
