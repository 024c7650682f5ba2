"""Forward-pass benchmark: plain fp32 eager (the baseline) against the project's fast path.

Runs each variant in its own subprocess (so peak memory is measured per variant) on the
same weights and the same input, then prints the times, the speed ratio against fp32, the
largest logit difference relative to the largest fp32 logit, and the peak RSS.

Variants:
  fp32       plain eager model in fp32 under torch.no_grad (the baseline)
  fast       deeplab.models.optimize_for_inference(model), the default: precision "auto" (bf16
             weights where the CPU computes bf16 natively, AVX512_BF16 / AMX, else fp32),
             channels_last, folded BN; the printout says which precision ran
  fast_bf16  optimize_for_inference(model, precision="bf16"): bf16 even where it is emulated
  fast_fp32  optimize_for_inference(model, precision="fp32"): channels_last + folded BN only
  autocast   the plain model under deeplab.models.autocast("cpu", "bf16")
  compile    the "fast" model's network through torch.compile (inductor, freezing); the
             compilation time is printed separately and not counted in the forward time

Examples:
  python benchmarks/bench_inference.py                          # resnet101, 1x3x513x513, fp32 vs fast
  python benchmarks/bench_inference.py --variants fp32,fast,fast_fp32,autocast,compile --repeats 5
  python benchmarks/bench_inference.py --model deeplab_v2_resnet18 --size 321
Run it under the shared lock: flock /tmp/deeplab-bench.lock python benchmarks/bench_inference.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("fp32", "fast", "fast_bf16", "fast_fp32", "autocast", "compile")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(args: argparse.Namespace) -> None:
    import torch

    from deeplab.models import autocast, build_model, optimize_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=args.num_classes).eval()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    compile_s = None
    variant = args.worker
    ran = "bf16" if variant == "autocast" else "fp32"  # the precision that runs
    if variant == "fp32":
        def forward():
            with torch.no_grad():
                return model(x)
    elif variant in ("fast", "fast_bf16", "fast_fp32", "compile"):
        fast = optimize_for_inference(model, precision={"fast_bf16": "bf16", "fast_fp32": "fp32"}.get(variant, "auto"))
        ran = fast.precision
        del model
        if variant == "compile":
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # constant-fold and prepack the weights
            fast.model = torch.compile(fast.model)
            t0 = time.perf_counter()
            fast(x)
            compile_s = time.perf_counter() - t0

        def forward():
            return fast(x)
    elif variant == "autocast":
        def forward():
            with torch.no_grad(), autocast("cpu", "bf16"):
                return model(x)
    else:  # pragma: no cover - argparse restricts the choices
        raise ValueError(variant)

    rss_setup = _rss_mib()
    for _ in range(args.warmup):
        out = forward()
    walls, cpus = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = forward()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    torch.save(out.float().contiguous(), args.out)
    result = {
        "variant": variant,
        "wall_min": min(walls),
        "wall_median": statistics.median(walls),
        "cpu_min": min(cpus),
        "threads": torch.get_num_threads(),
        "rss_setup_mib": rss_setup,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "compile_s": compile_s,
        "precision": ran,
        "shape": list(out.shape),
    }
    print("RESULT " + json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deeplab_v2_resnet101")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--size", type=int, default=513, help="input is 1x3xSIZExSIZE")
    parser.add_argument("--repeats", type=int, default=2, help="timed forward passes per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forward passes first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--variants", default="fp32,fast",
                        help=f"comma-separated, the first is the baseline; from {','.join(VARIANTS)}")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        print(f"error: unknown variants {unknown}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    import torch

    print(f"{args.model}, input 1x3x{args.size}x{args.size}, {args.repeats} timed runs after {args.warmup} "
          f"warm-up, torch {torch.__version__}, {os.cpu_count()} CPUs visible", flush=True)
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            out_path = Path(tmp) / f"{variant}.pt"
            cmd = [sys.executable, __file__, "--worker", variant, "--out", str(out_path),
                   "--model", args.model, "--num-classes", str(args.num_classes), "--size", str(args.size),
                   "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"error: variant {variant} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                return 1
            results[variant] = json.loads(lines[-1][len("RESULT "):])
            outputs[variant] = torch.load(out_path, weights_only=True)
            r = results[variant]
            print(f"  ran {variant}: {r['wall_min']:.3f} s", flush=True)

    base = variants[0]
    ref = outputs[base]
    ref_max = ref.abs().max().item()
    print(f"\n{'variant':10s} {'ran':>4s} {'wall min s':>10s} {'median s':>9s} {'cpu s':>7s} {'speed-up':>9s} "
          f"{'cpu ratio':>9s} {'max|diff|/max|ref|':>19s} {'peak RSS MiB':>13s} {'RSS before fwd':>15s}")
    for variant in variants:
        r = results[variant]
        diff = (outputs[variant] - ref).abs().max().item() / ref_max
        extra = f"  (compile {r['compile_s']:.1f} s)" if r["compile_s"] is not None else ""
        print(f"{variant:10s} {r['precision']:>4s} {r['wall_min']:10.3f} {r['wall_median']:9.3f} {r['cpu_min']:7.2f} "
              f"{results[base]['wall_min'] / r['wall_min']:8.2f}x {results[base]['cpu_min'] / r['cpu_min']:8.2f}x "
              f"{diff:19.2e} {r['peak_rss_mib']:13.0f} {r['rss_setup_mib']:15.0f}{extra}")
    print(f"\nspeed-up = {base} wall time / variant wall time (min over runs); cpu ratio uses process CPU "
          "time, steadier when other jobs share the cores. Goal for 'fast': >= 8x.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
