"""A self-contained HTML evaluation report (``deeplab eval --report DIR``).

One ``index.html`` with every image embedded as base64 PNG: the summary metrics and settings,
per-class IoU as a bar chart, the row-normalised confusion matrix as a heat map, and the best
and worst images (image, prediction overlay, ground-truth overlay side by side). Charts use
matplotlib (the optional ``report`` extra: ``pip install deeplab[report]``); without it the
page shows the same numbers as coloured HTML tables and says so.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_report", "render_report"]

_MAX_WIDTH = 480  # example images are shown at most this wide


def _png_b64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img_tag(image: np.ndarray, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{_png_b64(image)}">'


def _shrink(image: np.ndarray, nearest: bool = False) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    if w <= _MAX_WIDTH:
        return image
    size = (_MAX_WIDTH, max(1, round(h * _MAX_WIDTH / w)))
    pil = Image.fromarray(image)
    return np.asarray(pil.resize(size, Image.NEAREST if nearest else Image.BILINEAR))


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure_png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _bar_chart(names: Sequence[str], iou: Sequence[float], palette: np.ndarray) -> str:
    # Figure + Agg canvas instead of pyplot: no global backend switch, no window, thread-safe.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 0.45 * len(names) + 2), 3.6))
    ax = fig.add_subplot()
    vals = [0.0 if math.isnan(v) else 100 * v for v in iou]
    colours = [tuple(c / 255 for c in palette[i]) for i in range(len(names))]
    bars = ax.bar(range(len(names)), vals, color=colours, edgecolor="black", linewidth=0.5)
    for b, v in zip(bars, iou):
        label = "n/a" if math.isnan(v) else f"{100 * v:.1f}"
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 1, label, ha="center", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("IoU %")
    ax.set_title("per-class IoU")
    return f'<img alt="per-class IoU" src="data:image/png;base64,{_figure_png(fig)}">'


def _heat_map(names: Sequence[str], norm: np.ndarray) -> str:
    from matplotlib.figure import Figure

    n = len(names)
    side = max(4.0, 0.45 * n + 2)
    fig = Figure(figsize=(side + 1, side))
    ax = fig.add_subplot()
    im = ax.imshow(norm * 100, cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion matrix (% of each ground-truth row)")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                v = norm[i, j] * 100
                if v >= 0.5:
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 60 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return f'<img alt="confusion matrix" src="data:image/png;base64,{_figure_png(fig)}">'


def _bar_table(names: Sequence[str], iou: Sequence[float], palette: np.ndarray) -> str:
    rows = []
    for i, (name, v) in enumerate(zip(names, iou)):
        pct = 0.0 if math.isnan(v) else 100 * v
        label = "n/a" if math.isnan(v) else f"{pct:.1f}"
        r, g, b = (int(c) for c in palette[i])
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td class=num>{label}</td><td style='width:300px'>"
            f"<div style='background:rgb({r},{g},{b});width:{pct:.1f}%;height:12px;"
            f"border:1px solid #333'></div></td></tr>"
        )
    return "<table><tr><th>class</th><th>IoU %</th><th></th></tr>" + "".join(rows) + "</table>"


def _heat_table(names: Sequence[str], norm: np.ndarray) -> str:
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for i, name in enumerate(names):
        cells = []
        for j in range(len(names)):
            v = norm[i, j]
            shade = int(255 - 200 * v)
            cells.append(f"<td class=num style='background:rgb({shade},{shade},255)'>{100 * v:.0f}</td>")
        rows.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    return (f"<table><tr><th>gt \\ pred</th>{head}</tr>{''.join(rows)}</table>")


def _examples(kind: str, examples: list[dict], dataset: Any, palette: np.ndarray,
              names: Sequence[str]) -> str:
    from deeplab.engine.segment import overlay

    if not examples:
        return ""
    parts = [f"<h2>{kind} images</h2>"]
    for ex in examples:
        image, mask = dataset[ex["index"]]
        image = np.asarray(image)
        mask = np.asarray(mask)
        pred = overlay(image, ex["pred"], palette, names)
        gt = overlay(image, mask, palette, names)
        parts.append(
            f"<div class=ex><p><b>{html.escape(str(ex['id']))}</b>: mIoU {100 * ex['miou']:.1f}%</p>"
            f"<figure>{_img_tag(_shrink(image), 'image')}<figcaption>image</figcaption></figure>"
            f"<figure>{_img_tag(_shrink(pred), 'prediction')}<figcaption>prediction</figcaption></figure>"
            f"<figure>{_img_tag(_shrink(gt), 'ground truth')}<figcaption>ground truth</figcaption></figure>"
            "</div>"
        )
    return "".join(parts)


_CSS = """
body{font-family:sans-serif;margin:2em;max-width:1600px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px}
.num{text-align:right;font-variant-numeric:tabular-nums}
.notice{background:#fff3cd;border:1px solid #e0c060;padding:.5em 1em}
figure{display:inline-block;margin:0 8px 8px 0}figcaption{text-align:center;font-size:small}
.ex{border-top:1px solid #ddd;padding-top:.5em}img{max-width:100%}
"""


def render_report(
    result: dict,
    *,
    dataset: Any,
    class_names: Sequence[str],
    palette: np.ndarray,
    settings: dict | None = None,
    use_matplotlib: bool | None = None,
) -> str:
    """The report's HTML as a string (see :func:`write_report` for the arguments)."""
    names = list(class_names)
    palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    mat = np.asarray(result["confusion_matrix"], dtype=np.float64)
    rows = mat.sum(axis=1, keepdims=True)
    norm = np.divide(mat, rows, out=np.zeros_like(mat), where=rows > 0)
    if use_matplotlib is None:
        use_matplotlib = _have_matplotlib()
    body = ["<h1>DeepLab evaluation report</h1>"]
    summary = "".join(
        f"<tr><th>{label}</th><td class=num>{100 * result[key]:.2f}</td></tr>"
        for key, label in (("miou", "mIoU %"), ("pixel_acc", "pixel accuracy %"),
                           ("mean_acc", "mean class accuracy %"), ("fwiou", "FWIoU %"))
    )
    summary += f"<tr><th>images</th><td class=num>{result['num_images']}</td></tr>"
    body.append(f"<table>{summary}</table>")
    if settings:
        body.append("<details><summary>settings</summary><table>" + "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in settings.items()) + "</table></details>")
    if use_matplotlib:
        body.append("<h2>per-class IoU</h2>" + _bar_chart(names, result["per_class_iou"], palette))
        body.append("<h2>confusion matrix</h2>" + _heat_map(names, norm))
    else:
        body.append("<p class=notice>matplotlib is not installed, so the charts are shown as "
                    "tables: <code>pip install 'deeplab[report]'</code> for plots.</p>")
        body.append("<h2>per-class IoU</h2>" + _bar_table(names, result["per_class_iou"], palette))
        body.append("<h2>confusion matrix (% of each ground-truth row)</h2>" + _heat_table(names, norm))
    examples = result.get("examples") or {}
    body.append(_examples("Worst", examples.get("worst", []), dataset, palette, names))
    body.append(_examples("Best", examples.get("best", []), dataset, palette, names))
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>DeepLab evaluation</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(
    out_dir: str | os.PathLike,
    result: dict,
    *,
    dataset: Any,
    class_names: Sequence[str],
    palette: np.ndarray,
    settings: dict | None = None,
    use_matplotlib: bool | None = None,
) -> Path:
    """Write ``out_dir/index.html`` (atomically) and return its path.

    Args:
        out_dir: folder for the page (created).
        result: :func:`deeplab.engine.evaluate.evaluate`'s dict, ideally with ``keep_examples``.
        dataset: the evaluated data set (examples are re-read from it by index).
        class_names: one name per class.
        palette: uint8 (C,3) class colours.
        settings: shown in a collapsible table.
        use_matplotlib: force the charts on/off (None: on when matplotlib is installed).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = render_report(result, dataset=dataset, class_names=class_names, palette=palette,
                         settings=settings, use_matplotlib=use_matplotlib)
    from deeplab.fileio import atomic_open

    path = out / "index.html"
    with atomic_open(path, "w") as f:
        f.write(page)
    return path
