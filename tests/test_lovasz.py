"""The Lovasz-softmax loss against its definition, and as a term of the training loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deeplab.engine.losses import LOVASZ_BINS, lovasz_softmax, msc_cross_entropy
from deeplab.engine.train import train_step


def _jaccard_loss(mistakes: np.ndarray, gt: np.ndarray) -> float:
    """1 - IoU of the prediction that gets exactly ``mistakes`` wrong: |M| / |gt u M|."""
    union = (gt | mistakes).sum()
    return float(mistakes.sum() / union) if union else 0.0


def _lovasz_by_thresholds(probs: np.ndarray, labels: np.ndarray) -> float:
    """The Lovasz extension as an integral over thresholds t of the Jaccard loss of {m >= t}."""
    losses = []
    for c in range(probs.shape[0]):
        gt = labels == c
        if not gt.any():
            continue
        m = np.abs(gt.astype(np.float64) - probs[c])
        levels = np.unique(np.concatenate([m, [0.0]]))[::-1]
        losses.append(sum((a - b) * _jaccard_loss(m >= a, gt) for a, b in zip(levels[:-1], levels[1:])))
    return float(np.mean(losses))


@pytest.mark.parametrize("bins", [None, LOVASZ_BINS])
@pytest.mark.parametrize("seed", range(4))
def test_lovasz_softmax_matches_the_threshold_integral(seed, bins):
    torch.manual_seed(seed)
    num_classes = 4
    logits = torch.randn(2, num_classes, 3, 5, dtype=torch.float64)
    labels = torch.randint(0, num_classes - 1, (2, 3, 5))  # the last class never occurs
    labels[0, 0, :2] = 255
    got = float(lovasz_softmax(logits, labels, bins=bins))
    probs = logits.softmax(1).permute(1, 0, 2, 3).reshape(num_classes, -1).numpy()
    flat = labels.reshape(-1).numpy()
    keep = flat != 255
    tolerance = 1e-9 if bins is None else 1.0 / bins  # the bucketed loss's bound
    assert got == pytest.approx(_lovasz_by_thresholds(probs[:, keep], flat[keep]), rel=1e-5, abs=tolerance)


@pytest.mark.parametrize("bins", [None, LOVASZ_BINS])
def test_lovasz_softmax_at_hard_predictions_is_one_minus_iou(bins):
    torch.manual_seed(0)
    num_classes = 5
    labels = torch.randint(0, num_classes, (2, 6, 7))
    labels[1, 2:4] = 255
    pred = torch.where(torch.rand(2, 6, 7) < 0.3, torch.randint(0, num_classes, (2, 6, 7)), labels.clamp(max=4))
    logits = 100.0 * F.one_hot(pred, num_classes).permute(0, 3, 1, 2).double()  # softmax = one-hot
    valid = labels != 255
    ious = [((pred == c) & (labels == c) & valid).sum().item() / ((pred == c) | (labels == c))[valid].sum().item()
            for c in range(num_classes) if ((labels == c) & valid).any()]
    assert float(lovasz_softmax(logits, labels, bins=bins)) == pytest.approx(1 - np.mean(ious), abs=1e-9)


def test_lovasz_softmax_gradient():
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (1, 4, 4))
    labels[0, 0, 0] = 255
    assert torch.autograd.gradcheck(lambda x: lovasz_softmax(x, labels, bins=None), (logits,))


@pytest.mark.parametrize("bins", [16, 256, LOVASZ_BINS])
def test_bucketed_lovasz_lies_within_one_bucket_of_the_sort(bins):
    """Many pixels per bucket: |bucketed - exact| <= 1 / bins, and the gradients come closer
    to the sort's the finer the buckets are."""
    torch.manual_seed(2)
    logits = (3 * torch.randn(2, 6, 40, 50, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, 6, (2, 40, 50))
    labels[:, :5] = 255
    exact = lovasz_softmax(logits, labels, bins=None)
    bucketed = lovasz_softmax(logits, labels, bins=bins)
    assert abs(float(bucketed) - float(exact)) <= 1.0 / bins
    assert abs(float(bucketed) - float(exact)) > 0  # buckets shared: not the sort in disguise
    (g_exact,) = torch.autograd.grad(exact, logits)
    (g_bucketed,) = torch.autograd.grad(bucketed, logits)
    error = float((g_bucketed - g_exact).abs().sum() / g_exact.abs().sum())
    assert error < {16: 0.1, 256: 0.01, LOVASZ_BINS: 1e-4}[bins]  # one mean per bucket: 0.6, 0.5, 0.01


def test_bucketed_lovasz_with_one_pixel_per_bucket_is_exact():
    torch.manual_seed(3)
    logits = torch.randn(1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (1, 4, 5))
    exact = lovasz_softmax(logits, labels, bins=None)
    bucketed = lovasz_softmax(logits, labels, bins=1 << 20)  # 20 errors per class: no bucket shared
    assert float(bucketed) == pytest.approx(float(exact), abs=1e-12)
    torch.testing.assert_close(torch.autograd.grad(bucketed, logits)[0], torch.autograd.grad(exact, logits)[0])


def test_lovasz_softmax_resizes_labels_and_handles_all_ignored():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (1, 16, 16))
    shrunk = labels[:, ::4, ::4]  # nearest neighbour at stride 4
    torch.testing.assert_close(lovasz_softmax(logits, labels), lovasz_softmax(logits, shrunk))
    nothing = lovasz_softmax(logits, torch.full((1, 4, 4), 255))
    assert float(nothing.detach()) == 0.0
    nothing.backward()  # still part of the graph
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def test_train_step_adds_the_lovasz_term_averaged_over_micro_batches():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 3, padding=1)
    images = torch.randn(4, 3, 8, 8)
    labels = torch.randint(0, 4, (4, 8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    micro = [(images[:2], labels[:2]), (images[2:], labels[2:])]
    loss = train_step(model, optimizer, micro, precision="fp32", lovasz_weight=0.5)
    with torch.no_grad():
        logits = model(images)
        ce = msc_cross_entropy(logits, labels)
        lov = (lovasz_softmax(logits[:2], labels[:2]) + lovasz_softmax(logits[2:], labels[2:])) / 2
    assert math.isclose(float(loss), float(ce + 0.5 * lov), rel_tol=1e-5)
    plain = train_step(model, optimizer, micro, precision="fp32")
    assert math.isclose(float(plain), float(ce), rel_tol=1e-5)


def test_lovasz_weight_is_validated():
    from deeplab.engine.config import ConfigError, parse_config

    assert parse_config({}, ["solver.lovasz_weight=0.5"]).solver.lovasz_weight == 0.5
    assert parse_config({}, []).solver.lovasz_weight == 0.0  # the paper's loss by default
    with pytest.raises(ConfigError, match="lovasz_weight"):
        parse_config({}, ["solver.lovasz_weight=-1"])
