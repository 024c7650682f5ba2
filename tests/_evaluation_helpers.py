"""Shared helpers of the evaluation / inference / segment / CLI tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

CAFFE = {"mode": "caffe_bgr", "mean": [104.008, 116.669, 122.675]}
NAMES = ("bg", "red", "green", "blue")
PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)


class ColourOracle(nn.Module):
    """Stride-1 'network' whose logits are one-hot of the nearest palette colour of each pixel.

    On images whose colour encodes the label it outputs the ground truth; ``shift`` moves its
    output right by that many columns (replicating the first column) for hand-computed IoUs.
    """

    output_stride = 1

    def __init__(self, palette: np.ndarray = PALETTE, shift: int = 0) -> None:
        super().__init__()
        self.register_buffer("palette", torch.tensor(palette, dtype=torch.float32))
        self.register_buffer("mean_bgr", torch.tensor(CAFFE["mean"]).view(1, 3, 1, 1))
        self.num_classes = len(palette)
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = (x.float() + self.mean_bgr).flip(1)  # undo caffe_bgr normalisation
        d = ((rgb[:, None] - self.palette[None, :, :, None, None]) ** 2).sum(2)
        logits = -d / 100.0
        if self.shift:
            s = self.shift
            logits = torch.cat([logits[..., :1].expand(-1, -1, -1, s), logits[..., :-s]], dim=-1)
        return logits


class ArrayDataset:
    """In-memory data set with the attributes ``deeplab.data`` data sets have."""

    ignore_index = 255

    def __init__(self, images, masks, class_names=NAMES, palette=PALETTE) -> None:
        self.images, self.masks = list(images), list(masks)
        self.class_names = tuple(class_names)
        self.num_classes = len(class_names)
        self.palette = palette
        self.ids = [f"img{i:02d}" for i in range(len(self.images))]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.masks[i]


def colour_dataset(sizes=((20, 28), (17, 33), (24, 24)), seed: int = 0) -> ArrayDataset:
    """Images painted with palette colours (blocks), masks = the colours' labels, some ignored."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for h, w in sizes:
        blocks = rng.integers(0, len(PALETTE), size=(h // 4 + 1, w // 4 + 1))
        mask = np.kron(blocks, np.ones((4, 4), dtype=np.int64))[:h, :w].astype(np.uint8)
        image = PALETTE[mask]
        mask = mask.copy()
        mask[rng.random((h, w)) < 0.05] = 255
        images.append(image)
        masks.append(mask)
    return ArrayDataset(images, masks)


def random_dataset(n: int = 3, num_classes: int = 4, seed: int = 0,
                   sizes=((40, 56), (48, 64), (33, 47))) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        # smooth-ish images so the CRF has edges to follow
        base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        image = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]
        mask = rng.integers(0, num_classes, size=(h, w)).astype(np.uint8)
        mask[:2] = 255
        images.append(np.ascontiguousarray(image))
        masks.append(mask)
    return ArrayDataset(images, masks, class_names=NAMES[:num_classes], palette=PALETTE[:num_classes])


def tiny_weights(path: Path, num_classes: int = 4, seed: int = 0) -> Path:
    """A seeded random ``deeplab_v2_resnet18`` saved with the project's metadata."""
    from deeplab.models import build_model
    from deeplab.weights import save_weights

    torch.manual_seed(seed)
    model = build_model("deeplab_v2_resnet18", num_classes=num_classes)
    # Larger classifier weights than the paper's N(0, 0.01) init: clear argmaxes, no near-ties.
    with torch.no_grad():
        for p in model.classifier_parameters():
            p.mul_(30.0)
    from deeplab.data.palettes import voc_palette

    names = [*NAMES, *(f"class{i}" for i in range(len(NAMES), num_classes))][:num_classes]
    palette = np.concatenate([PALETTE, voc_palette(max(num_classes, 4))[4:]])[:num_classes]
    save_weights(model, path, {
        "class_names": names,
        "palette": palette.tolist(),
        "normalization": CAFFE,
    })
    return path


def write_folder_dataset(root: Path, ds: ArrayDataset) -> Path:
    """Write ``ds`` in the ``folder`` data set layout (images/, masks/, classes.txt)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for sid, image, mask in zip(ds.ids, ds.images, ds.masks):
        Image.fromarray(image).save(root / "images" / f"{sid}.png")
        Image.fromarray(mask).save(root / "masks" / f"{sid}.png")
    lines = [f"{n} {r} {g} {b}" for n, (r, g, b) in zip(ds.class_names, ds.palette)]
    (root / "classes.txt").write_text("\n".join(lines) + "\n")
    return root


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_eval_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One process of the 2-process gloo evaluation test (module level: spawn pickles it)."""
    import json

    import torch.distributed as dist

    from deeplab.engine.evaluate import evaluate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ds = colour_dataset(sizes=((20, 28), (17, 33), (24, 24), (16, 20), (21, 19)), seed=3)
        r = evaluate(ColourOracle(shift=2).eval(), ds, normalization=CAFFE, optimize=False,
                     precision="fp32", keep_examples=2)
        ex = {k: [(e["id"], e["pred"].tolist()) for e in v] for k, v in r["examples"].items()}
        with open(Path(out_dir) / f"rank{rank}.json", "w") as f:
            json.dump({"cm": r["confusion_matrix"], "miou": r["miou"], "num_images": r["num_images"],
                       "per_image": r["per_image"], "examples": ex}, f)
    finally:
        dist.destroy_process_group()


def run_cli(argv: list[str]) -> int:
    """Run one subcommand the way ``deeplab.cli.main`` does, importing only its module.

    (``test_cli.py`` checks ``main`` and the full table; these tests exercise one command.)
    """
    import argparse
    import importlib

    from deeplab.cli import _COMMANDS

    name, rest = argv[0], argv[1:]
    module = importlib.import_module(_COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"deeplab {name}")
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(rest)) or 0)
