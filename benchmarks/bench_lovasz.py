"""The Lovasz-softmax loss term (``solver.lovasz_weight``): the sort against the buckets.

A training batch's loss alone, forward and backward: 8 crops of 321x321 at the labels'
resolution (``solver.loss_resolution: labels``), 11 classes (CamVid), random logits and labels
with an ignored band, as :func:`deeplab.engine.train.train_step` gives it. ``sort`` is the exact
loss (``bins=None``), ``buckets`` the default (``LOVASZ_BINS`` buckets, no sort). Each variant
runs in its own subprocess so that its peak resident memory (``ru_maxrss`` after the run minus
before it) is its own. Prints seconds per batch (the fastest of --repeats), the ratio, the peak
memory and how far the bucketed value lies from the sorted one.

``--step MODEL`` times whole training steps instead (:func:`deeplab.engine.train.train_step`,
``lovasz_weight`` 1, random weights and data, output stride 16, the default precision,
channels_last, after one untimed step; the peak memory counts from before it), with a third
variant ``none`` (the cross-entropy alone).
Here the sort is chosen by rebinding the trainer's ``lovasz_softmax`` to ``bins=None``: the
configs have no switch for it.

Examples:
  python benchmarks/bench_lovasz.py
  python benchmarks/bench_lovasz.py --threads 1 --repeats 5
  python benchmarks/bench_lovasz.py --device cuda
  python benchmarks/bench_lovasz.py --step deeplab_v2_resnet34 --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import time


def _measure_step(args: argparse.Namespace) -> dict:
    import torch

    import deeplab.engine.train as trainer
    from deeplab.engine.train import build_param_groups, train_step
    from deeplab.models import build_model

    if args.variant == "sort":
        trainer.lovasz_softmax = functools.partial(trainer.lovasz_softmax, bins=None)
    torch.manual_seed(0)
    model = build_model(args.step, num_classes=args.classes, output_stride=16)
    model.to(args.device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(build_param_groups(model, weight_decay=5e-4), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.crop, args.crop, generator=gen) * 50
    micro = [(images.to(args.device).contiguous(memory_format=torch.channels_last), _labels(args, gen))]
    weight = 0.0 if args.variant == "none" else 1.0

    def step() -> None:
        train_step(model, optimizer, micro, loss_resolution="labels", lovasz_weight=weight)
        if args.device == "cuda":
            torch.cuda.synchronize()

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return _with_peaks(args, {"seconds": min(times)}, before)


def _labels(args: argparse.Namespace, gen):
    """Random labels with a band of 255, the padding the crops get."""
    import torch

    labels = torch.randint(0, args.classes, (args.batch_size, args.crop, args.crop), generator=gen)
    labels[:, :20] = 255
    return labels.to(args.device)


def _with_peaks(args: argparse.Namespace, out: dict, rss_before: int) -> dict:
    """Add the peak extra RSS since ``rss_before`` and, on CUDA, the peak allocated memory."""
    import torch

    out["peak_extra_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    if args.device == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _measure(args: argparse.Namespace) -> dict:
    import torch

    from deeplab.engine.losses import LOVASZ_BINS, lovasz_softmax

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step:
        return _measure_step(args)
    gen = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(args.batch_size, args.classes, args.crop, args.crop, generator=gen)).to(args.device)
    labels = _labels(args, gen)
    bins = None if args.variant == "sort" else LOVASZ_BINS
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, value = [], 0.0
    for _ in range(args.repeats):
        x = logits.clone().requires_grad_()
        t0 = time.perf_counter()
        loss = lovasz_softmax(x, labels, bins=bins)
        loss.backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        value = float(loss.detach())
    return _with_peaks(args, {"seconds": min(times), "value": value}, before)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=321)
    p.add_argument("--classes", type=int, default=11)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--step", metavar="MODEL", help="time whole training steps of MODEL (see above)")
    p.add_argument("--variant", choices=["none", "sort", "buckets"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:  # child process: one measurement, JSON on stdout
        print(json.dumps(_measure(args)))
        return 0

    what = f"{args.step} training step" if args.step else "Lovasz-softmax forward + backward"
    print(f"{what}: batch {args.batch_size}, {args.crop}x{args.crop}, "
          f"{args.classes} classes, {args.device}, best of {args.repeats}")
    results = {}
    for variant in (("none",) if args.step else ()) + ("sort", "buckets"):
        cmd = [sys.executable, __file__, f"--batch-size={args.batch_size}", f"--crop={args.crop}",
               f"--classes={args.classes}", f"--repeats={args.repeats}", f"--threads={args.threads}",
               f"--device={args.device}", f"--variant={variant}"] + ([f"--step={args.step}"] if args.step else [])
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{variant}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            return 1
        r = results[variant] = json.loads(res.stdout.strip().splitlines()[-1])
        mem = f"peak extra RSS {r['peak_extra_mib']:.0f} MiB"
        if "peak_cuda_mib" in r:
            mem += f", peak CUDA {r['peak_cuda_mib']:.0f} MiB"
        print(f"{variant:8s} {r['seconds']:.3f} s per {'step' if args.step else 'batch'}  ({mem})")
    sort, buckets = results["sort"], results["buckets"]
    print(f"buckets vs sort: {sort['seconds'] / buckets['seconds']:.2f}x faster", end="")
    if args.step:
        none = results["none"]["seconds"]
        print(f"; the term's own cost: {sort['seconds'] - none:.3f} s (sort) vs {buckets['seconds'] - none:.3f} s (buckets)")
    else:
        print(f"; value {buckets['value']:.8f} vs {sort['value']:.8f} (difference {buckets['value'] - sort['value']:+.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
