"""Training throughput (images/s) and peak memory: fp32 against bf16 + channels_last.

The paper's set-up: ``deeplab_v2_resnet101`` (ASPP-L, output stride 8, frozen batch norm),
321x321 crops, a global batch of 10 as 5 x iter_size 2, SGD with the paper's parameter groups,
the global-batch cross-entropy of :func:`deeplab.engine.train.train_step`. The weights are
random (frozen batch norm at its identity initialisation), so the loss values mean nothing; the
arithmetic is the paper's. Each variant runs in
its own subprocess so that its peak resident memory (``ru_maxrss``) is its own; the data are
random tensors (this measures the training step, not image decoding).

Examples:
  python benchmarks/bench_train.py                       # CPU: fp32 vs bf16/channels_last, 1 step each
  python benchmarks/bench_train.py --iters 3 --warmup 1  # steadier figures
  python benchmarks/bench_train.py --model deeplab_v2_resnet18 --crop 161   # a quick look
  # the CamVid recipe's step (BN trained, loss at the labels' resolution, batch 8, stride 16):
  python benchmarks/bench_train.py --model deeplab_v3plus_resnet18 --batch-size 8 --iter-size 1 \
      --output-stride 16 --train-bn --loss-resolution labels --num-classes 11 --iters 3 --warmup 1
  flock /tmp/deeplab-bench.lock python benchmarks/bench_train.py

On a machine with CUDA the same two variants also run on the GPU (peak memory from
``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _measure(args: argparse.Namespace) -> dict:
    import torch

    from deeplab.engine.lr_schedule import PolyLR
    from deeplab.engine.train import build_param_groups, train_step
    from deeplab.models import build_model, freeze_batchnorm

    device = torch.device(args.device)
    bf16 = args.variant == "bf16"
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=args.num_classes, msc_scales=[0.5, 0.75] if args.msc else None,
                        output_stride=args.output_stride)
    if not args.train_bn:
        freeze_batchnorm(model)
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    model.to(device).to(memory_format=fmt).train()
    optimizer = torch.optim.SGD(build_param_groups(model, weight_decay=5e-4), lr=2.5e-4, momentum=0.9)
    PolyLR(optimizer, base_lr=2.5e-4, max_iter=20000)
    gen = torch.Generator().manual_seed(0)
    micro = []
    for _ in range(args.iter_size):
        x = torch.randn(args.batch_size, 3, args.crop, args.crop, generator=gen) * 50
        y = torch.randint(0, args.num_classes, (args.batch_size, args.crop, args.crop), generator=gen)
        y[:, :20] = 255  # some ignored pixels, as padding gives
        micro.append((x.to(device).contiguous(memory_format=fmt), y.to(device)))
    precision = "bf16" if bf16 else "fp32"

    def step() -> float:
        loss = train_step(model, optimizer, micro, precision=precision, loss_resolution=args.loss_resolution)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    images = args.batch_size * args.iter_size
    out = {
        "variant": args.variant,
        "device": args.device,
        "seconds_per_step": min(times),
        "images_per_s": images / min(times),
        "loss": loss,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deeplab_v2_resnet101")
    p.add_argument("--crop", type=int, default=321)
    p.add_argument("--batch-size", type=int, default=5)
    p.add_argument("--iter-size", type=int, default=2)
    p.add_argument("--msc", action="store_true", help="multi-scale inputs (scales 1, 0.75, 0.5)")
    p.add_argument("--output-stride", type=int, default=None, help="unset: the model's default")
    p.add_argument("--train-bn", action="store_true", help="batch norm trained (from scratch) instead of frozen")
    p.add_argument("--loss-resolution", choices=["logits", "labels"], default="logits")
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--iters", type=int, default=1, help="timed steps per variant (the fastest is kept)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps first (oneDNN / cuDNN set-up)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--no-cuda", action="store_true")
    p.add_argument("--variant", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.variant:  # child process: one measurement, JSON on stdout
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(_measure(args)))
        return 0

    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.no_cuda else [])
    print(f"{args.model}, {args.crop}x{args.crop} crops, batch {args.batch_size} x iter_size {args.iter_size}"
          f"{', MSC' if args.msc else ''}; {args.warmup} warm-up + {args.iters} timed step(s) per variant; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("model", "crop", "batch_size", "iter_size", "iters", "warmup", "threads", "loss_resolution",
                          "num_classes") or (k == "output_stride" and v is not None)]
    forwarded += [f"--{k.replace('_', '-')}" for k in ("msc", "train_bn") if getattr(args, k)]
    for device in devices:
        results = {}
        for variant in ("fp32", "bf16"):
            cmd = [sys.executable, __file__, *forwarded, f"--variant={variant}", f"--device={device}"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{device} {variant}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
                return 1
            r = json.loads(res.stdout.strip().splitlines()[-1])
            results[variant] = r
            mem = f"peak RSS {r['peak_rss_mib']:.0f} MiB"
            if "peak_cuda_mib" in r:
                mem += f", peak CUDA {r['peak_cuda_mib']:.0f} MiB"
            label = "fp32" if variant == "fp32" else "bf16 + channels_last"
            print(f"{device:4s} {label:22s} {r['images_per_s']:7.2f} images/s  ({r['seconds_per_step']:.2f} s/step; {mem})")
        ratio = results["bf16"]["images_per_s"] / results["fp32"]["images_per_s"]
        print(f"{device:4s} bf16/channels_last vs fp32: {ratio:.2f}x throughput")
        from deeplab.models import resolve_precision

        print(f"{device:4s} precision 'auto' (the configs' default) trains in {resolve_precision('auto', device)} here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
