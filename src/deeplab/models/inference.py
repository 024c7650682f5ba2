"""The project's fast CPU (and GPU) inference path: BN folding, channels_last, bfloat16.

:func:`optimize_for_inference` returns an eval-mode copy of a model prepared for inference
(the path every inference helper uses by default, with an fp32 switch); :func:`autocast` is
the mixed-precision context for code that runs an unconverted model itself (e.g. validation
during training).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor, nn

from deeplab.models.deeplab import check_input
from deeplab.models.layers import FrozenBatchNorm2d

__all__ = ["optimize_for_inference", "autocast", "fold_batchnorm", "native_bf16", "resolve_precision", "PRECISIONS"]

Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported: use one of {PRECISIONS}")


def _x86_cpu_flags() -> set[str] | None:
    """The x86 feature flags of /proc/cpuinfo (Linux), None elsewhere (Arm, macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=None)
def _native_bf16(device_type: str, index: int | None = None) -> bool:
    if device_type == "cuda":
        # Compute capability 8 (Ampere) and later have bf16 units; torch's is_bf16_supported()
        # also says yes for older GPUs that emulate it.
        return torch.cuda.is_available() and torch.cuda.get_device_properties(index or 0).major >= 8
    if device_type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    flags = _x86_cpu_flags()
    if flags is not None:
        # bf16 dot-product units: AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4) or AMX.
        # oneDNN's own test below also says yes for AVX-512 without them, where the bf16
        # products are emulated (not measured here; emulated on AVX2 they were 9x slower).
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    try:
        # oneDNN's own test (AVX-512 or Arm bf16 units); torch has no public name for it.
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bfloat16 convolutions run faster than float32 on ``device``.

    True on GPUs from Ampere on, on x86 CPUs with AVX512_BF16 or AMX (read from /proc/cpuinfo)
    and, where there is no such file, wherever oneDNN has bf16 kernels (Arm bf16, AVX-512). On
    AVX2-only CPUs oneDNN emulates bf16, and it is far slower: a ResNet-18 DeepLab at 480x360
    took 4.6 s per image in bf16 against 0.41 s in float32 on a 2-core AVX2 EPYC
    (``optimize_for_inference``, channels_last).
    """
    device = torch.device(device)
    return _native_bf16(device.type, device.index)


_EMULATED = {"cpu": "this CPU has no AVX512_BF16 / AMX units", "cuda": "GPUs before Ampere have no bf16 units"}


@functools.lru_cache(maxsize=None)
def _warn_emulated_bf16(device_type: str) -> None:
    why = _EMULATED.get(device_type, f"{device_type} has no native bf16")
    warnings.warn(f"precision 'bf16' is emulated here ({why}) and about 9x slower than fp32: "
                  "use precision 'auto' (the default) or 'fp32'", RuntimeWarning, stacklevel=2)


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> Literal["bf16", "fp32"]:
    """The precision to compute in: ``"auto"`` is bf16 where :func:`native_bf16`, else fp32.

    An explicit ``"bf16"`` is kept (with a warning, once per process, where it is emulated): it
    is also the precision most published figures were measured in.
    """
    _check_precision(precision)
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        _warn_emulated_bf16(torch.device(device).type)
    return precision  # type: ignore[return-value]


def autocast(device: str | torch.device, precision: Precision = "auto") -> contextlib.AbstractContextManager:
    """Return the mixed-precision context for ``precision`` on ``device``.

    ``"bf16"``: ``torch.autocast`` with bfloat16 (convolutions and matrix products in bf16,
    reductions in fp32); ``"fp32"``: a no-op context; ``"auto"``: see :func:`resolve_precision`.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:0"`` or a ``torch.device``.
        precision: ``"auto"``, ``"bf16"`` or ``"fp32"``.
    """
    device_type = torch.device(device).type
    if resolve_precision(precision, device_type) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def _fold_pair(conv: nn.Conv2d, bn: nn.Module) -> None:
    """Fold batch-norm ``bn`` (eval statistics) into the preceding convolution ``conv``, in place."""
    with torch.no_grad():
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        shift = bn.bias - bn.running_mean * scale
        conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(shift.to(conv.weight.dtype).clone())
        else:
            conv.bias.mul_(scale).add_(shift)


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every batch-norm that directly follows a convolution into it, in place (eval only).

    Handles the blocks of this package (their ``conv_bn_pairs``) and ``nn.Sequential(conv, bn)``
    shortcuts; each folded batch-norm becomes ``nn.Identity``. The result computes the eval-mode
    function of ``model`` with one fewer pass over every feature map. Returns ``model``.

    Args:
        model: a model in eval mode (training-mode batch-norm uses batch statistics and cannot be folded).
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode: call model.eval() first")
    for module in model.modules():
        for conv_name, bn_name in getattr(module, "conv_bn_pairs", ()):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if isinstance(conv, nn.Conv2d) and _is_bn(bn):
                _fold_pair(conv, bn)
                setattr(module, bn_name, nn.Identity())
        if isinstance(module, nn.Sequential):
            children = list(module)
            for i in range(len(children) - 1):
                if isinstance(children[i], nn.Conv2d) and _is_bn(children[i + 1]):
                    _fold_pair(children[i], children[i + 1])
                    module[i + 1] = nn.Identity()
    return model


class _InferenceModel(nn.Module):
    """An eval-mode model run in the chosen precision and memory format; returns fp32 outputs."""

    def __init__(self, model: nn.Module, *, precision: str, channels_last: bool) -> None:
        super().__init__()
        self.model = model
        self.precision = precision
        self.channels_last = channels_last
        self._dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for attr in ("output_stride", "num_classes", "name", "msc_scales", "atrous_rates", "align_corners",
                     "msc_fusion", "logits_stride", "decoder_convs"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.classifier_parameters()

    def train(self, mode: bool = True) -> _InferenceModel:
        if mode:
            raise ValueError("a model from optimize_for_inference is inference-only (its batch-norm is folded); "
                             "train the original model instead")
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        """Logits in float32 for a float batch ``(B, 3, H, W)`` (any float dtype, any memory format)."""
        check_input(x)
        # no_grad rather than inference_mode: callers may update the returned tensor in place.
        with torch.no_grad():
            x = x.to(self._dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = self.model(x)
            return out.float().contiguous()


def optimize_for_inference(
    model: nn.Module,
    *,
    precision: Precision = "auto",
    channels_last: bool = True,
    fold_bn: bool = True,
) -> nn.Module:
    """Return an eval-mode copy of ``model`` prepared for fast inference (``model`` is not changed).

    The copy takes any float batch ``(B, 3, H, W)`` and returns fp32 logits (the fused logits
    for an MSC model); it is inference-only (``.train()`` raises). It keeps ``.output_stride``,
    ``.num_classes`` and ``.backbone`` (which then expects input in the copy's dtype).

    What it does, and why (measured with ``benchmarks/bench_inference.py``,
    ``deeplab_v2_resnet101`` at 1x3x513x513 on a 2-core AMD EPYC with avx512_bf16, no AMX):

    - ``precision="bf16"``: the weights are converted to bfloat16 once and the input is cast
      to bf16, so every convolution runs oneDNN's bf16 kernels (2-3x less CPU time than fp32
      here; the 8x goal needs AMX bf16 units, which this CPU lacks). Converting the weights
      once beats ``torch.autocast``, which re-casts all 44M weights on every call (~2x more
      CPU time here). Logits differ from fp32 by ~2% of their largest magnitude (bf16 keeps 8
      significant bits; ~100 layers each round once).
    - ``precision="auto"`` (the default): bf16 where it is native, else fp32. On an AVX2-only
      CPU (a 2-core AMD EPYC without AVX-512) oneDNN emulates bf16: ResNet-18 at 480x360 took
      4.6 s per image in bf16 against 0.41 s in fp32.
    - ``channels_last``: NHWC activations, the layout oneDNN's CPU convolutions use natively.
    - ``fold_bn``: batch-norm folded into the preceding convolutions (one pass fewer over
      every feature map; exact up to float rounding).
    - Not used: ``torch.compile`` (inductor with freezing) saved ~16% CPU time but lost on wall
      time, after ~24 s of compilation per input size and ~300 MiB more memory;
      ``torch.jit.freeze`` measured no better than this eager path. The forward runs under
      ``torch.no_grad`` rather than ``inference_mode`` so callers may modify the outputs in place.

    Args:
        model: a network from :func:`deeplab.models.build_model` (plain or MSC).
        precision: ``"auto"`` (default: bf16 where the model's device computes it natively,
            see :func:`native_bf16`, else fp32), ``"bf16"`` or ``"fp32"`` (equal to the plain
            model up to float rounding, ~1e-6 relative).
        channels_last: run in NHWC memory format.
        fold_bn: fold batch-norm into the preceding convolutions.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return optimize_resolved(model, resolve_precision(precision, device), channels_last=channels_last,
                             fold_bn=fold_bn)


def optimize_resolved(model: nn.Module, precision: Literal["bf16", "fp32"], *, channels_last: bool = True,
                      fold_bn: bool = True) -> nn.Module:
    """:func:`optimize_for_inference` with a precision already resolved for the device the
    copy will run on (which may not be the one ``model`` is on yet)."""
    optimized = copy.deepcopy(model).eval()
    for p in optimized.parameters():
        p.requires_grad_(False)
    if fold_bn:
        fold_batchnorm(optimized)
    if precision == "bf16":
        optimized = optimized.to(torch.bfloat16)
    if channels_last:
        optimized = optimized.to(memory_format=torch.channels_last)
    return _InferenceModel(optimized, precision=precision, channels_last=channels_last).eval()
