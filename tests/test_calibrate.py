"""Batch-norm recalibration on whole images (`deeplab.engine.calibrate`, `deeplab calibrate-bn`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from _evaluation_helpers import CAFFE, ArrayDataset, random_dataset, run_cli, tiny_weights, write_folder_dataset
from deeplab.data.transforms import normalize_image
from deeplab.engine.calibrate import recalibrate_bn


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5))
    with torch.no_grad():  # statistics far from the fresh (0, 1), so a skipped update shows
        for bn in (net[1], net[4]):
            bn.running_mean.fill_(7.0)
            bn.running_var.fill_(9.0)
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
    return net.eval()


def _images(n: int, size=(12, 16), seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, size=(*size, 3), dtype=np.uint8) for _ in range(n)]
    return ArrayDataset(images, [np.zeros(size, np.uint8)] * n)


def _batch_stats(net: nn.Sequential, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Brute force: each BN's input in train mode, its mean and unbiased variance per channel."""
    out = []
    with torch.no_grad():
        h = net[0](x)
        out.append((h.mean((0, 2, 3)), h.transpose(0, 1).reshape(4, -1).var(1, unbiased=True)))
        h = net[3](torch.relu(nn.functional.batch_norm(h, None, None, net[1].weight, net[1].bias, True)))
        out.append((h.mean((0, 2, 3)), h.transpose(0, 1).reshape(5, -1).var(1, unbiased=True)))
    return out


def test_one_batch_gives_the_data_statistics_exactly():
    net, ds = _net(), _images(6)
    x = torch.stack([normalize_image(im, CAFFE) for im in ds.images])
    info = recalibrate_bn(net, ds, normalization=CAFFE, batch_size=6, precision="fp32")
    assert info == {"images": 6, "batches": 1, "layers": 2, "batch_size": 6, "precision": "fp32"}
    for bn, (mean, var) in zip((net[1], net[4]), _batch_stats(net, x)):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-5)
    assert not net.training


def test_the_first_statistics_do_not_depend_on_batching_and_the_weights_stay():
    net, ds = _net(), _images(6, seed=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.stack([normalize_image(im, CAFFE) for im in ds.images])
    (mean, var), _ = _batch_stats(net, x)
    for batch_size, batches in ((2, 3), (4, 2), (1, 6)):
        info = recalibrate_bn(net, ds, normalization=CAFFE, batch_size=batch_size, precision="fp32")
        assert info["batches"] == batches
        # the first batch norm's input is the same however the images are batched: the data's
        # variance, not the average within-batch one (which would miss the spread between batches)
        torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net[1].running_var, var, rtol=1e-5, atol=1e-5)
        for key, value in net.state_dict().items():
            if key.endswith(("running_mean", "running_var")):
                assert not torch.equal(value, before[key]), key
            elif key.endswith("num_batches_tracked"):
                assert int(value) == batches
            else:
                assert torch.equal(value, before[key]), key
    within = sum(_batch_stats(net, x[i:i + 2])[0][1] for i in (0, 2, 4)) / 3
    assert not torch.allclose(within, var, rtol=1e-3)  # the check above can tell the two apart


def test_moments_keep_a_small_variance_under_a_large_mean():
    from deeplab.engine.calibrate import _Moments

    rng = np.random.default_rng(0)
    data = [torch.from_numpy(1e3 + rng.normal(0, 1.0, size=(2, 3, 40, 50))).float() for _ in range(4)]
    m = _Moments(3)
    for x in data:
        m(None, (x,))
    ref = torch.cat(data).double().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(m.mean, ref.mean(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(m.variance(), ref.var(1), rtol=1e-4, atol=0)
    # float32 sums of x and x^2 (E[x^2] - E[x]^2) lose this variance to cancellation
    flat = torch.cat(data).transpose(0, 1).reshape(3, -1)
    naive = (flat.square().sum(1) / flat.shape[1] - (flat.sum(1) / flat.shape[1]).square()).double()
    assert not torch.allclose(naive, ref.var(1), rtol=1e-2)


def test_images_are_batched_with_their_size_and_limit_counts_images():
    net = _net()
    a, b = _images(3, (12, 16)), _images(1, (10, 14), seed=2)
    ds = ArrayDataset([a.images[0], a.images[1], b.images[0], a.images[2]], [None] * 4)
    assert recalibrate_bn(net, ds, normalization=CAFFE, batch_size=8, precision="fp32")["batches"] == 2
    assert recalibrate_bn(net, ds, normalization=CAFFE, batch_size=2, precision="fp32")["batches"] == 3
    # one image per size: more than 4 batches' worth waiting flushes the fullest, nothing is lost
    many = ArrayDataset([_images(1, (8 + i, 9)).images[0] for i in range(10)], [None] * 10)
    info = recalibrate_bn(net, many, normalization=CAFFE, batch_size=2, precision="fp32")
    assert (info["images"], info["batches"]) == (10, 10)
    info = recalibrate_bn(net, ds, normalization=CAFFE, batch_size=8, limit=2, precision="fp32")
    assert (info["images"], info["batches"]) == (2, 1)


def test_bad_arguments_and_models_without_batch_norm():
    ds = _images(2)
    with pytest.raises(ValueError, match="no trainable batch norm"):
        recalibrate_bn(nn.Conv2d(3, 2, 1), ds, normalization=CAFFE)
    with pytest.raises(ValueError, match="batch_size"):
        recalibrate_bn(_net(), ds, normalization=CAFFE, batch_size=0)
    with pytest.raises(ValueError, match="limit"):
        recalibrate_bn(_net(), ds, normalization=CAFFE, limit=0)


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    data = write_folder_dataset(root / "data", random_dataset(n=3, sizes=((32, 40),)))
    return root, data, tiny_weights(root / "tiny.safetensors")


def test_cli_writes_recalibrated_weights_that_load_strictly(cli_setup, tmp_path, capsys):
    from deeplab.weights import build_from_weights, read_metadata, read_state_dict

    root, data, weights = cli_setup
    out = tmp_path / "cal.safetensors"
    rc = run_cli(["calibrate-bn", "--weights", str(weights), "--dataset", "folder", "--data-root", str(data),
                  "--split", "all", "--output-stride", "16", "--precision", "fp32", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "on 3 all images" in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta["bn_calibration"] == {"dataset": "folder", "split": "all", "images": 3, "batches": 1,
                                      "layers": 20, "batch_size": 8, "precision": "fp32"}
    assert meta["model_kwargs"]["output_stride"] == 16
    assert meta["class_names"] == read_metadata(weights)["class_names"]
    old, new = read_state_dict(weights)[0], read_state_dict(out)[0]
    assert old.keys() == new.keys()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    model, _ = build_from_weights(out)  # strict load
    assert model.output_stride == 16


def test_cli_keeps_float16_and_reports_bad_input(cli_setup, tmp_path, capsys):
    from deeplab.weights import half_state_dict, read_metadata, read_state_dict, save_state_dict

    root, data, weights = cli_setup
    half = tmp_path / "half.safetensors"
    save_state_dict(half_state_dict(read_state_dict(weights)[0]), half, read_metadata(weights))
    out = tmp_path / "cal.safetensors"
    base = ["calibrate-bn", "--dataset", "folder", "--data-root", str(data), "--split", "all"]
    assert run_cli([*base, "--weights", str(half), "--out", str(out), "--limit", "1"]) == 0
    assert read_state_dict(out)[0]["aspp.branches.0.weight"].dtype == torch.float16
    capsys.readouterr()
    assert run_cli([*base, "--weights", str(tmp_path / "missing.safetensors"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    assert run_cli([*base, "--weights", str(weights), "--out", str(tmp_path / "x.pth")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    five = tiny_weights(tmp_path / "five.safetensors", num_classes=5)
    assert run_cli([*base, "--weights", str(five), "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "5 classes but folder has 4" in capsys.readouterr().err
    assert not (tmp_path / "y.safetensors").exists()


def test_cli_names_a_truncated_image_and_writes_nothing(tmp_path, capsys):
    data = write_folder_dataset(tmp_path / "data", random_dataset(n=2, sizes=((32, 40),)))
    bad = data / "images" / "img01.png"
    bad.write_bytes(bad.read_bytes()[:60])
    out = tmp_path / "cal.safetensors"
    rc = run_cli(["calibrate-bn", "--weights", str(tiny_weights(tmp_path / "w.safetensors")), "--dataset", "folder",
                  "--data-root", str(data), "--split", "all", "--out", str(out)])
    assert rc == 2
    assert "img01.png" in capsys.readouterr().err
    assert not out.exists()
