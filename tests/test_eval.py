"""Full-resolution evaluation: oracle / shifted models, CRF agreement, DDP == one process."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from _evaluation_helpers import (
    CAFFE,
    ArrayDataset,
    ColourOracle,
    colour_dataset,
    ddp_eval_worker,
    free_port,
    random_dataset,
)
from deeplab.engine.evaluate import crf_grid_search, evaluate, probs_path, refine_grid


def test_model_that_outputs_the_ground_truth_scores_one():
    ds = colour_dataset()
    for precision, optimize in (("fp32", False), ("bf16", True)):
        r = evaluate(ColourOracle().eval(), ds, normalization=CAFFE, optimize=optimize,
                     precision=precision)
        assert r["miou"] == 1.0 and r["pixel_acc"] == 1.0 and r["mean_acc"] == 1.0
        assert r["num_images"] == 3
        labelled = sum(int((m != 255).sum()) for m in ds.masks)
        assert r["num_pixels"] == labelled  # ignore pixels excluded, every other one counted


def test_shifted_prediction_gives_hand_computed_iou():
    h, w, half, s = 6, 20, 10, 3
    mask = np.zeros((h, w), np.uint8)
    mask[:, half:] = 1
    image = np.where(mask[..., None] == 1, [255, 0, 0], [0, 0, 0]).astype(np.uint8)
    ds = ArrayDataset([image], [mask], class_names=("bg", "red"), palette=np.array([[0, 0, 0], [255, 0, 0]], np.uint8))
    model = ColourOracle(palette=ds.palette, shift=s).eval()
    r = evaluate(model, ds, normalization=CAFFE, optimize=False, precision="fp32")
    # prediction: class 0 on the first half + s columns
    iou0 = half / (half + s)
    iou1 = (half - s) / half
    assert r["per_class_iou"] == pytest.approx([iou0, iou1])
    assert r["miou"] == pytest.approx((iou0 + iou1) / 2)
    assert r["pixel_acc"] == pytest.approx((w - s) / w)


def test_limit_examples_and_per_image_scores():
    ds = colour_dataset(sizes=((20, 28), (17, 33), (24, 24), (16, 20)), seed=1)
    r = evaluate(ColourOracle(shift=2).eval(), ds, normalization=CAFFE, optimize=False,
                 precision="fp32", limit=3, keep_examples=1)
    assert r["num_images"] == 3 and [p["id"] for p in r["per_image"]] == ds.ids[:3]
    mious = {p["id"]: p["miou"] for p in r["per_image"]}
    best, worst = r["examples"]["best"][0], r["examples"]["worst"][0]
    assert best["miou"] == max(mious.values()) and worst["miou"] == min(mious.values())
    assert best["pred"].shape == ds.masks[best["index"]].shape and best["pred"].dtype == np.uint8


def test_bad_inputs_are_reported():
    ds = colour_dataset()
    with pytest.raises(ValueError, match="5 classes but the data set has 4"):
        evaluate(ColourOracle(palette=np.zeros((5, 3), np.uint8)).eval(), ds, normalization=CAFFE,
                 optimize=False)
    bad = ArrayDataset([ds.images[0]], [ds.masks[1]])
    with pytest.raises(ValueError, match="img00.*mask"):
        evaluate(ColourOracle().eval(), bad, normalization=CAFFE, optimize=False)


def test_eval_crf_agrees_with_crf_on_saved_probs(tmp_path):
    from deeplab.crf import DenseCRF
    from deeplab.engine.metrics import ConfusionMatrix
    from deeplab.models import build_model

    torch.manual_seed(0)
    model = build_model("deeplab_v2_resnet18", num_classes=4).eval()
    with torch.no_grad():
        for p in model.classifier_parameters():
            p.mul_(30)
    ds = random_dataset(n=2, sizes=((32, 40), (24, 33)))
    crf = DenseCRF(bi_w=5, bi_xy_std=20, bi_rgb_std=5, pos_w=3, pos_xy_std=3)
    r = evaluate(model, ds, normalization=CAFFE, crf=crf, save_probs=tmp_path)
    plain = evaluate(model, ds, normalization=CAFFE)
    cm = ConfusionMatrix(4)
    changed = 0
    for i, sid in enumerate(ds.ids):
        probs = np.load(probs_path(tmp_path, sid))
        assert probs.dtype == np.float16 and probs.shape == (4, *ds.masks[i].shape)
        assert np.allclose(probs.astype(np.float32).sum(0), 1, atol=5e-3)
        refined = crf(ds.images[i], probs)
        pred = refined.argmax(0)
        changed += int((pred != probs.astype(np.float32).argmax(0)).sum())
        cm.update(pred, ds.masks[i])
    assert r["confusion_matrix"] == cm.mat.tolist()
    assert changed > 0  # the CRF did something, so the agreement is not trivial
    assert r["confusion_matrix"] != plain["confusion_matrix"]


def test_distributed_eval_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(ddp_eval_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    ds = colour_dataset(sizes=((20, 28), (17, 33), (24, 24), (16, 20), (21, 19)), seed=3)
    single = evaluate(ColourOracle(shift=2).eval(), ds, normalization=CAFFE, optimize=False,
                      precision="fp32", keep_examples=2)
    for r in (r0, r1):
        assert r["cm"] == single["confusion_matrix"]
        assert r["num_images"] == 5  # 5 images over 2 processes: no padding duplicate counted
        assert [p["id"] for p in r["per_image"]] == ds.ids
        assert math.isclose(r["miou"], single["miou"])
        assert [e[0] for e in r["examples"]["worst"]] == [e["id"] for e in single["examples"]["worst"]]
        assert r["examples"]["best"][0][1] == single["examples"]["best"][0]["pred"].tolist()


def test_crf_grid_search_equals_densecrf_per_setting():
    from deeplab.crf import DenseCRF
    from deeplab.engine.metrics import ConfusionMatrix

    rng = np.random.default_rng(0)
    ds = random_dataset(n=2, seed=2, sizes=((24, 32), (20, 28)))
    samples = []
    for image, mask in zip(ds.images, ds.masks):
        logits = torch.from_numpy(rng.normal(size=(4, *mask.shape)).astype(np.float32)) * 2
        samples.append((image, torch.softmax(logits, 0).to(torch.float16), mask))
    grid = dict(bi_w=[2.0, 6.0], bi_xy_std=[10.0, 40.0], bi_rgb_std=[4.0])
    rows = crf_grid_search(samples, 4, **grid, pos_w=3, pos_xy_std=3, iterations=5)
    assert len(rows) == 4
    for row in rows:
        crf = DenseCRF(bi_w=row["bi_w"], bi_xy_std=row["bi_xy_std"], bi_rgb_std=row["bi_rgb_std"],
                       pos_w=3, pos_xy_std=3, iterations=5)
        cm = ConfusionMatrix(4)
        for image, probs, mask in samples:
            cm.update(crf(image, probs.float()).argmax(0), mask)
        assert row["miou"] == pytest.approx(cm.compute()["miou"], abs=1e-12)
    assert len({round(r["miou"], 9) for r in rows}) > 1  # the settings do differ
    skip = {(2.0, 10.0, 4.0)}
    assert len(crf_grid_search(samples, 4, **grid, iterations=1, skip=skip)) == 3
    fine = refine_grid({"bi_w": 4.0, "bi_xy_std": 50.0, "bi_rgb_std": 3.0},
                       {"bi_w": 1.0, "bi_xy_std": 10.0, "bi_rgb_std": 1.0})
    assert fine == {"bi_w": [3.5, 4.0, 4.5], "bi_xy_std": [45.0, 50.0, 55.0], "bi_rgb_std": [2.5, 3.0, 3.5]}


def test_camvid_end_to_end(camvid_root):
    """Three real CamVid val images through the data set, a tiny model and the metrics."""
    from deeplab.data import build_dataset
    from deeplab.engine.metrics import ConfusionMatrix
    from deeplab.models import build_model

    ds = build_dataset("camvid", camvid_root, "val")
    torch.manual_seed(0)
    model = build_model("deeplab_v2_resnet18", num_classes=ds.num_classes).eval()
    r = evaluate(model, ds, normalization=CAFFE, limit=2, keep_examples=2)
    assert r["num_images"] == 2
    # independent recount from the kept predictions and the masks read back
    cm = ConfusionMatrix(ds.num_classes)
    for e in r["examples"]["best"]:
        mask = ds[e["index"]][1]
        assert e["pred"].shape == mask.shape == (360, 480)
        cm.update(e["pred"], mask)
    assert cm.mat.tolist() == r["confusion_matrix"]
    assert 0.0 <= r["miou"] <= 1.0 and r["num_pixels"] > 0.9 * 2 * 360 * 480


def test_progress_bar_ends_at_n_of_n(capsys):
    # It used to stop at N-1 of N: the bar wrapped the loader inside zip(indices, ...).
    ds = colour_dataset()
    evaluate(ColourOracle().eval(), ds, normalization=CAFFE, optimize=False, precision="fp32", progress=True)
    err = capsys.readouterr().err
    assert f"{len(ds)}/{len(ds)}" in err, err
