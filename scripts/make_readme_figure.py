#!/usr/bin/env python3
"""Draw the README's figure: CamVid val frames, the packaged default model's labels, the ground truth.

Each row is one val frame: the image, the image blended with the labels ``deeplab.segment``
gives with the packaged default model (``deeplab.weights.default_weights_path()``, no CRF, the
precision ``auto`` picks), and the image blended with the ground truth (void left unblended).
A strip under the grid names the class colours and states each row's mIoU over its frame's
classes. Regenerate it after the default model changes, so the picture stays true:

  python scripts/make_readme_figure.py --data-root ../shared/data/camvid_segnet

CamVid is CC BY-NC; the figure shows four of its frames, downscaled.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

_REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = _REPO / "docs" / "assets" / "camvid_val_overlays.jpg"
# Frames spread over the val sequence (0016E5, 101 frames): the first, the 25th, the 64th and the last.
DEFAULT_IDS = ("0016E5_07959", "0016E5_08007", "0016E5_08085", "0016E5_08159")


def _default_root() -> Path:
    data = os.environ.get("DEEPLAB_DATA", str(_REPO.parent / "shared" / "data"))
    return Path(data) / "camvid_segnet"


def _frame_miou(pred: np.ndarray, target: np.ndarray, num_classes: int) -> float:
    """Mean IoU over the classes in the frame's ground truth or prediction (void ignored)."""
    valid = target < num_classes
    ious = []
    for c in range(num_classes):
        p, t = (pred == c) & valid, target == c
        union = np.logical_or(p, t).sum()
        if union:
            ious.append(np.logical_and(p, t).sum() / union)
    return float(np.mean(ious)) if ious else float("nan")


def _text(draw, xy, text, font, fill=(255, 255, 255)):
    draw.text(xy, text, fill=fill, font=font)


def make_figure(data_root: Path, ids: list[str], tile_width: int = 320, quality: int = 82) -> tuple[bytes, list[float]]:
    """Return the JPEG bytes of the grid and each row's frame mIoU (0..1)."""
    from io import BytesIO

    from PIL import Image, ImageDraw, ImageFont

    import deeplab
    from deeplab.data import build_dataset
    from deeplab.engine.segment import overlay
    from deeplab.weights import default_weights_path, read_metadata

    meta = read_metadata(default_weights_path())
    names = list(meta["class_names"])
    palette = np.asarray(meta["palette"], dtype=np.uint8)
    dataset = build_dataset("camvid", data_root, "val")
    index = {sample_id: i for i, sample_id in enumerate(dataset.ids)}
    missing = [i for i in ids if i not in index]
    if missing:
        raise SystemExit(f"error: {missing} are not CamVid val ids under {data_root} (e.g. {dataset.ids[0]})")

    try:
        font = ImageFont.load_default(size=15)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    rows, scores = [], []
    for sample_id in ids:
        image, target = dataset[index[sample_id]]
        image, target = np.asarray(image), np.asarray(target)
        labels, _ = deeplab.segment(image)
        scores.append(_frame_miou(labels, target, len(names)))
        tiles = [image, overlay(image, labels, palette, legend=False, alpha=0.6),
                 overlay(image, target, palette, legend=False, alpha=0.6)]
        h = round(image.shape[0] * tile_width / image.shape[1])
        rows.append([Image.fromarray(t).resize((tile_width, h), Image.BILINEAR) for t in tiles])

    gap, header, tile_h = 4, 24, rows[0][0].height
    width = 3 * tile_width + 2 * gap
    legend_rows = 2
    legend_h = legend_rows * 22 + 8
    canvas = Image.new("RGB", (width, header + len(rows) * (tile_h + gap) + legend_h), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    for k, title in enumerate(("CamVid val image", "deeplab segment (default model)", "ground truth")):
        _text(draw, (k * (tile_width + gap) + 6, 4), title, font)
    for r, (row, score) in enumerate(zip(rows, scores)):
        y = header + r * (tile_h + gap)
        for k, tile in enumerate(row):
            canvas.paste(tile, (k * (tile_width + gap), y))
        label = f"{ids[r]}  frame mIoU {100 * score:.1f}"
        draw.rectangle([0, y, draw.textlength(label, font=font) + 10, y + 20], fill=(0, 0, 0))
        _text(draw, (5, y + 2), label, font)
    y0 = header + len(rows) * (tile_h + gap) + 4
    per_row = (len(names) + legend_rows - 1) // legend_rows
    step = width // per_row
    for c, name in enumerate(names):
        x, y = (c % per_row) * step + 6, y0 + (c // per_row) * 22
        draw.rectangle([x, y + 2, x + 14, y + 16], fill=tuple(int(v) for v in palette[c]), outline=(255, 255, 255))
        _text(draw, (x + 20, y), name, font)
    # The weights' hash goes into the file, so a test can tell when the default model changed
    # and the picture no longer shows it.
    from deeplab.fileio import sha256_file

    comment = f"deeplab scripts/make_readme_figure.py: weights sha256 {sha256_file(default_weights_path())}"
    buf = BytesIO()
    canvas.save(buf, format="JPEG", quality=quality, optimize=True, comment=comment.encode())
    return buf.getvalue(), scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=_default_root(),
                        help="the SegNet CamVid folder (default: $DEEPLAB_DATA/camvid_segnet or ../shared/data/...)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JPEG to write")
    parser.add_argument("--ids", default=",".join(DEFAULT_IDS), help="comma-separated CamVid val ids, one per row")
    parser.add_argument("--tile-width", type=int, default=320, help="width of each tile in pixels")
    args = parser.parse_args(argv)

    from deeplab.fileio import atomic_open

    data, scores = make_figure(args.data_root, [i for i in args.ids.split(",") if i], args.tile_width)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(args.out) as fh:
        fh.write(data)
    print(f"wrote {args.out} ({len(data) / 1024:.0f} KiB); frame mIoU: "
          + ", ".join(f"{100 * s:.1f}" for s in scores))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
