"""Caffe import: the wire-format reader/writer and the name mapping onto the project's models.

The fake caffemodels are generated here from the official naming scheme (``res4b22_branch2a``,
``bn4b22_branch2a`` / ``scale4b22_branch2a``, ``fc1_voc12_c3``, ``conv5_3``, ``fc8_voc12``...),
written independently of ``deeplab.weights.mapping``, together with the project key each tensor
must land at; every tensor of the model is then compared with its expected source.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deeplab.models import build_model
from deeplab.weights import CaffeModelError, WeightsMismatchError, apply_state_dict, load_weights
from deeplab.weights.caffe import CaffeLayer, ConvGeometry, read_caffemodel, write_caffemodel
from deeplab.weights.mapping import caffe_to_state_dict

ENCODINGS = [
    pytest.param(dict(legacy=False, packed=True, double=False), id="layer-packed"),
    pytest.param(dict(legacy=False, packed=False, double=False), id="layer-unpacked"),
    pytest.param(dict(legacy=False, packed=True, double=True), id="layer-double"),
    pytest.param(dict(legacy=True, packed=True, double=False), id="layers-v1-packed"),
    pytest.param(dict(legacy=True, packed=False, double=True), id="layers-v1-unpacked-double"),
]


# --------------------------------------------------------------------------------------------
# wire format


def _small_net(rng: np.random.Generator) -> list[CaffeLayer]:
    return [
        CaffeLayer("data", "Input"),
        CaffeLayer("conv1", "Convolution",
                   [rng.standard_normal((4, 3, 3, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)],
                   ConvGeometry(num_output=4, kernel_size=(3, 3), stride=(2, 2), pad=(2, 2), dilation=(2, 2))),
        CaffeLayer("bn_conv1", "BatchNorm",
                   [rng.standard_normal(4).astype(np.float32), rng.random(4).astype(np.float32),
                    np.array([7.5], np.float32)]),
        CaffeLayer("fc", "InnerProduct", [rng.standard_normal((5, 300)).astype(np.float32)]),
        CaffeLayer("relu", "ReLU"),
    ]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_wire_format_round_trip(tmp_path, encoding):
    rng = np.random.default_rng(0)
    layers = _small_net(rng)
    path = tmp_path / "net.caffemodel"
    write_caffemodel(path, layers, **encoding)
    back = read_caffemodel(path)
    assert [layer.name for layer in back] == [layer.name for layer in layers]
    for orig, got in zip(layers, back):
        assert len(got.blobs) == len(orig.blobs)
        for a, b in zip(orig.blobs, got.blobs):
            if encoding["legacy"]:
                # V1 blobs carry the 4-D num/channels/height/width shape, 1-padded on the left.
                assert b.shape == (1,) * (4 - a.ndim) + a.shape
            else:
                assert b.shape == a.shape
            assert b.dtype == np.float32
            np.testing.assert_array_equal(b.reshape(a.shape), a)
    conv = back[1].conv
    assert conv is not None and conv.stride == (2, 2) and conv.pad == (2, 2) and conv.kernel_size == (3, 3)
    # V1 files come from forks that stored the atrous rate elsewhere: not read, reported as None.
    assert conv.dilation == (None if encoding["legacy"] else (2, 2))
    if not encoding["legacy"]:
        assert [layer.type for layer in back] == [layer.type for layer in layers]
    else:
        assert back[1].type == "Convolution" and back[3].type == "InnerProduct"


def test_truncated_caffemodel_names_the_file(tmp_path):
    path = tmp_path / "cut.caffemodel"
    write_caffemodel(path, _small_net(np.random.default_rng(1)))
    data = path.read_bytes()
    for cut in (len(data) - 3, len(data) // 2, 7):
        path.write_bytes(data[:cut])
        with pytest.raises(CaffeModelError, match=r"cut\.caffemodel.*truncated"):
            read_caffemodel(path)


@pytest.mark.parametrize("content", [b"", b"name: 'DeepLab'\nlayer {\n  name: 'conv1'\n}\n", b"\xff" * 64,
                                     b"\x0a\x03abc"])
def test_garbage_caffemodel_is_refused(tmp_path, content):
    path = tmp_path / "junk.caffemodel"
    path.write_bytes(content)
    with pytest.raises(CaffeModelError, match="junk.caffemodel"):
        read_caffemodel(path)


# --------------------------------------------------------------------------------------------
# ResNet-101: the official layer names, written independently of the mapping code

def _resnet101_block_names() -> dict[int, list[str]]:
    # MSRA ResNet-101 prototxt: res2 a-c, res3 a + b1..b3, res4 a + b1..b22, res5 a-c.
    return {
        2: ["a", "b", "c"],
        3: ["a"] + [f"b{i}" for i in range(1, 4)],
        4: ["a"] + [f"b{i}" for i in range(1, 23)],
        5: ["a", "b", "c"],
    }


def _fake_resnet101(num_classes: int, seed: int = 0, msc_copies: bool = True):
    """Caffe layers of DeepLab-v2 ResNet-101 (output stride 8) with random values, and
    ``expected``: project key -> array that must land there."""
    rng = np.random.default_rng(seed)
    layers: list[CaffeLayer] = []
    expected: dict[str, np.ndarray] = {}

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def conv(name, key, out_c, in_c, k, stride=1, pad=0, dilation=1, bias=False):
        blobs = [rand(out_c, in_c, k, k)]
        expected[f"{key}.weight"] = blobs[0]
        if bias:
            blobs.append(rand(out_c))
            expected[f"{key}.bias"] = blobs[1]
        layers.append(CaffeLayer(name, "Convolution", blobs,
                                 ConvGeometry(out_c, (k, k), (stride, stride), (pad, pad), (dilation, dilation))))

    def bn(suffix, key, c):
        factor = np.float32(rng.uniform(0.5, 3.0))
        mean, var = rand(c), rng.random(c).astype(np.float32) + 0.5
        layers.append(CaffeLayer(f"bn{suffix}", "BatchNorm", [mean * factor, var * factor, np.array([factor])]))
        gamma, beta = rand(c), rand(c)
        layers.append(CaffeLayer(f"scale{suffix}", "Scale", [gamma, beta]))
        expected[f"{key}.running_mean"] = mean
        expected[f"{key}.running_var"] = var
        expected[f"{key}.weight"] = gamma
        expected[f"{key}.bias"] = beta

    layers.append(CaffeLayer("data", "ImageData"))
    conv("conv1", "backbone.stem.conv1", 64, 3, 7, stride=2, pad=3)
    bn("_conv1", "backbone.stem.bn1", 64)
    in_c = 64
    stage_cfg = {2: (64, 1, 1), 3: (128, 2, 1), 4: (256, 1, 2), 5: (512, 1, 4)}  # planes, stride, dilation
    for stage, names in _resnet101_block_names().items():
        planes, stride, dilation = stage_cfg[stage]
        for i, b in enumerate(names):
            key = f"backbone.layer{stage - 1}.{i}"
            s = stride if i == 0 else 1
            if i == 0:
                conv(f"res{stage}a_branch1", f"{key}.downsample.0", planes * 4, in_c, 1, stride=s)
                bn(f"{stage}a_branch1", f"{key}.downsample.1", planes * 4)
            conv(f"res{stage}{b}_branch2a", f"{key}.conv1", planes, in_c, 1, stride=s)
            bn(f"{stage}{b}_branch2a", f"{key}.bn1", planes)
            conv(f"res{stage}{b}_branch2b", f"{key}.conv2", planes, planes, 3, pad=dilation, dilation=dilation)
            bn(f"{stage}{b}_branch2b", f"{key}.bn2", planes)
            conv(f"res{stage}{b}_branch2c", f"{key}.conv3", planes * 4, planes, 1)
            bn(f"{stage}{b}_branch2c", f"{key}.bn3", planes * 4)
            layers.append(CaffeLayer(f"res{stage}{b}", "Eltwise"))
            in_c = planes * 4
    for i, rate in enumerate((6, 12, 18, 24)):
        conv(f"fc1_voc12_c{i}", f"aspp.branches.{i}", num_classes, 2048, 3, pad=rate, dilation=rate, bias=True)
    if msc_copies:
        # The MSC training net repeats layers for the 0.5 / 0.75 inputs with shared weights.
        for layer in [layer for layer in layers if layer.blobs][:6] + [layers[-1]]:
            layers.append(CaffeLayer(layer.name + "_res05", layer.type, layer.blobs, layer.conv))
            layers.append(CaffeLayer(layer.name + "_res075", layer.type, layer.blobs, layer.conv))
    return layers, expected


@pytest.fixture(scope="module")
def resnet101():
    return build_model("deeplab_v2_resnet101", num_classes=21)


@pytest.fixture(scope="module")
def fake_resnet101():
    return _fake_resnet101(num_classes=21)


def _assert_every_tensor(model, expected):
    state = model.state_dict()
    checked = 0
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        assert key in expected, f"{key} has no expected source"
        np.testing.assert_allclose(value.numpy(), expected[key], rtol=1e-6, atol=0, err_msg=key)
        checked += 1
    assert checked == len(expected)


@pytest.fixture(scope="module")
def resnet101_caffemodel(tmp_path_factory, fake_resnet101):
    path = tmp_path_factory.mktemp("caffe") / "train_iter_20000.caffemodel"
    write_caffemodel(path, fake_resnet101[0])
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["layer", "layers-v1"])
def test_resnet101_caffemodel_round_trip(tmp_path, resnet101, fake_resnet101, resnet101_caffemodel, legacy):
    layers, expected = fake_resnet101
    if legacy:
        path = tmp_path / "train_iter_20000_v1.caffemodel"
        write_caffemodel(path, layers, legacy=True)
    else:
        path = resnet101_caffemodel
    load_weights(resnet101, path, strict=True)
    _assert_every_tensor(resnet101, expected)
    # The stride sits on the first 1x1 of res3a (Caffe layout), and res5 3x3s have dilation 4.
    assert resnet101.backbone.layer2[0].conv1.stride == (2, 2)
    assert resnet101.backbone.layer2[0].conv2.stride == (1, 1)
    assert resnet101.backbone.layer4[2].conv2.dilation == (4, 4)


def _replace(layers, name, **changes):
    """A copy of the layer list with one layer changed (the module fixture stays intact)."""
    out = []
    for layer in layers:
        if layer.name == name:
            fields = dict(name=layer.name, type=layer.type, blobs=list(layer.blobs), conv=layer.conv)
            fields.update(changes)
            layer = CaffeLayer(**fields)
        out.append(layer)
    return out


def test_batchnorm_factor_zero_follows_caffe(resnet101, fake_resnet101):
    # Caffe's BatchNormLayer uses scale = (factor == 0 ? 0 : 1 / factor).
    layers = fake_resnet101[0]
    bn = next(layer for layer in layers if layer.name == "bn_conv1")
    layers = _replace(layers, "bn_conv1", blobs=[bn.blobs[0], bn.blobs[1], np.zeros(1, np.float32)])
    # The fixture's multi-scale copies of bn_conv1 keep the old factor: noted, scale-1 kept.
    with pytest.warns(UserWarning, match="bn_conv1_res0"):
        state = caffe_to_state_dict(layers, resnet101).state_dict
    assert torch.count_nonzero(state["backbone.stem.bn1.running_mean"]) == 0
    assert torch.count_nonzero(state["backbone.stem.bn1.running_var"]) == 0
    assert torch.count_nonzero(state["backbone.stem.bn1.weight"]) > 0


def test_caffemodel_with_other_class_count_fails_naming_keys(fake_resnet101):
    layers, expected = fake_resnet101
    model = build_model("deeplab_v2_resnet101", num_classes=5)
    imported = caffe_to_state_dict(layers, model)
    assert imported.shape_mismatches[0] == (
        "Caffe fc1_voc12_c0.blobs[0] (21, 2048, 3, 3) -> aspp.branches.0.weight (5, 2048, 3, 3)"
    )
    # What load_weights does with it: strict -> an error naming keys, shapes and the cause ...
    with pytest.raises(WeightsMismatchError,
                       match=r"aspp\.branches\.0\.weight: file \(21, 2048, 3, 3\) vs model \(5, 2048, 3, 3\).*class count"):
        apply_state_dict(model, imported.state_dict, source="train_iter_20000.caffemodel", layout="caffe")
    # ... partial: the backbone loads, the classifier keeps its initialisation.
    before = model.aspp.branches[1].weight.detach().clone()
    result = apply_state_dict(model, imported.state_dict, source="x", layout="caffe", strict=False)
    assert sorted(result.skipped_shape)[:2] == ["aspp.branches.0.bias", "aspp.branches.0.weight"]
    torch.testing.assert_close(model.aspp.branches[1].weight, before)
    np.testing.assert_allclose(model.backbone.layer1[0].bn1.running_var.numpy(),
                               expected["backbone.layer1.0.bn1.running_var"], rtol=1e-6)


def test_caffemodel_into_other_network_fails(resnet101_caffemodel):
    model = build_model("deeplab_v2_resnet50", num_classes=21)
    # ResNet-50 has 6 res4 blocks, the file 23: the extra Caffe layers have no place.
    with pytest.raises(WeightsMismatchError, match=r"unexpected key.*first: \[.caffe:res4b6_branch2a"):
        load_weights(model, resnet101_caffemodel, strict=True)


def test_stride_on_the_3x3_is_rejected(resnet101, fake_resnet101):
    # A torchvision-style ResNet strides on the 3x3: a different network.
    layers = _replace(fake_resnet101[0], "res3a_branch2b", conv=ConvGeometry(128, (3, 3), (2, 2), (1, 1), (1, 1)))
    layers = _replace(layers, "res3a_branch2a", conv=ConvGeometry(128, (1, 1), (1, 1), (0, 0), (1, 1)))
    with pytest.raises(WeightsMismatchError, match="res3a_branch2"):
        caffe_to_state_dict(layers, resnet101)


def test_classifierless_init_caffemodel_needs_partial_load(tmp_path, fake_resnet101):
    # init.caffemodel (MS-COCO initialisation) carries no VOC classifier.
    layers, expected = fake_resnet101
    layers = [layer for layer in layers if not layer.name.startswith("fc1_")]
    path = tmp_path / "init.caffemodel"
    write_caffemodel(path, layers)
    model = build_model("deeplab_v2_resnet101", num_classes=11)
    before = model.aspp.branches[0].weight.detach().clone()
    with pytest.raises(WeightsMismatchError, match=r"aspp\.branches\.0"):
        load_weights(model, path, strict=True)
    result = load_weights(model, path, strict=False)
    assert any(k.startswith("aspp.branches.0") for k in result.missing)
    weights = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    assert result.loaded == len(weights) - len(result.missing)
    torch.testing.assert_close(model.aspp.branches[0].weight, before)
    np.testing.assert_array_equal(model.backbone.layer3[22].conv3.weight.detach().numpy(),
                                  expected["backbone.layer3.22.conv3.weight"])


# --------------------------------------------------------------------------------------------
# VGG-16: LargeFOV (v1, legacy V1 encoding in the release) and ASPP (v2)

_VGG_CONVS = [("conv1_1", 3, 64), ("conv1_2", 64, 64), ("conv2_1", 64, 128), ("conv2_2", 128, 128),
              ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256),
              ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512),
              ("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512)]


def _fake_vgg(num_classes: int, rates: tuple[int, ...], seed: int = 0):
    rng = np.random.default_rng(seed)
    layers, expected = [], {}

    def conv(name, key, out_c, in_c, k, pad, dilation):
        w = rng.standard_normal((out_c, in_c, k, k)).astype(np.float32)
        b = rng.standard_normal(out_c).astype(np.float32)
        layers.append(CaffeLayer(name, "Convolution", [w, b], ConvGeometry(out_c, (k, k), (1, 1), (pad, pad), (dilation, dilation))))
        expected[f"{key}.weight"], expected[f"{key}.bias"] = w, b

    for name, cin, cout in _VGG_CONVS:
        d = 2 if name.startswith("conv5") else 1
        conv(name, f"backbone.{name}", cout, cin, 3, d, d)
        if name.endswith(("1_2", "2_2", "3_3", "4_3", "5_3")):
            layers.append(CaffeLayer(f"pool{name[4]}", "Pooling"))
    for i, rate in enumerate(rates):
        suffix = "" if len(rates) == 1 else f"_{i + 1}"
        conv(f"fc6{suffix}", f"aspp.branches.{i}.fc6", 1024, 512, 3, rate, rate)
        conv(f"fc7{suffix}", f"aspp.branches.{i}.fc7", 1024, 1024, 1, 0, 1)
        conv(f"fc8_voc12{suffix}", f"aspp.branches.{i}.fc8", num_classes, 1024, 1, 0, 1)
    return layers, expected


def test_vgg16_largefov_legacy_caffemodel(tmp_path):
    layers, expected = _fake_vgg(21, (12,))
    path = tmp_path / "train_iter_6000.caffemodel"
    write_caffemodel(path, layers, legacy=True)
    model = build_model("deeplab_v1_largefov_vgg16", num_classes=21)
    load_weights(model, path, strict=True)
    _assert_every_tensor(model, expected)


def test_vgg16_aspp_caffemodel_and_wrong_variant():
    layers, expected = _fake_vgg(21, (6, 12, 18, 24), seed=1)
    model = build_model("deeplab_v2_vgg16", num_classes=21)
    imported = caffe_to_state_dict(layers, model)
    assert not imported.missing_units and not imported.unused_layers
    model.load_state_dict(imported.state_dict, strict=True)
    _assert_every_tensor(model, expected)
    # ASPP-S rates in the model, ASPP-L in the file: the geometry check catches it.
    model_s = build_model("deeplab_v2_vgg16", num_classes=21, atrous_rates=(2, 4, 8, 12))
    with pytest.raises(WeightsMismatchError, match=r"fc6_1.*dilation"):
        caffe_to_state_dict(layers, model_s)
    # An ASPP file into the LargeFOV model: nothing named fc6 / fc8_voc12.
    largefov = build_model("deeplab_v1_largefov_vgg16", num_classes=21)
    imported = caffe_to_state_dict(layers, largefov)
    assert "aspp.branches.0.fc6" in imported.missing_units and "fc6_1" in imported.unused_layers
