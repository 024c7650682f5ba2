"""ConfusionMatrix against hand-computed numbers and a brute-force loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deeplab.engine.metrics import ConfusionMatrix, metrics_from_matrix


def test_hand_computed_matrix():
    # 3 classes, 8 labelled pixels + 2 ignored.
    target = np.array([[0, 0, 0, 1], [1, 1, 2, 2], [255, 255, 0, 2]], dtype=np.uint8)
    pred = np.array([[0, 0, 1, 1], [1, 2, 2, 2], [1, 2, 0, 0]], dtype=np.uint8)
    cm = ConfusionMatrix(3)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    # rows = gt, cols = pred; the ignored pixels (pred 1 and 2) are not counted.
    expected = np.array([[3, 1, 0], [0, 2, 1], [1, 0, 2]])
    assert cm.mat.numpy().tolist() == expected.tolist()
    r = cm.compute()
    # IoU: c0 = 3 / (4 + 4 - 3) = 3/5, c1 = 2 / (3 + 3 - 2) = 2/4, c2 = 2 / (3 + 3 - 2) = 2/4
    assert r["per_class_iou"] == pytest.approx([3 / 5, 1 / 2, 1 / 2])
    assert r["miou"] == pytest.approx((3 / 5 + 1 / 2 + 1 / 2) / 3)
    assert r["pixel_acc"] == pytest.approx(7 / 10)
    assert r["per_class_acc"] == pytest.approx([3 / 4, 2 / 3, 2 / 3])
    assert r["mean_acc"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    assert r["fwiou"] == pytest.approx(4 / 10 * 3 / 5 + 3 / 10 * 1 / 2 + 3 / 10 * 1 / 2)
    assert r["num_pixels"] == 10


def test_absent_class_is_nan_and_excluded_predicted_only_counts_zero():
    cm = ConfusionMatrix(4)
    # class 3 never appears: NaN; class 2 predicted but not in the ground truth: IoU 0.
    cm.update(np.array([0, 1, 2]), np.array([0, 1, 1]))
    r = cm.compute()
    iou = r["per_class_iou"]
    assert iou[0] == 1.0 and iou[1] == pytest.approx(0.5) and iou[2] == 0.0
    assert math.isnan(iou[3])
    assert r["miou"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert math.isnan(r["per_class_acc"][2])  # no ground truth of class 2
    assert r["mean_acc"] == pytest.approx((1 + 0.5) / 2)


def test_against_brute_force_and_accumulation():
    rng = np.random.default_rng(0)
    n = 5
    cm = ConfusionMatrix(n, ignore_index=255)
    brute = np.zeros((n, n), dtype=np.int64)
    for _ in range(4):
        t = rng.integers(0, n, size=(7, 9)).astype(np.uint8)
        t[rng.random((7, 9)) < 0.2] = 255
        p = rng.integers(0, n, size=(7, 9))
        cm.update(torch.from_numpy(p), t)  # mixed tensor / array inputs
        for ti, pi in zip(t.ravel(), p.ravel()):
            if ti != 255:
                brute[ti, pi] += 1
    assert np.array_equal(cm.mat.numpy(), brute)
    r = cm.compute()
    ious = [brute[c, c] / (brute[c].sum() + brute[:, c].sum() - brute[c, c]) for c in range(n)]
    assert r["miou"] == pytest.approx(np.mean(ious))
    assert metrics_from_matrix(brute)["miou"] == pytest.approx(r["miou"])


def test_perfect_prediction():
    t = np.random.default_rng(1).integers(0, 3, size=(10, 10))
    cm = ConfusionMatrix(3)
    cm.update(t, t)
    r = cm.compute()
    assert r["miou"] == 1.0 and r["pixel_acc"] == 1.0 and r["fwiou"] == pytest.approx(1.0)


def test_errors_name_the_problem():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\[7\]"):
        cm.update(np.zeros(2), np.array([0, 7]))
    with pytest.raises(ValueError, match="predicted"):
        cm.update(np.array([0, 3]), np.array([0, 1]))


def test_all_reduce_without_process_group_is_noop_and_merge_adds():
    a, b = ConfusionMatrix(2), ConfusionMatrix(2)
    a.update(np.array([0, 1]), np.array([0, 0]))
    b.update(np.array([1]), np.array([1]))
    a.all_reduce()
    assert a.mat.tolist() == [[1, 1], [0, 0]]
    a.merge(b)
    assert a.mat.tolist() == [[1, 1], [0, 1]]
    r = ConfusionMatrix(2).compute()
    assert math.isnan(r["miou"]) and math.isnan(r["pixel_acc"])
