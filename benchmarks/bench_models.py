"""Every model of the zoo at 1x3x513x513 on the CPU: parameters, multiply-adds, forward time, peak memory.

One table from DeepLab v1 to v3+. Each model runs in its own subprocess (so the peak RSS is its
own) through the path every command takes, ``optimize_for_inference`` in the default precision
("auto": bf16 where the CPU computes it natively, else fp32; the table says which ran), each at
its default output stride (v1 / v2: 8, v3 / v3+: 16) unless --output-stride is given.
Multiply-adds are counted by ``torch.utils.flop_counter`` on the plain model (FLOPs / 2;
convolutions and matrix products, not batch-norm or interpolation). The baseline is the
paper's model, deeplab_v2_resnet101, measured in the same run; every row prints its time
relative to it.

Examples:
  python benchmarks/bench_models.py                                  # every model, 513x513
  python benchmarks/bench_models.py --models deeplab_v2_resnet101,deeplab_v3plus_resnet101 --repeats 5
  python benchmarks/bench_models.py --output-stride 8 --size 321
Run it under the shared lock: flock /tmp/deeplab-bench.lock python benchmarks/bench_models.py
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from _machine import machine_line  # benchmarks/_machine.py (run as python benchmarks/X.py)

BASELINE = "deeplab_v2_resnet101"


def _worker(args: argparse.Namespace) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from deeplab.models import build_model, optimize_for_inference, resolve_precision

    torch.manual_seed(0)
    kwargs = {} if args.output_stride is None else {"output_stride": args.output_stride}
    model = build_model(args.worker, num_classes=args.num_classes, **kwargs).eval()
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    with torch.device("meta"):  # count on shapes only: no memory, no time
        meta_model = build_model(args.worker, num_classes=args.num_classes, **kwargs).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            meta_model(torch.empty(1, 3, args.size, args.size))
    macs = counter.get_total_flops() / 2
    fast = optimize_for_inference(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fast(x)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            fast(x)
        times.append(time.perf_counter() - t0)
    print(json.dumps({
        "model": args.worker, "params": params, "macs": macs, "first_s": first,
        "median_s": statistics.median(times), "min_s": min(times), "precision": resolve_precision("auto"),
        "output_stride": model.output_stride, "logits": list(out.shape[-2:]),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="comma-separated names (default: every model)")
    parser.add_argument("--size", type=int, default=513, help="input height and width")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--output-stride", type=int, default=None, help="unset: each model's default")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward passes after a warm-up")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    from deeplab.models import list_models

    names = args.models.split(",") if args.models else list_models()
    if BASELINE not in names:
        names = [BASELINE, *names]  # the baseline is always measured in the same run
    rows = []
    for name in names:
        cmd = [sys.executable, __file__, "--worker", name, "--size", str(args.size), "--num-classes",
               str(args.num_classes), "--repeats", str(args.repeats)]
        if args.output_stride is not None:
            cmd += ["--output-stride", str(args.output_stride)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  measured {name}", file=sys.stderr)
    base = next((r for r in rows if r["model"] == BASELINE), None)
    print(f"{machine_line()}; input 1x3x{args.size}x{args.size}; optimize_for_inference, precision auto -> "
          f"{rows[0]['precision'] if rows else '?'}; median of {args.repeats} after a warm-up, each model in its "
          "own process")
    header = ("model", "OS", "logits", "params", "GMACs", "first s", "median s", f"x {BASELINE}", "peak RSS MiB")
    table = [header]
    for r in rows:
        ratio = f"{r['median_s'] / base['median_s']:.2f}" if base else "-"
        table.append((r["model"], str(r["output_stride"]), "x".join(map(str, r["logits"])),
                      f"{r['params'] / 1e6:.2f}M", f"{r['macs'] / 1e9:.1f}", f"{r['first_s']:.2f}",
                      f"{r['median_s']:.3f}", ratio, f"{r['peak_rss_mib']:.0f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))


if __name__ == "__main__":
    main()
