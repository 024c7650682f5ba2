"""Joint transforms: alignment of image and mask, no invented labels, padding, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deeplab.data import transforms as T

# Flat colour blocks; the mask is a function of the colour, so it can be recomputed from pixels.
_COLOURS = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10], [10, 250, 250]], np.uint8)


def _blocks(h: int = 97, w: int = 131, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Blocks of 16x16 pixels, large enough that interpolation only blurs their borders.
    grid = rng.integers(0, len(_COLOURS), size=(h // 16 + 1, w // 16 + 1))
    labels = np.kron(grid, np.ones((16, 16), dtype=np.int64))[:h, :w].astype(np.uint8)
    image = _COLOURS[labels]
    return image, labels


def _labels_from_colours(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest block colour per pixel, and whether the pixel is exactly (+-2) a block colour."""
    diff = np.abs(image[:, :, None, :].astype(np.int32) - _COLOURS[None, None].astype(np.int32)).max(-1)
    return diff.argmin(-1).astype(np.uint8), diff.min(-1) <= 2


def _interior(labels: np.ndarray, r: int = 2) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood has a single label (away from block borders)."""
    h, w = labels.shape
    pad = np.pad(labels, r, mode="edge")
    same = np.ones_like(labels, dtype=bool)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            same &= pad[r + dy : r + dy + h, r + dx : r + dx + w] == labels
    return same


@pytest.mark.parametrize("seed", range(6))
def test_train_pipeline_keeps_image_and_mask_aligned(seed: int) -> None:
    image, mask = _blocks(181, 233, seed=seed)
    g = torch.Generator().manual_seed(seed)
    geo = T.Compose([
        T.RandomScale((0.5, 1.5), generator=g),
        T.PadToSize(150, image_fill=(0, 0, 0)),
        T.RandomCrop(150, generator=g),
        T.RandomHorizontalFlip(0.5, generator=g),
    ])
    out_img, out_mask = geo(image, mask)
    assert out_img.shape[:2] == out_mask.shape == (150, 150)
    # No invented labels: every output value is an input value or the padding 255.
    assert set(np.unique(out_mask)) <= set(np.unique(mask)) | {255}
    from_colour, exact = _labels_from_colours(out_img)
    valid = (out_mask != 255) & exact & _interior(from_colour) & _interior(out_mask)
    assert valid.sum() > 0.3 * (out_mask != 255).sum() > 0
    np.testing.assert_array_equal(out_mask[valid], from_colour[valid])
    # Padded area: image black where the mask says ignore (bottom/right padding).
    pad = out_mask == 255
    assert (out_img[pad] == 0).all()


def test_alignment_check_can_fail() -> None:
    # The same check detects a one-sided shift of a few pixels.
    image, mask = _blocks()
    shifted = np.roll(mask, 3, axis=1)
    from_colour, exact = _labels_from_colours(image)
    valid = exact & _interior(from_colour)
    assert (shifted[valid] != from_colour[valid]).any()


def test_random_scale_sizes_and_nearest_labels() -> None:
    image, mask = _blocks(40, 60)
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        img2, m2 = T.RandomScale((0.5, 1.5), generator=g)(image, mask)
        s = img2.shape[0] / 40
        assert 0.5 - 0.02 <= s <= 1.5 + 0.02
        assert abs(img2.shape[1] / 60 - s) < 0.05
        assert m2.dtype == np.uint8 and set(np.unique(m2)) <= set(np.unique(mask))


def test_float_image_scale_matches_uint8_path() -> None:
    image, mask = _blocks(40, 60)
    a, _ = T.Resize((30, 45))(image, mask)
    b, _ = T.Resize((30, 45))(image.astype(np.float32), mask)
    # Pillow's bilinear (uint8) and torch's (float) downscale differently (Pillow antialiases),
    # but interiors of blocks must agree.
    lab, _ = _labels_from_colours(a)
    inside = _interior(lab)
    assert np.abs(a[inside].astype(np.float32) - b[inside]).max() <= 2


@pytest.mark.parametrize("fourth", [0, 10, 255])
def test_uint8_channels_beyond_rgb_are_resized_independently(fourth: int) -> None:
    # A 4th channel (NIR, depth, or a transparent alpha) must not scale the colours, as Pillow's
    # RGBA resize (premultiplied alpha) would.
    from PIL import Image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    image[..., 3] = fourth
    mask = np.zeros((20, 30), np.uint8)
    for size in ((10, 15), (33, 41)):
        out, _ = T.Resize(size)(image, mask)
        rgb = np.asarray(Image.fromarray(image[..., :3]).resize(size[::-1], Image.BILINEAR))
        assert out.shape == (*size, 4) and out.dtype == np.uint8
        assert np.array_equal(out[..., :3], rgb)
        assert (out[..., 3] == fourth).all()
    five = rng.integers(0, 256, (20, 30, 5), dtype=np.uint8)
    out, _ = T.Resize((10, 15))(five, mask)
    assert np.array_equal(out[..., 1:4], T.Resize((10, 15))(five[..., 1:4], mask)[0])


def test_pad_values() -> None:
    image = np.full((5, 7, 3), 9, np.uint8)
    mask = np.zeros((5, 7), np.uint8)
    out_img, out_mask = T.PadToSize((8, 10))(image, mask)
    assert out_img.shape == (8, 10, 3) and out_mask.shape == (8, 10)
    # Default fill: the RGB mean pixel of Caffe's BGR mean, rounded.
    np.testing.assert_array_equal(out_img[7, 9], [123, 117, 104])
    np.testing.assert_array_equal(out_img[:5, :7], image)
    assert (out_mask[5:] == 255).all() and (out_mask[:, 7:] == 255).all() and (out_mask[:5, :7] == 0).all()
    # Padding with the mean means normalised padding is ~0.
    norm = T.normalize_image(out_img, T.CAFFE_NORMALIZATION)
    assert norm[:, 7, 9].abs().max() < 0.7
    # No padding needed: unchanged.
    same_img, same_mask = T.PadToSize(3)(image, mask)
    assert same_img is image and same_mask is mask


def test_crop_requires_padding() -> None:
    with pytest.raises(ValueError, match="PadToSize"):
        T.RandomCrop(10)(np.zeros((5, 20, 3), np.uint8), np.zeros((5, 20), np.uint8))


def test_size_mismatch_rejected() -> None:
    with pytest.raises(ValueError, match="sizes differ"):
        T.RandomHorizontalFlip()(np.zeros((5, 6, 3), np.uint8), np.zeros((6, 5), np.uint8))


def test_flip_is_joint() -> None:
    image, mask = _blocks(20, 30)
    img2, m2 = T.RandomHorizontalFlip(1.0)(image, mask)
    np.testing.assert_array_equal(img2, image[:, ::-1])
    np.testing.assert_array_equal(m2, mask[:, ::-1])
    img3, m3 = T.RandomHorizontalFlip(0.0)(image, mask)
    assert img3 is image and m3 is mask


def test_determinism_with_seed() -> None:
    image, mask = _blocks()

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        pipeline = T.build_train_transforms(crop_size=64, generator=torch.Generator().manual_seed(seed))
        outs = [pipeline(image, mask) for _ in range(3)]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # Global RNG path (what DataLoader workers use): seeded torch gives the same draws.
    torch.manual_seed(5)
    x = T.build_train_transforms(crop_size=64)(image, mask)
    torch.manual_seed(5)
    y = T.build_train_transforms(crop_size=64)(image, mask)
    assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


def test_normalize_caffe_bgr_and_rgb() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (4, 5), dtype=np.uint8)
    x, y = T.Normalize("caffe_bgr")(image, mask)
    assert x.dtype == torch.float32 and x.shape == (3, 4, 5) and y.dtype == torch.int64
    # Independent reference: channel 0 is blue minus 104.008, no division.
    np.testing.assert_allclose(x[0].numpy(), image[:, :, 2] - 104.008, rtol=0, atol=1e-4)
    np.testing.assert_allclose(x[2].numpy(), image[:, :, 0] - 122.675, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(y.numpy(), mask)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    x2, _ = T.Normalize("rgb", mean, std)(image, mask)
    np.testing.assert_allclose(x2[1].numpy(), (image[:, :, 1] / 255 - 0.456) / 0.224, atol=1e-5)
    # Round trip and batches.
    for spec in (T.CAFFE_NORMALIZATION, T.IMAGENET_NORMALIZATION):
        np.testing.assert_array_equal(T.denormalize_image(T.normalize_image(image, spec), spec), image)
        batch = T.normalize_image(np.stack([image, image]), spec)
        assert batch.shape == (2, 3, 4, 5)
    assert T.mean_pixel_rgb(T.IMAGENET_NORMALIZATION)[0] == pytest.approx(0.485 * 255)


def test_normalization_spec_errors() -> None:
    with pytest.raises(ValueError, match="mode"):
        T.check_normalization({"mode": "bgr", "mean": [1, 2, 3]})
    with pytest.raises(ValueError, match="unknown"):
        T.check_normalization({"mode": "caffe_bgr", "mean": [1, 2, 3], "std": [1, 1, 1]})
    with pytest.raises(ValueError, match="std"):
        T.check_normalization({"mode": "rgb", "mean": [1, 2, 3]})
    with pytest.raises(ValueError, match="needs mean and std"):
        T.Normalize("rgb")


def test_eval_transforms_pad() -> None:
    image = np.zeros((10, 12, 3), np.uint8)
    mask = np.ones((10, 12), np.uint8)
    x, y = T.build_eval_transforms(pad_to=16)(image, mask)
    assert x.shape == (3, 16, 16) and (y[10:] == 255).all() and (y[:10, :12] == 1).all()


# ---- class-focused crops (not in the paper) ----------------------------------------------------


def test_focused_crop_always_holds_the_focus_pixel():
    """focus_prob 1: every crop contains the single pixel of the focus class, wherever it is."""
    image = np.zeros((60, 80, 3), np.uint8)
    for y, x in [(0, 0), (59, 79), (30, 5), (2, 70)]:
        mask = np.zeros((60, 80), np.uint8)
        mask[y, x] = 7
        crop = T.RandomCrop(21, generator=torch.Generator().manual_seed(y + x), focus_classes=[7, 9], focus_prob=1.0)
        for _ in range(20):
            _, m = crop(image, mask)
            assert m.shape == (21, 21) and (m == 7).sum() == 1


def test_focused_crop_offsets_vary_and_fall_back_to_uniform():
    image = np.zeros((60, 80, 3), np.uint8)
    mask = np.zeros((60, 80), np.uint8)
    mask[30, 40] = 7
    crop = T.RandomCrop(21, generator=torch.Generator().manual_seed(0), focus_classes=[7], focus_prob=1.0)
    # The window's position among those containing the pixel is random: several distinct crops.
    seen = set()
    rows = np.arange(60, dtype=np.uint8)[:, None, None].repeat(80, 1).repeat(3, 2)
    for _ in range(30):
        img, _ = crop(rows, mask)
        seen.add(int(img[0, 0, 0]))
    assert len(seen) > 5 and all(10 <= t <= 30 for t in seen)
    # No focus class in the mask: uniform crops, all positions possible.
    empty = np.zeros((60, 80), np.uint8)
    tops = {int(crop(rows, empty)[0][0, 0, 0]) for _ in range(200)}
    assert min(tops) < 10 and max(tops) > 30


def test_focus_prob_zero_draws_the_papers_crops():
    """No focus: exactly the same random stream as the plain crop (resumed runs stay identical)."""
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    mask = np.full((50, 70), 7, np.uint8)
    a = T.RandomCrop(21, generator=torch.Generator().manual_seed(3))
    b = T.RandomCrop(21, generator=torch.Generator().manual_seed(3), focus_classes=[7], focus_prob=0.0)
    for _ in range(10):
        np.testing.assert_array_equal(a(image, mask)[0], b(image, mask)[0])
    with pytest.raises(ValueError, match="focus_prob"):
        T.RandomCrop(21, focus_classes=[1], focus_prob=1.5)


def _jitter_reference(image: np.ndarray, factors: list[float]) -> np.ndarray:
    """Brightness, contrast, saturation by their definitions in float64, no Pillow.

    Each step is a blend ``degenerate + f * (x - degenerate)`` truncated to an integer (as
    Pillow's ``Image.blend``): with black, with the mean grey, with the grey image.
    """
    grey = lambda a: a @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2 luma, Pillow's "L"
    x = np.clip(np.trunc(image.astype(np.float64) * factors[0]), 0, 255)
    mean = np.floor(grey(x).mean() + 0.5)
    x = np.clip(np.trunc(mean + factors[1] * (x - mean)), 0, 255)
    g = np.round(grey(x))[..., None]
    return np.clip(np.trunc(g + factors[2] * (x - g)), 0, 255)


def test_color_jitter_matches_the_definitions_and_keeps_the_mask() -> None:
    image = np.random.default_rng(3).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    mask = np.random.default_rng(4).integers(0, 5, size=(40, 56), dtype=np.uint8)
    jitter = T.ColorJitter(0.4, generator=torch.Generator().manual_seed(7))
    out, out_mask = jitter(image, mask)
    replay = torch.Generator().manual_seed(7)
    factors = [0.6 + 0.8 * float(torch.rand((), generator=replay)) for _ in range(3)]
    assert out.dtype == np.uint8 and out.shape == image.shape and out_mask is mask
    diff = np.abs(out.astype(np.float64) - _jitter_reference(image, factors))
    assert diff.max() <= 1 and diff.mean() < 0.01  # 1: Pillow's integer luma, now and then
    assert np.abs(out.astype(np.int32) - image).mean() > 5  # and it did change the image
    same, _ = T.ColorJitter(0.0)(image, mask)
    assert same is image
    with pytest.raises(ValueError, match="strength"):
        T.ColorJitter(1.0)
    with pytest.raises(ValueError, match="uint8"):
        T.ColorJitter(0.2)(image.astype(np.float32), mask)


def test_color_jitter_comes_first_in_the_training_pipeline() -> None:
    image, mask = _blocks()
    pipeline = T.build_train_transforms(crop_size=64, color_jitter=0.3,
                                        generator=torch.Generator().manual_seed(0))
    assert isinstance(pipeline.transforms[0], T.ColorJitter)
    assert not any(isinstance(t, T.ColorJitter) for t in T.build_train_transforms(crop_size=64).transforms)
    x, y = pipeline(image, mask)
    assert x.shape == (3, 64, 64) and y.shape == (64, 64)
    assert set(np.unique(y.numpy())) <= set(np.unique(mask)) | {255}  # no invented labels


@pytest.mark.parametrize("mean", [[float("nan"), 1, 2], ["104", 116, 122], [True, 1, 2], [1, 2], 104.0])
def test_one_normalization_check_for_transforms_configs_and_weights(mean):
    """check_normalization is the check the config and the weights' metadata use too: a mean that
    is not 3 finite numbers is refused by all three, each naming where it came from."""
    from deeplab.engine.config import ConfigError, parse_config
    from deeplab.weights.safetensors_io import _validate_metadata

    spec = {"mode": "caffe_bgr", "mean": mean}
    with pytest.raises(ValueError, match="normalization 'mean' needs 3 finite numbers"):
        T.check_normalization(spec)
    with pytest.raises(ConfigError, match="data.normalization: normalization 'mean'"):
        parse_config({"data": {"normalization": spec}})
    with pytest.raises(ValueError, match="metadata normalization: normalization 'mean'"):
        _validate_metadata({"normalization": spec})
