"""predict_probs / predict_logits: MSC fusion, flipping, sliding windows, the size cap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from _evaluation_helpers import CAFFE, PALETTE, ColourOracle
from deeplab.engine.inference import (
    finish_prediction,
    labels_from_logits,
    predict_logits,
    predict_probs,
    prepare_model,
    upsample_logits,
)


@pytest.fixture(scope="module")
def r18():
    from deeplab.models import build_model

    torch.manual_seed(0)
    return build_model("deeplab_v2_resnet18", num_classes=5).eval()


@pytest.fixture(scope="module")
def m32(r18):
    return prepare_model(r18, precision="fp32")


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


class Pointwise(nn.Module):
    """A 1x1 convolution: each pixel's logits depend on that pixel only (stride 1)."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x)


def test_probs_shape_sum_and_precision(r18, m32):
    img = _image(37, 45)
    p32 = predict_probs(m32, img, normalization=CAFFE, precision="fp32")
    assert p32.shape == (1, 5, 37, 45) and p32.dtype == torch.float32
    assert torch.allclose(p32.sum(1), torch.ones(1, 37, 45), atol=1e-5)
    # the fp32 path equals running the plain model by hand
    from deeplab.data.transforms import normalize_image

    with torch.no_grad():
        ref = r18(normalize_image(img, CAFFE)[None])
    ref = torch.softmax(torch.nn.functional.interpolate(ref, size=(37, 45), mode="bilinear",
                                                        align_corners=True), 1)
    assert torch.allclose(p32, ref, atol=1e-4)
    mbf = prepare_model(r18, precision="bf16")  # the default ("auto") is fp32 where bf16 is emulated
    pbf = predict_probs(mbf, img, normalization=CAFFE)
    assert pbf.dtype == torch.float32
    assert torch.allclose(pbf.sum(1), torch.ones(1, 37, 45), atol=1e-5)  # softmax in fp32
    l32 = predict_logits(m32, img, normalization=CAFFE, precision="fp32")
    lbf = predict_logits(mbf, img, normalization=CAFFE)
    assert lbf.dtype == torch.float32
    assert 0 < ((lbf - l32).norm() / l32.norm()).item() < 0.05  # bf16 did run, close to fp32


def test_msc_fusion_equals_the_msc_model(r18, m32):
    from deeplab.models import DeepLabMSC

    img = _image(41, 50, seed=2)
    plain = m32
    msc = prepare_model(DeepLabMSC(r18, (0.5, 0.75)), precision="fp32")
    ours = predict_logits(plain, img, normalization=CAFFE, msc_scales=(0.5, 0.75), precision="fp32")
    theirs = predict_logits(msc, img, normalization=CAFFE, precision="fp32")
    assert torch.allclose(ours, theirs, atol=1e-4)
    single = predict_logits(plain, img, normalization=CAFFE, precision="fp32")
    assert not torch.allclose(ours, single, atol=1e-3)
    assert bool((ours >= single - 1e-5).all())  # a max over scales includes scale 1
    # the same scales again on an MSC model is not applied twice; different ones are refused
    again = predict_logits(msc, img, normalization=CAFFE, msc_scales=(0.75, 0.5), precision="fp32")
    assert torch.equal(again, theirs)
    with pytest.raises(ValueError, match="MSC twice"):
        predict_logits(msc, img, normalization=CAFFE, msc_scales=(0.5,))


def test_flip_averaging_is_mirror_equivariant(m32):
    img = _image(33, 40, seed=3)
    model = m32
    a = predict_probs(model, img, normalization=CAFFE, flip=True, precision="fp32")
    b = predict_probs(model, img[:, ::-1].copy(), normalization=CAFFE, flip=True, precision="fp32")
    assert torch.allclose(a, b.flip(-1), atol=1e-5)
    c = predict_probs(model, img, normalization=CAFFE, precision="fp32")
    assert not torch.allclose(a, c, atol=1e-4)  # flipping did change something


def test_sliding_window_equals_whole_image_for_a_pointwise_model():
    model = Pointwise().eval()
    img = _image(50, 70, seed=4)
    whole = predict_probs(model, img, normalization=CAFFE, precision="fp32")
    for window, overlap in ((32, 1 / 3), (24, 0.5), (64, 0.25), (200, 0.0)):
        slid = predict_probs(model, img, normalization=CAFFE, precision="fp32",
                             sliding_window=window, overlap=overlap)
        assert slid.shape == whole.shape
        assert torch.allclose(slid, whole, atol=1e-5), (window, overlap)


def test_sliding_window_on_a_real_network_covers_every_pixel(m32):
    img = _image(50, 70, seed=5)
    p = predict_probs(m32, img, normalization=CAFFE, precision="fp32", sliding_window=48)
    assert p.shape == (1, 5, 50, 70) and torch.allclose(p.sum(1), torch.ones(1, 50, 70), atol=1e-5)


def test_size_cap_downscales_with_a_notice_and_keeps_full_size():
    # four colour quadrants: few pixels near a boundary, so most labels survive downscaling
    labels = np.zeros((40, 64), np.int64)
    labels[:20, 32:], labels[20:, :32], labels[20:, 32:] = 1, 2, 3
    img = PALETTE[labels]
    notices = []
    p = predict_probs(ColourOracle().eval(), img, normalization=CAFFE, precision="fp32",
                      max_pixels=400, notice=notices.append)
    assert p.shape == (1, 4, 40, 64)
    assert len(notices) == 1 and "64x40" in notices[0] and "400" in notices[0]
    with pytest.warns(UserWarning, match="inference cap"):
        predict_probs(ColourOracle().eval(), img, normalization=CAFFE, max_pixels=400)
    full = predict_probs(ColourOracle().eval(), img, normalization=CAFFE, precision="fp32")
    agree = (p.argmax(1) == full.argmax(1)).float().mean()
    assert agree > 0.9


def test_batches_lists_and_errors(r18, m32):
    model = m32
    a, b = _image(30, 34, 6), _image(30, 34, 7)
    batch = predict_probs(model, [a, b], normalization=CAFFE, precision="fp32")
    one = predict_probs(model, b, normalization=CAFFE, precision="fp32")
    assert batch.shape == (2, 5, 30, 34) and torch.allclose(batch[1], one[0], atol=1e-4)
    with pytest.raises(ValueError, match="one size"):
        predict_probs(model, [a, _image(31, 34)], normalization=CAFFE)
    with pytest.raises(ValueError, match="uint8"):
        predict_probs(model, a.astype(np.float32), normalization=CAFFE)
    with pytest.raises(ValueError, match="training mode"):
        predict_probs(r18.train(), a, normalization=CAFFE)
    r18.eval()
    with pytest.raises(ValueError, match="precision"):
        predict_probs(model, a, normalization=CAFFE, precision="fp16")


def test_labels_from_logits_is_the_argmax_of_the_upsampled_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5, 7) * 3
    labels = labels_from_logits(logits, (33, 49))
    assert torch.equal(labels, upsample_logits(logits, (33, 49)).argmax(1))
    # corners aligned: the corner pixels take the corner logits' argmax
    assert torch.equal(labels[:, 0, 0], logits[:, :, 0, 0].argmax(1))
    assert torch.equal(labels[:, -1, -1], logits[:, :, -1, -1].argmax(1))
    img = np.zeros((33, 49, 3), np.uint8)
    lab, probs = finish_prediction(logits[:1], img, want_probs=True)
    assert torch.equal(lab, labels[0]) and probs.dtype == torch.float16


def _near_tie_logits(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    # Class 5 within ~1 ulp of class 1: the upsampled values decide by their last bit.
    torch.manual_seed(seed)
    logits = torch.randn(shape)
    logits[:, 5] = logits[:, 1] + 1e-7 * torch.randn(logits[:, 1].shape)
    return logits


@pytest.mark.parametrize("channels_last", [False, True])
def test_labels_from_logits_equal_the_full_argmax_at_near_ties(channels_last, monkeypatch):
    from deeplab.engine import inference

    # Small outputs (H + W <= 128) take PyTorch's channel-vectorised kernel, which rounds one
    # class alone differently from all classes together.
    for seed in range(5):
        logits = _near_tie_logits(seed, (1, 11, 6, 8))
        if channels_last:
            logits = logits.contiguous(memory_format=torch.channels_last)
        ref = upsample_logits(logits, (48, 64)).argmax(1)
        assert torch.equal(labels_from_logits(logits, (48, 64)), ref)
    # The one-class-at-a-time path for very large outputs, forced with a tiny budget.
    monkeypatch.setattr(inference, "_FULL_UPSAMPLE_BYTES", 0)
    logits = _near_tie_logits(0, (1, 11, 12, 16))
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last)
    ref = upsample_logits(logits, (89, 121)).argmax(1)
    assert torch.equal(labels_from_logits(logits, (89, 121)), ref)
    lab, _ = finish_prediction(logits, np.zeros((89, 121, 3), np.uint8), want_probs=True)
    assert torch.equal(lab, ref[0])
    # Three classes on one thread: PyTorch's channel-vectorised kernel again.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        logits = _near_tie_logits(1, (1, 6, 40, 50))[:, [1, 2, 5]].contiguous()
        assert torch.equal(labels_from_logits(logits, (300, 400)), upsample_logits(logits, (300, 400)).argmax(1))
    finally:
        torch.set_num_threads(threads)


def test_segment_labels_are_the_argmax_of_its_probabilities(r18, tmp_path):
    import deeplab
    from deeplab.engine import segment as segment_module

    class NearTie(nn.Module):
        """Logits on a 6x8 grid where classes 1 and 4 differ by about one ulp (near zero, so
        exp can also round them to one probability)."""

        num_classes = 5

        def forward(self, x):
            torch.manual_seed(0)
            logits = torch.randn(x.shape[0], 5, 6, 8) * 1e-3
            logits[:, 4] = logits[:, 1] + 1e-9 * torch.randn(x.shape[0], 6, 8)
            return logits

    mismatches = 0
    for seed in range(3):
        labels, probs = deeplab.segment(_image(48, 64, seed), model=NearTie(), precision="fp32")
        mismatches += int((labels != probs.argmax(0)).sum())
    assert mismatches == 0


def test_input_scale_runs_the_network_on_the_resized_image(m32):
    img = _image(30, 40, seed=8)
    logits = predict_logits(m32, img, normalization=CAFFE, precision="fp32", input_scale=1.5)
    # Reference by hand: Caffe normalisation, bilinear resize at pixel centres, the network.
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float().flip(1)
    x = x - torch.tensor(CAFFE["mean"]).view(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(x, size=(45, 60), mode="bilinear", align_corners=False)
    with torch.inference_mode():
        expected = m32(x.contiguous(memory_format=torch.channels_last)).float()
    assert logits.shape == expected.shape == (1, 5, 6, 8)  # 45x60 at stride 8, not 30x40's 4x5
    assert torch.allclose(logits, expected, atol=1e-4)
    probs = predict_probs(m32, img, normalization=CAFFE, precision="fp32", input_scale=1.5)
    assert probs.shape == (1, 5, 30, 40)  # back at the image's size
    assert torch.allclose(probs, torch.softmax(upsample_logits(expected, (30, 40)), 1), atol=1e-5)
    with pytest.raises(ValueError, match="input_scale"):
        predict_logits(m32, img, normalization=CAFFE, input_scale=0)


def test_input_scale_keeps_labels_in_place_and_meets_the_cap():
    # A colour oracle is resolution-free: upscaled 2x its labels, brought back, are the truth
    # except next to the quadrant boundaries (a misaligned resize would move whole columns).
    labels = np.zeros((40, 64), np.int64)
    labels[:20, 32:], labels[20:, :32], labels[20:, 32:] = 1, 2, 3
    img = PALETTE[labels]
    p = predict_probs(ColourOracle().eval(), img, normalization=CAFFE, precision="fp32", input_scale=2.0)
    assert p.shape == (1, 4, 40, 64)
    assert (p.argmax(1)[0].numpy() == labels).mean() > 0.97
    notices = []
    predict_probs(ColourOracle().eval(), img, normalization=CAFFE, precision="fp32", input_scale=2.0,
                  max_pixels=4000, notice=notices.append)  # 128x80 = 10240 pixels after the scale
    assert len(notices) == 1 and "input scale 2" in notices[0]


def test_input_scale_comes_from_the_weights_metadata(tmp_path):
    from _evaluation_helpers import tiny_weights
    import deeplab
    from deeplab.engine.segment import load_bundle
    from deeplab.weights import read_metadata, save_state_dict
    from deeplab.weights.loading import read_state_dict

    plain = tiny_weights(tmp_path / "plain.safetensors")
    state, _, _ = read_state_dict(plain)
    scaled = tmp_path / "scaled.safetensors"
    save_state_dict(state, scaled, {**read_metadata(plain), "input_scale": 2.0})
    assert load_bundle(plain).input_scale == 1.0 and load_bundle(scaled).input_scale == 2.0
    img = _image(40, 48, seed=9)
    by_meta, _ = deeplab.segment(img, weights=scaled)
    by_arg, _ = deeplab.segment(img, weights=plain, input_scale=2.0)
    unscaled, _ = deeplab.segment(img, weights=plain)
    assert np.array_equal(by_meta, by_arg)
    assert not np.array_equal(by_meta, unscaled)  # the scale changed what the network saw
    for bad in (0, -1.5, "2", True):
        with pytest.raises(ValueError, match="input_scale"):
            save_state_dict(state, tmp_path / "bad.safetensors", {"input_scale": bad})
