"""Class frequencies and class-balancing loss weights (SegNet median frequency, ENet).

Small classes decide mIoU on CamVid (pole 1.0 %, pedestrian 0.6 %, bicyclist 0.5 % of pixels);
weighting the cross-entropy by these weights is the usual remedy (SegNet, ENet).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ClassFrequencies", "CLASS_WEIGHTINGS", "class_frequencies", "median_frequency_weights",
           "sqrt_median_frequency_weights", "enet_weights"]


@dataclass(frozen=True)
class ClassFrequencies:
    """Per-class pixel statistics of a data set's (mapped) masks.

    Attributes:
        pixel_counts: (C,) pixels of each class.
        image_pixel_counts: (C,) labelled (non-ignore) pixels of the images in which the class
            occurs (the denominator of SegNet's median frequency balancing).
        image_counts: (C,) number of images in which the class occurs.
        ignored_pixels: pixels labelled 255.
    """

    pixel_counts: np.ndarray
    image_pixel_counts: np.ndarray
    image_counts: np.ndarray
    ignored_pixels: int

    @property
    def share(self) -> np.ndarray:
        """Fraction of all labelled pixels per class."""
        total = self.pixel_counts.sum()
        return self.pixel_counts / max(total, 1)


def class_frequencies(dataset) -> ClassFrequencies:
    """Count class pixels over every mask of ``dataset`` (masks only: images are not decoded).

    Args:
        dataset: a :class:`~deeplab.data.datasets.base.SegmentationDataset` (uses ``load_mask``).

    Returns:
        :class:`ClassFrequencies`.
    """
    c = dataset.num_classes
    pixels = np.zeros(c, np.int64)
    image_pixels = np.zeros(c, np.int64)
    images = np.zeros(c, np.int64)
    ignored = 0
    for i in range(len(dataset)):
        counts = np.bincount(dataset.load_mask(i).ravel(), minlength=256)
        per_class = counts[:c]
        present = per_class > 0
        labelled = int(per_class.sum())
        pixels += per_class
        image_pixels[present] += labelled
        images[present] += 1
        ignored += int(counts[dataset.ignore_index])
    return ClassFrequencies(pixels, image_pixels, images, ignored)


def median_frequency_weights(freqs: ClassFrequencies) -> np.ndarray:
    """SegNet's median frequency balancing (Eigen & Fergus): ``w_c = median(f) / f_c``.

    ``f_c`` = pixels of class c / labelled pixels of the images where c occurs. Classes that never
    occur get weight 0 (they contribute no loss anyway).

    Returns:
        float32 (C,) weights for ``torch.nn.CrossEntropyLoss(weight=...)``.
    """
    present = freqs.image_pixel_counts > 0
    f = np.zeros(len(freqs.pixel_counts), np.float64)
    f[present] = freqs.pixel_counts[present] / freqs.image_pixel_counts[present]
    if not present.any():
        raise ValueError("no labelled pixels: cannot compute class weights")
    med = np.median(f[present])
    w = np.zeros_like(f)
    w[present] = med / f[present]
    return w.astype(np.float32)


def sqrt_median_frequency_weights(freqs: ClassFrequencies) -> np.ndarray:
    """The square root of :func:`median_frequency_weights`: ``w_c = sqrt(median(f) / f_c)``.

    A milder balance: on CamVid it spans 0.39 (road) to 2.97 (bicyclist) instead of 0.15 to 8.8,
    so the rare classes gain recall without the network's posterior being skewed as far (see the
    logit adjustment in the model card, docs/model-cards.md, which undoes a weighting after training).

    Returns:
        float32 (C,) weights.
    """
    return np.sqrt(median_frequency_weights(freqs)).astype(np.float32)


def enet_weights(freqs: ClassFrequencies, c: float = 1.02) -> np.ndarray:
    """ENet's weighting ``w_c = 1 / ln(c + p_c)`` with ``p_c`` the class's share of all labelled pixels.

    Bounded in (0, 1/ln(c)] (about 50.5 for c = 1.02), so rare classes cannot blow up the loss.

    Returns:
        float32 (C,) weights.
    """
    if c <= 1.0:
        raise ValueError(f"c must exceed 1 (ln(c) > 0), got {c}")
    return (1.0 / np.log(c + freqs.share)).astype(np.float32)


# The names ``data.class_weights`` accepts in a training config -> their function of the frequencies.
CLASS_WEIGHTINGS = {
    "median_freq": median_frequency_weights,
    "sqrt_median_freq": sqrt_median_frequency_weights,
    "enet": enet_weights,
}
