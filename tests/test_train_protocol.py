"""The paper's training protocol, piece by piece: poly lr, parameter groups, the MSC loss, iter_size."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deeplab.engine.losses import msc_cross_entropy, resize_labels, valid_weight
from deeplab.engine.lr_schedule import PolyLR, poly_lr
from deeplab.engine.train import _StreamSampler, build_param_groups, train_step


# ---- poly lr ----------------------------------------------------------------------------------


@pytest.mark.parametrize("it", [0, 1, 10, 999, 1000, 1500])
def test_poly_lr_formula(it):
    expected = 2.5e-4 * (1 - min(it, 1000) / 1000) ** 0.9
    assert poly_lr(2.5e-4, it, 1000, 0.9) == pytest.approx(expected, rel=1e-12, abs=0)
    assert poly_lr(2.5e-4, 0, 1000) == 2.5e-4
    assert poly_lr(2.5e-4, 1000, 1000) == 0.0


def test_warmup_ramps_then_follows_poly():
    for it in range(0, 12):
        expected = 0.01 * (1 - it / 100) ** 0.9 * ((it + 1) / 5 if it < 5 else 1.0)
        assert poly_lr(0.01, it, 100, 0.9, warmup_iter=5) == pytest.approx(expected, rel=1e-12)
    assert poly_lr(0.01, 4, 100, warmup_iter=5) == pytest.approx(poly_lr(0.01, 4, 100))


def test_poly_scheduler_sets_each_group_with_its_multiplier():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr_mult": 1.0}, {"params": [b], "lr_mult": 20.0}], lr=1.0)
    sched = PolyLR(opt, base_lr=1e-3, max_iter=100, power=0.9)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 2e-2]
    sched.step_to(50)
    base = 1e-3 * 0.5**0.9
    assert opt.param_groups[0]["lr"] == pytest.approx(base)
    assert opt.param_groups[1]["lr"] == pytest.approx(20 * base)
    state = sched.state_dict()
    other = PolyLR(opt, base_lr=1e-3, max_iter=100)
    other.load_state_dict(state)
    assert other.iteration == 50 and opt.param_groups[1]["lr"] == pytest.approx(20 * base)


# ---- parameter groups -------------------------------------------------------------------------


def _tiny_resnet(freeze: bool):
    from deeplab.models import build_model, freeze_batchnorm

    torch.manual_seed(0)
    model = build_model("deeplab_v2_resnet18", num_classes=5)
    return freeze_batchnorm(model) if freeze else model


@pytest.mark.parametrize("freeze", [True, False])
def test_param_groups_cover_every_trainable_parameter_once(freeze):
    model = _tiny_resnet(freeze)
    groups = build_param_groups(model, weight_decay=5e-4)
    by_name = {g["name"]: g for g in groups}
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))
    classifier = {id(p) for p in model.classifier_parameters()}
    assert classifier, "the model reports no classifier parameters"
    assert {id(p) for p in by_name["classifier_weights"]["params"]} | {
        id(p) for p in by_name["classifier_biases"]["params"]
    } == classifier
    assert by_name["classifier_weights"]["lr_mult"] == 10 and by_name["classifier_weights"]["weight_decay"] == 5e-4
    assert by_name["classifier_biases"]["lr_mult"] == 20 and by_name["classifier_biases"]["weight_decay"] == 0
    assert by_name["backbone_weights"]["lr_mult"] == 1 and by_name["backbone_weights"]["weight_decay"] == 5e-4
    assert all(p.ndim > 1 for p in by_name["backbone_weights"]["params"])
    if freeze:
        assert "norm" not in by_name  # frozen BN has no parameters at all
    else:
        bn = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
        assert {id(p) for p in by_name["norm"]["params"]} == bn
        assert by_name["norm"]["weight_decay"] == 0


def test_sgd_step_applies_multipliers_and_decay_per_group():
    """One SGD step (momentum buffer empty) must move each parameter by lr*mult*(g + wd*p) or lr*mult*g."""
    model = _tiny_resnet(freeze=True)
    groups = build_param_groups(model, weight_decay=0.1)
    opt = torch.optim.SGD(groups, lr=1.0, momentum=0.9, weight_decay=0.1)
    PolyLR(opt, base_lr=0.01, max_iter=10)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = {id(p): (p.detach().clone(), p.grad.clone()) for p in model.parameters()}
    opt.step()
    expected_mult = {"backbone_weights": (1, 0.1), "backbone_biases": (2, 0.0),
                     "classifier_weights": (10, 0.1), "classifier_biases": (20, 0.0)}
    for g in groups:
        mult, wd = expected_mult[g["name"]]
        for p in g["params"]:
            p0, grad = before[id(p)]
            torch.testing.assert_close(p.detach(), p0 - 0.01 * mult * (grad + wd * p0), rtol=1e-6, atol=1e-7)


# ---- losses -----------------------------------------------------------------------------------


def _nearest_brute(labels: torch.Tensor, h: int, w: int) -> torch.Tensor:
    B, H, W = labels.shape
    out = torch.empty(B, h, w, dtype=torch.long)
    for i in range(h):
        for j in range(w):
            out[:, i, j] = labels[:, (i * H) // h, (j * W) // w]
    return out


def test_resize_labels_is_nearest_and_invents_no_value():
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (2, 33, 47))
    labels[:, :5] = 255
    for h, w in [(5, 6), (9, 12), (33, 47), (50, 60)]:
        out = resize_labels(labels, (h, w))
        assert torch.equal(out, _nearest_brute(labels, h, w))
        assert set(out.unique().tolist()) <= set(labels.unique().tolist())


def test_msc_loss_is_the_sum_of_four_cross_entropies():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2, 41, 41))
    labels[0, :10, :] = 255
    sizes = [(11, 11), (9, 9), (6, 6), (11, 11)]  # scale 1, 0.75, 0.5, fused
    maps = [torch.randn(2, 4, h, w) for h, w in sizes]
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0])
    for wt in (None, weight):
        expected = sum(
            F.cross_entropy(m, _nearest_brute(labels, *m.shape[-2:]), weight=wt, ignore_index=255) for m in maps
        )
        got = msc_cross_entropy(maps, labels, ignore_index=255, weight=wt)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    single = msc_cross_entropy(maps[0], labels)
    torch.testing.assert_close(single, F.cross_entropy(maps[0], _nearest_brute(labels, 11, 11), ignore_index=255))


def test_loss_is_fp32_even_for_bf16_logits():
    logits = torch.randn(1, 3, 4, 4).bfloat16()
    loss = msc_cross_entropy(logits, torch.randint(0, 3, (1, 4, 4)))
    assert loss.dtype == torch.float32


def test_global_normaliser_makes_split_batches_equal_one_batch():
    """Two half batches with the whole batch's valid count give the whole batch's gradient,
    even when the halves hold different numbers of ignored pixels."""
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 8, 8, requires_grad=True)
    labels = torch.randint(0, 3, (4, 16, 16))
    labels[0] = 255
    labels[1, :8] = 255
    whole = msc_cross_entropy(logits, labels)
    (g_whole,) = torch.autograd.grad(whole, logits)
    n = valid_weight(labels, (8, 8))
    halves = sum(msc_cross_entropy(logits[i : i + 2], labels[i : i + 2], normalizers=[n]) for i in (0, 2))
    (g_split,) = torch.autograd.grad(halves, logits)
    torch.testing.assert_close(halves, whole)
    torch.testing.assert_close(g_split, g_whole)
    # whereas the mean of per-half means (Caffe's iter_size) is a different quantity here
    naive = sum(msc_cross_entropy(logits[i : i + 2], labels[i : i + 2]) for i in (0, 2)) / 2
    assert not math.isclose(float(naive.detach()), float(whole.detach()), rel_tol=1e-3)


@pytest.mark.parametrize("resolution", ["logits", "labels"])
def test_train_step_loss_resolution(resolution):
    """``logits``: labels shrunk to the logits (the paper); ``labels``: logits upsampled bilinearly."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 3, stride=4, padding=1)
    images = torch.randn(2, 3, 16, 16)
    labels = torch.randint(0, 4, (2, 16, 16))
    labels[0, :3] = 255  # a thin ignored strip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = train_step(model, optimizer, [(images, labels)], precision="fp32", loss_resolution=resolution)
    logits = model(images)
    if resolution == "labels":
        logits = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
        want = F.cross_entropy(logits, labels, ignore_index=255)
    else:
        want = F.cross_entropy(logits, resize_labels(labels, (4, 4)), ignore_index=255)
    assert math.isclose(float(loss), float(want.detach()), rel_tol=1e-5)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_trains_in_bf16_only_where_native(monkeypatch, native):
    """The configs' default, "auto": the same loss as an explicit bf16 step where the CPU has bf16
    units, as an fp32 step where it would be emulated."""
    import deeplab.models.inference as inf
    from deeplab.engine.config import parse_config

    assert parse_config({}).precision == "auto"
    monkeypatch.setattr(inf, "_native_bf16", lambda device_type, index=None: native)
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 3, padding=1)
    batch = [(torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2, 8, 8)))]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    losses = {p: float(train_step(model, optimizer, batch, precision=p)) for p in ("auto", "bf16", "fp32")}
    assert losses["auto"] == losses["bf16" if native else "fp32"]
    assert losses["bf16"] != losses["fp32"]  # the two precisions are told apart


def test_loss_resolution_is_validated():
    from deeplab.engine.config import ConfigError, parse_config

    assert parse_config({}, ["solver.loss_resolution=labels"]).solver.loss_resolution == "labels"
    with pytest.raises(ConfigError, match="loss_resolution"):
        parse_config({}, ["solver.loss_resolution=pixels"])
    cfg = parse_config({}, ["data.focus_classes=[2, 6]", "data.focus_prob=0.5"])
    assert cfg.data.focus_classes == [2, 6] and cfg.data.focus_prob == 0.5
    for bad in (["data.focus_prob=0.5"], ["data.focus_classes=[2]", "data.focus_prob=2"],
                ["data.focus_classes=[255]", "data.focus_prob=0.5"]):
        with pytest.raises(ConfigError, match="focus"):
            parse_config({}, bad)


# ---- data order -------------------------------------------------------------------------------


def _positions(**kw):
    return [p for p, _ in _StreamSampler(**kw)]


def test_global_batches_are_the_same_set_however_split():
    n, seed, start, stop = 7, 3, 2, 5
    one = _StreamSampler(n, seed=seed, batch_size=4, iter_size=1, rank=0, world_size=1, start=start, stop=stop)
    pairs = list(one)
    acc = list(_StreamSampler(n, seed=seed, batch_size=2, iter_size=2, rank=0, world_size=1, start=start, stop=stop))
    assert pairs == acc  # same positions in the same order
    ranks = [list(_StreamSampler(n, seed=seed, batch_size=2, iter_size=1, rank=r, world_size=2, start=start, stop=stop))
             for r in (0, 1)]
    for it in range(stop - start):
        step = set(pairs[4 * it : 4 * it + 4])
        assert step == set(ranks[0][2 * it : 2 * it + 2]) | set(ranks[1][2 * it : 2 * it + 2])
    # positions are contiguous from start * global_batch; each epoch is a permutation of the data
    assert [p for p, _ in pairs] == list(range(start * 4, stop * 4))
    full = list(_StreamSampler(n, seed=seed, batch_size=7, iter_size=1, rank=0, world_size=1, start=0, stop=2))
    assert sorted(i for _, i in full[:7]) == list(range(7)) and sorted(i for _, i in full[7:]) == list(range(7))
    assert [i for _, i in full[:7]] != [i for _, i in full[7:]]  # reshuffled per epoch


def test_init_weights_load_matching_tensors_and_skip_the_classifier(tmp_path):
    from deeplab.engine.checkpoint import save_state_dict
    from deeplab.engine.train import TrainingError, _load_init_weights
    from deeplab.models import build_model

    torch.manual_seed(1)
    src = build_model("deeplab_v2_resnet18", num_classes=21)
    save_state_dict(src.state_dict(), tmp_path / "init.safetensors")
    torch.manual_seed(2)
    dst = build_model("deeplab_v2_resnet18", num_classes=11)
    messages = []
    _load_init_weights(dst, tmp_path / "init.safetensors", messages.append)
    s, d = src.state_dict(), dst.state_dict()
    classifier = {id(p) for p in dst.classifier_parameters()}
    names = {n for n, p in dst.named_parameters() if id(p) in classifier}
    for k in d:
        if k in names:
            assert d[k].shape != s[k].shape  # 11 vs 21 classes: left at its initialisation
        else:
            assert torch.equal(d[k], s[k]), k
    assert "skipped for their shape" in messages[0]
    skipped = sum(1 for k in d if d[k].shape != s[k].shape)
    counters = sum(1 for k in d if k.endswith("num_batches_tracked"))  # not weights: not counted
    assert counters > 0 and f"{len(d) - skipped - counters} tensors loaded" in messages[0], messages[0]
    with pytest.raises(TrainingError, match="deeplab convert"):
        _load_init_weights(dst, tmp_path / "init.caffemodel", messages.append)
