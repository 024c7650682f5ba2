"""What the benchmarks share: the machine line each prints first (the CPU, its bf16 units, the
visible cores and the load when the run started), where the real data is, and running one
variant in a child process (so that its peak memory is its own).

The load matters: on two cores, a job running beside a benchmark changes not only its times but
which variant wins (the PyTorch path led OpenVINO by 1.09-1.12x beside a training job and trailed
it at 0.89x on the idle machine, docs/benchmarks.md). A run that starts on a busy machine says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def cpu_description() -> str:
    """``model name`` of /proc/cpuinfo and which bf16 units it has (AMX, AVX512_BF16 or none)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.readlines()
    except OSError:
        return "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown CPU")
    flags = next((ln for ln in lines if ln.startswith("flags")), "")
    units = "AMX" if "amx_bf16" in flags else "AVX512_BF16" if "avx512_bf16" in flags else "no bf16 units"
    return f"{name} ({units})"


def machine_line() -> str:
    """CPU, bf16 units, visible cores and the 1-minute load average, with a warning when the load
    says another job holds the cores."""
    cores = os.cpu_count() or 1
    line = f"CPU {cpu_description()}, {cores} CPUs visible"
    try:
        load = os.getloadavg()[0]
    except OSError:
        return line
    line += f", load {load:.2f}"
    if load > 0.5 * cores:
        line += (f" -- WARNING: the machine is busy (1-minute load {load:.2f} on {cores} cores): "
                 "these figures are not those of an idle machine")
    return line


def data_root() -> Path:
    """``$DEEPLAB_DATA``, else ``../shared/data`` beside the checkout."""
    return Path(os.environ.get("DEEPLAB_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def run_child(code: str, cfg: dict, name: str) -> dict:
    """``python -c code`` with ``cfg`` as its JSON argument; the last line it prints, parsed as JSON.
    Exits naming the variant and showing the child's error when it fails."""
    out = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"variant {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
