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
  jit_fuser  the "fast" model's network traced and frozen by TorchScript with oneDNN Graph fusion
             (torch.jit.enable_onednn_fusion); trace, freeze and the two profiling calls are
             printed as its compilation, one per input shape
  ort        the same weights exported to ONNX (deeplab export), run by ONNX Runtime (CPU, fp32)
  ov         that ONNX graph run by OpenVINO directly (core.compile_model, LATENCY hint, its own
             precision choice: bf16 on CPUs with bf16 units); the ratio column is against it
  ov_fp32    OpenVINO with INFERENCE_PRECISION_HINT f32
  ort_int8   the ONNX graph quantized to int8 as 'deeplab export --int8' does (NNCF, QDQ), on ONNX Runtime
  ov_int8    that int8 graph on OpenVINO (its default hint: what is not int8 runs in bf16 where it can)
The int8 graph is built once per run, calibrated on --calibration-images images of --calibration
(a folder, e.g. CamVid train), or without it on as many seeded uniform-noise images: their speed
does not depend on the calibration, their accuracy does (measure it with deeplab eval, not with
this benchmark's random input; see docs/deployment.md).
The first call (oneDNN / OpenVINO set-up; for ov the compile_model time is apart) is printed in
its own column and not counted in the timed runs.

Examples:
  python benchmarks/bench_inference.py                          # resnet101, 1x3x513x513, fp32 vs fast
  python benchmarks/bench_inference.py --variants fp32,fast,fast_fp32,autocast,compile --repeats 5
  python benchmarks/bench_inference.py --model deeplab_v2_resnet18 --size 321
  # the issue's two settings, every backend, ratios to OpenVINO:
  python benchmarks/bench_inference.py --variants fp32,fast,ort,ov,ov_fp32 --repeats 5
  python benchmarks/bench_inference.py --weights default --height 360 --width 480 --variants fp32,fast,ort,ov,ov_fp32 --repeats 5
  # int8 (needs nncf: pip install 'deeplab[int8]'):
  python benchmarks/bench_inference.py --weights default --height 360 --width 480 \
      --variants fast,ov,ov_int8,ort,ort_int8 --repeats 5 --calibration ../shared/data/camvid_segnet/train
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

from _machine import machine_line  # benchmarks/_machine.py (run as python benchmarks/X.py)

VARIANTS = ("fp32", "fast", "fast_bf16", "fast_fp32", "autocast", "compile", "jit_fuser", "ort", "ov", "ov_fp32", "ort_int8",
            "ov_int8")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(args: argparse.Namespace) -> None:
    import torch

    from deeplab.models import autocast, build_model, optimize_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.weights:
        from deeplab.weights import build_from_weights, default_weights_path

        model, _ = build_from_weights(default_weights_path() if args.weights == "default" else args.weights)
    else:
        model = build_model(args.model, num_classes=args.num_classes).eval()
    x = torch.randn(1, 3, args.height or args.size, args.width or args.size, generator=torch.Generator().manual_seed(1))
    compile_s = None
    variant = args.worker
    ran = "bf16" if variant == "autocast" else "fp32"  # the precision that runs
    if variant == "fp32":
        def forward():
            with torch.no_grad():
                return model(x)
    elif variant in ("fast", "fast_bf16", "fast_fp32", "compile", "jit_fuser"):
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
        elif variant == "jit_fuser":
            torch.jit.enable_onednn_fusion(True)
            t0 = time.perf_counter()
            with torch.no_grad():
                example = x.to(fast._dtype).contiguous(memory_format=torch.channels_last)
                fast.model = torch.jit.freeze(torch.jit.trace(fast.model, example, check_trace=False))
                for _ in range(2):  # the profiling executor fuses on the second call
                    fast(x)
            compile_s = time.perf_counter() - t0

        def forward():
            return fast(x)
    elif variant == "autocast":
        def forward():
            with torch.no_grad(), autocast("cpu", "bf16"):
                return model(x)
    elif variant in ("ort", "ort_int8"):
        import onnxruntime as ort

        session = ort.InferenceSession(args.onnx, providers=["CPUExecutionProvider"])
        xn = x.numpy()

        ran = "int8" if variant == "ort_int8" else ran

        def forward():
            return torch.from_numpy(session.run(None, {"image": xn})[0])
    elif variant in ("ov", "ov_fp32", "ov_int8"):
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY"}
        if variant == "ov_fp32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        t0 = time.perf_counter()
        compiled = ov.Core().compile_model(args.onnx, "CPU", config)
        compile_s = time.perf_counter() - t0
        request = compiled.create_infer_request()
        hint = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        ran = "bf16" if "bf" in hint else "fp32" if ("f32" in hint or "float32" in hint) else hint
        ran = "int8" if variant == "ov_int8" else ran
        xn = x.numpy()

        def forward():
            return torch.from_numpy(request.infer({0: xn})[compiled.output(0)].copy())
    else:  # pragma: no cover - argparse restricts the choices
        raise ValueError(variant)

    rss_setup = _rss_mib()
    t0 = time.perf_counter()
    out = forward()
    first = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
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
        "first_s": first,
        "precision": ran,
        "shape": list(out.shape),
    }
    print("RESULT " + json.dumps(result), flush=True)


def _export(args: argparse.Namespace, path: Path, h: int, w: int) -> None:
    """The same weights (seed 0) as the workers build, exported at the benchmark's input size,
    with the metadata the int8 quantizer reads (random weights: the v2 paper's Caffe normalisation)."""
    import torch

    from deeplab.models import build_model
    from deeplab.weights import export_onnx
    from deeplab.weights.onnx_export import onnx_metadata

    torch.manual_seed(0)
    if args.weights:
        from deeplab.weights import build_from_weights, default_weights_path

        model, metadata = build_from_weights(default_weights_path() if args.weights == "default" else args.weights)
    else:
        model = build_model(args.model, num_classes=args.num_classes).eval()
        metadata = {"model": args.model, "num_classes": args.num_classes,
                    "normalization": {"mode": "caffe_bgr", "mean": [104.008, 116.669, 122.675]}}
    export_onnx(model, path, height=h, width=w, metadata=onnx_metadata(model, metadata))


def _quantize(args: argparse.Namespace, fp32: Path, int8: Path, tmp: Path) -> str:
    """The int8 graph of ``fp32``, as deeplab export --int8 builds it; returns what it was calibrated on."""
    import numpy as np
    from PIL import Image

    from deeplab.runtime.quantize import calibration_images, quantize_int8

    n = args.calibration_images
    if args.calibration:
        images, source = calibration_images(args.calibration, n), f"images of {args.calibration}"
    else:
        rng = np.random.default_rng(0)
        images, source = [], "uniform-noise images"
        for i in range(n):
            images.append(tmp / f"noise{i}.png")
            Image.fromarray(rng.integers(0, 256, (args.height or args.size, args.width or args.size, 3),
                                         dtype=np.uint8)).save(images[-1])
    t0 = time.perf_counter()
    quantize_int8(fp32, int8, images)
    return f"int8 graph calibrated on {len(images)} {source} in {time.perf_counter() - t0:.0f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deeplab_v2_resnet101")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--size", type=int, default=513, help="input is 1x3xSIZExSIZE")
    parser.add_argument("--height", type=int, default=None, help="input height (overrides --size)")
    parser.add_argument("--width", type=int, default=None, help="input width (overrides --size)")
    parser.add_argument("--weights", default=None, help="a weights file ('default': the packaged model) instead of "
                        "random weights of --model")
    parser.add_argument("--onnx", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=2, help="timed forward passes per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forward passes first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--variants", default="fp32,fast",
                        help=f"comma-separated, the first is the baseline; from {','.join(VARIANTS)}")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="int8 variants: folder of calibration images (default: seeded uniform noise)")
    parser.add_argument("--calibration-images", type=int, default=8, help="int8 variants: calibration image count")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", choices=("fp32", "int8"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.prepare:  # the graphs, in a child: a worker inherits its parent's RSS as its peak RSS at exec
        h, w = args.height or args.size, args.width or args.size
        fp32 = Path(args.onnx)
        _export(args, fp32, h, w)
        if args.prepare == "int8":
            print(_quantize(args, fp32, Path(args.out), fp32.parent), flush=True)
        return 0

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        print(f"error: unknown variants {unknown}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    import torch

    h, w = args.height or args.size, args.width or args.size
    print(f"{args.weights or args.model}, input 1x3x{h}x{w}, {args.repeats} timed runs after {args.warmup} "
          f"warm-up, torch {torch.__version__}; {machine_line()}", flush=True)
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, int8_path = Path(tmp) / "model.onnx", Path(tmp) / "model_int8.onnx"
        common = ["--model", args.model, "--num-classes", str(args.num_classes), "--size", str(args.size),
                  "--height", str(h), "--width", str(w)] + (["--weights", args.weights] if args.weights else [])
        if any(v.startswith(("ort", "ov")) for v in variants):
            int8 = any(v.endswith("_int8") for v in variants)
            cmd = [sys.executable, __file__, "--prepare", "int8" if int8 else "fp32", "--onnx", str(onnx_path),
                   "--out", str(int8_path), *common, "--calibration-images", str(args.calibration_images)]
            if args.calibration:
                cmd += ["--calibration", str(args.calibration)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"error: exporting the ONNX graph failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                return 1
            if int8:
                print(proc.stdout.strip().splitlines()[-1], flush=True)
        for variant in variants:
            out_path = Path(tmp) / f"{variant}.pt"
            graph = int8_path if variant.endswith("_int8") else onnx_path
            cmd = [sys.executable, __file__, "--worker", variant, "--out", str(out_path), "--onnx", str(graph),
                   *common, "--repeats", str(args.repeats), "--warmup", str(max(args.warmup, 1)),
                   "--threads", str(args.threads)]
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
    ov_wall = results["ov"]["wall_min"] if "ov" in results else None
    print(f"\n{'variant':10s} {'ran':>4s} {'first s':>8s} {'wall min s':>10s} {'median s':>9s} {'cpu s':>7s} "
          f"{'speed-up':>9s} {'x ov':>6s} {'cpu ratio':>9s} {'max|diff|/max|ref|':>19s} {'peak RSS MiB':>13s} "
          f"{'RSS before fwd':>15s}")
    for variant in variants:
        r = results[variant]
        diff = (outputs[variant] - ref).abs().max().item() / ref_max
        # int8 scales come from the calibration images, not from this random input: no accuracy figure
        diff_text = f"{diff:19.2e}" if not variant.endswith("_int8") or base.endswith("_int8") else f"{'-':>19s}"
        extra = f"  (compile {r['compile_s']:.1f} s)" if r["compile_s"] is not None else ""
        vs_ov = f"{ov_wall / r['wall_min']:5.2f}x" if ov_wall else "     -"
        print(f"{variant:10s} {r['precision']:>4s} {r['first_s']:8.2f} {r['wall_min']:10.3f} {r['wall_median']:9.3f} "
              f"{r['cpu_min']:7.2f} {results[base]['wall_min'] / r['wall_min']:8.2f}x {vs_ov} "
              f"{results[base]['cpu_min'] / r['cpu_min']:8.2f}x "
              f"{diff_text} {r['peak_rss_mib']:13.0f} {r['rss_setup_mib']:15.0f}{extra}")
    print(f"\nspeed-up = {base} wall time / variant wall time (min over runs); x ov = OpenVINO's wall time / the "
          "variant's (above 1: faster than OpenVINO); cpu ratio uses process CPU time, steadier when other jobs "
          "share the cores. compile = torch.compile, the TorchScript trace + freeze + profiling calls, or "
          "OpenVINO's compile_model, not in 'first s'.")
    if any(v.endswith("_int8") for v in variants):
        print("int8 rows: no logit difference, as this benchmark's random input is unlike the calibration images; "
              "their accuracy is measured by deeplab eval (docs/deployment.md).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
