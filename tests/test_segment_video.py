"""`deeplab segment` on videos and collections: a short clip made here from CamVid val frames,
truncated and bad files, rotation metadata, temporal smoothing, two torchrun processes against
one, --skip-existing and --summary."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _evaluation_helpers import NAMES, PALETTE, tiny_weights
from _evaluation_helpers import run_cli as main

av = pytest.importorskip("av", reason="PyAV is in the dev extra: pip install -e '.[dev]'")

_REPO = Path(__file__).resolve().parents[1]
SIZE = (240, 180)  # CamVid's 480x360 halved: even sides for H.264 4:2:0
RATE = 15


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return tiny_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors")


@pytest.fixture(scope="module")
def camvid_frames(camvid_root) -> list[np.ndarray]:
    """8 consecutive CamVid val frames, halved."""
    files = sorted((camvid_root / "val").glob("*.png"))[:8]
    assert len(files) == 8
    return [np.asarray(Image.open(f).convert("RGB").resize(SIZE, Image.BILINEAR)) for f in files]


def _write_clip(path: Path, frames: list[np.ndarray], rotation: int | None = None) -> Path:
    # faststart: the index before the data, so that a truncated copy still opens (and fails
    # part way through decoding, as a download cut short does).
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=RATE)
        s.width, s.height = frames[0].shape[1], frames[0].shape[0]
        s.pix_fmt = "yuv420p"
        if rotation is not None:
            s.set_display_rotation(rotation)
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory, camvid_frames) -> Path:
    return _write_clip(tmp_path_factory.mktemp("clip") / "drive.mp4", camvid_frames)


def _decode(path: Path) -> list[np.ndarray]:
    """Every frame as PyAV hands it out (the reference: no rotation, no deeplab code)."""
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _probe(path: Path) -> tuple[int, int, int, Fraction, str]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        return n, s.width, s.height, s.average_rate, s.codec_context.name


def _labels(png: Path) -> np.ndarray:
    with Image.open(png) as im:
        assert im.mode == "P"
        return np.asarray(im)


def _table(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _frames_as_pngs(frames: list[np.ndarray], folder: Path) -> Path:
    folder.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:06d}.png")
    return folder


def test_video_outputs_equal_segment_on_the_decoded_frames(tmp_path, weights, clip, capsys):
    out = tmp_path / "out"
    rc = main(["segment", str(clip), "--out", str(out), "--weights", str(weights), "--save-frames",
               "--batch", "3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "8/8" in captured.err and "frames/s" in captured.out
    # The overlay: H.264, the clip's size, rate and frame count.
    assert _probe(out / "drive_overlay.mp4") == (8, *SIZE, RATE, "h264")
    # The label maps equal `deeplab segment` on the frames PyAV decodes (batched alike: 3, 3, 2).
    decoded = _decode(clip)
    ref = tmp_path / "ref"
    assert main(["segment", str(_frames_as_pngs(decoded, tmp_path / "frames")), "--out", str(ref),
                 "--weights", str(weights), "--batch", "3"]) == 0
    saved = sorted(p.name for p in (out / "drive").iterdir())
    assert saved == [f"{i:06d}.png" for i in range(8)]
    labels = [_labels(out / "drive" / name) for name in saved]
    for name, lab in zip(saved, labels):
        assert np.array_equal(lab, _labels(ref / name)), name
    assert len(np.unique(labels[0])) > 1  # a constant map would make the comparison weak
    # The CSV: one row per frame, its time, and the class shares of its label map.
    header, rows = _table(out / "drive_classes.csv")
    assert header == ["frame", "time_s", *NAMES]
    assert [int(r[0]) for r in rows] == list(range(8))
    assert [float(r[1]) for r in rows] == pytest.approx([i / RATE for i in range(8)], abs=1e-6)
    for r, lab in zip(rows, labels):
        expected = np.bincount(lab.ravel(), minlength=len(NAMES)) / lab.size
        assert [float(v) for v in r[2:]] == pytest.approx(expected, abs=1e-6)
    # The overlay's frame k is frame k blended with its labels (below the legend; H.264 is lossy).
    overlay_frames = _decode(out / "drive_overlay.mp4")
    for k in (0, 7):
        blend = 0.5 * decoded[k].astype(np.float32) + 0.5 * PALETTE[labels[k]].astype(np.float32)
        err = np.abs(overlay_frames[k][100:].astype(np.float32) - blend[100:]).mean()
        other = np.abs(overlay_frames[k][100:].astype(np.float32) - decoded[k][100:]).mean()
        assert err < 4 < other, (k, err, other)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_every_nth_frame_mixed_with_an_image_and_the_summary(tmp_path, weights, clip, camvid_frames, capsys):
    image = tmp_path / "still.png"
    Image.fromarray(camvid_frames[0]).save(image)
    out = tmp_path / "out"
    rc = main(["segment", str(clip), str(image), "--out", str(out), "--weights", str(weights),
               "--every", "3", "--summary", str(tmp_path / "summary.csv")])
    assert rc == 0, capsys.readouterr().err
    assert _probe(out / "drive_overlay.mp4") == (3, *SIZE, RATE / 3, "h264")  # frames 0, 3, 6
    _, rows = _table(out / "drive_classes.csv")
    assert [int(r[0]) for r in rows] == [0, 3, 6]
    assert [float(r[1]) for r in rows] == pytest.approx([0, 3 / RATE, 6 / RATE], abs=1e-6)
    header, summary = _table(tmp_path / "summary.csv")
    assert header == ["path", "kind", "status", "width", "height", "frames", "seconds", *NAMES]
    assert [r[:6] for r in summary] == [[str(clip), "video", "segmented", "240", "180", "3"],
                                        [str(image), "image", "segmented", "240", "180", "1"]]
    lab = _labels(out / "still.png")
    assert [float(v) for v in summary[1][7:]] == pytest.approx(
        np.bincount(lab.ravel(), minlength=len(NAMES)) / lab.size, abs=1e-6)
    per_frame = np.array([[float(v) for v in r[2:]] for r in rows])
    assert [float(v) for v in summary[0][7:]] == pytest.approx(per_frame.mean(0), abs=1e-5)
    assert all(float(r[6]) > 0 for r in summary)


def test_truncated_video_keeps_the_frames_before_the_damage(tmp_path, weights, clip, capsys):
    full = tmp_path / "full"
    assert main(["segment", str(clip), "--out", str(full), "--weights", str(weights), "--save-frames"]) == 0
    data = clip.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.85)])
    kept = len(_decode_until_error(cut))
    assert 1 <= kept < 8
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["segment", str(cut), "--out", str(out), "--weights", str(weights), "--save-frames"])
    err = capsys.readouterr().err
    assert rc == 1
    assert str(cut) in err and f"frame {kept}" in err and "Traceback" not in err
    n, *_ = _probe(out / "cut_overlay.mp4")
    assert n == kept
    _, rows = _table(out / "cut_classes.csv")
    assert len(rows) == kept
    for i in range(kept):  # the same frames as the whole file's
        assert np.array_equal(_labels(out / "cut" / f"{i:06d}.png"), _labels(full / "drive" / f"{i:06d}.png"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def _decode_until_error(path: Path) -> list[np.ndarray]:
    frames = []
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        try:
            for f in c.decode(s):
                frames.append(f)
        except av.error.FFmpegError:
            frames.extend(s.codec_context.decode(None))  # what the decoder still held
    return frames


def test_files_without_a_video_stream_and_unknown_containers(tmp_path, weights, camvid_frames, capsys):
    audio = tmp_path / "voice.m4a"
    with av.open(str(audio), "w") as c:
        s = c.add_stream("aac", rate=16000)
        for i in range(4):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, i * 1024
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video " * 50)
    image = tmp_path / "still.png"
    Image.fromarray(camvid_frames[0]).save(image)
    out = tmp_path / "out"
    rc = main(["segment", str(audio), str(junk), str(image), "--out", str(out), "--weights", str(weights)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert f"{audio}: holds no video stream" in err
    assert f"{junk}: not a video FFmpeg can read" in err
    assert (out / "still.png").is_file()  # the other inputs still done
    assert not list(out.glob("voice*")) and not list(out.glob("junk*"))


def test_without_pyav_a_video_is_a_clear_error(tmp_path, weights, clip, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    rc = main(["segment", str(clip), "--out", str(tmp_path / "o"), "--weights", str(weights)])
    err = capsys.readouterr().err
    assert rc == 2 and str(clip) in err and "pip install 'deeplab[video]'" in err


@pytest.mark.skipif(not hasattr(av.video.stream.VideoStream, "set_display_rotation"),
                    reason="this PyAV cannot write rotation metadata")
def test_rotation_metadata_is_honoured(tmp_path, weights, camvid_frames):
    # A phone held upright stores landscape frames and a display rotation of -90 degrees
    # (counterclockwise: turn them 90 degrees clockwise to show them).
    clip = _write_clip(tmp_path / "phone.mp4", camvid_frames[:3], rotation=-90)
    out = tmp_path / "out"
    assert main(["segment", str(clip), "--out", str(out), "--weights", str(weights), "--save-frames"]) == 0
    assert _probe(out / "phone_overlay.mp4")[:3] == (3, SIZE[1], SIZE[0])
    upright = [np.ascontiguousarray(np.rot90(f, k=-1)) for f in _decode(clip)]
    ref = tmp_path / "ref"
    assert main(["segment", str(_frames_as_pngs(upright, tmp_path / "frames")), "--out", str(ref),
                 "--weights", str(weights)]) == 0
    for i in range(3):
        lab = _labels(out / "phone" / f"{i:06d}.png")
        assert lab.shape == (SIZE[0], SIZE[1])
        assert np.array_equal(lab, _labels(ref / f"{i:06d}.png"))


def test_temporal_ema_averages_the_probabilities_of_earlier_frames(tmp_path, weights, clip):
    import torch
    import torch.nn.functional as F

    from deeplab.engine.inference import model_align_corners, predict_logits
    from deeplab.engine.segment import load_bundle

    w = 0.7
    out = tmp_path / "out"
    assert main(["segment", str(clip), "--out", str(out), "--weights", str(weights), "--save-frames",
                 "--temporal-ema", str(w), "--every", "2"]) == 0
    bundle = load_bundle(weights)
    frames = _decode(clip)[::2]
    # p_t = w p_(t-1) + (1 - w) softmax(logits_t), in float64 and as logs (log p_t, a logsumexp):
    # the random network's logits span thousands, where every probability but one underflows.
    state, expected = None, []
    for f in frames:
        logp = torch.log_softmax(predict_logits(bundle.model, f, normalization=bundle.normalization,
                                                precision=bundle.precision).double(), dim=1)
        state = logp if state is None else torch.logsumexp(
            torch.stack([state + np.log(w), logp + np.log(1 - w)]), dim=0)
        up = F.interpolate(state, size=f.shape[:2], mode="bilinear",
                           align_corners=model_align_corners(bundle.model))
        expected.append(up[0].argmax(0).numpy())
    plain = tmp_path / "plain"
    assert main(["segment", str(clip), "--out", str(plain), "--weights", str(weights), "--save-frames",
                 "--every", "2"]) == 0
    differ = 0
    for k, lab in enumerate(expected):
        got = _labels(out / "drive" / f"{2 * k:06d}.png")
        assert (got != lab).mean() < 1e-3, k  # float32 against float64: near-ties only
        differ += int((got != _labels(plain / "drive" / f"{2 * k:06d}.png")).sum())
    assert np.array_equal(expected[0], _labels(plain / "drive" / "000000.png"))  # nothing to average yet
    assert differ > 0  # the smoothing changed later frames


def _cli(args: list[str], torchrun: int = 0) -> subprocess.CompletedProcess:
    # One thread in every process, the single one included: the same arithmetic everywhere.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun else []
    cmd = [sys.executable, *launcher, "-m", "deeplab.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=_REPO)


def test_two_processes_equal_one_and_skip_existing_redoes_nothing(tmp_path, weights, clip, camvid_frames,
                                                                  capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i, f in enumerate(camvid_frames[:5]):
        Image.fromarray(f).save(inputs / f"img{i}.png")
    (inputs / "drive.mp4").write_bytes(clip.read_bytes())
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--weights", str(weights), "--save-frames", "--every", "4"]
    res = _cli(["segment", str(inputs), "--out", str(one), *common, "--summary", str(tmp_path / "one.csv")])
    assert res.returncode == 0, res.stderr[-3000:]
    res = _cli(["segment", str(inputs), "--out", str(two), *common, "--summary", str(tmp_path / "two.csv")],
               torchrun=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "2 processes" in res.stdout
    # each input done once: the totals are those of one process, not twice them
    assert "segmented 5 image(s)" in res.stdout and "segmented 1 video(s), 2 frame(s)" in res.stdout
    # The same files, and the same label maps, overlays and per-frame tables.
    files = sorted(str(p.relative_to(one)) for p in one.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file())
    assert len(files) == 5 * 2 + 2 + 2  # per image: label map, overlay; the video: mp4, csv, 2 frames
    for name in files:
        if not name.endswith(".mp4"):
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert _probe(two / "drive_overlay.mp4") == _probe(one / "drive_overlay.mp4")
    # One summary row per input, in input order, whichever process did it.
    h1, rows1 = _table(tmp_path / "one.csv")
    h2, rows2 = _table(tmp_path / "two.csv")
    assert h1 == h2 and len(rows2) == 6
    assert [r[:6] + r[7:] for r in rows1] == [r[:6] + r[7:] for r in rows2]  # all but the seconds
    assert [r[0] for r in rows2] == [str(inputs / n) for n in ("drive.mp4", *(f"img{i}.png" for i in range(5)))]

    # Resume: only the input whose outputs are incomplete is redone.
    (two / "img3_overlay.jpg").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in two.rglob("*") if p.is_file() and p.name != "img3.png"}
    capsys.readouterr()
    assert main(["segment", str(inputs), "--out", str(two), *common, "--skip-existing",
                 "--summary", str(tmp_path / "again.csv")]) == 0
    printed = capsys.readouterr().out
    assert "segmented 1 image(s)" in printed and "skipped 5 input(s)" in printed
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()), "an existing output was rewritten"
    assert (two / "img3_overlay.jpg").is_file()
    _, again = _table(tmp_path / "again.csv")
    assert [r[2] for r in again] == ["existing"] * 4 + ["segmented", "existing"]
    for a, b in zip(again, rows1):  # the shares of the reused outputs are read back from them
        if a[2] == "existing":
            assert a[3:6] == b[3:6] and a[6] == ""
            assert [float(v) for v in a[7:]] == pytest.approx([float(v) for v in b[7:]], abs=2e-6)


def test_image_progress_bar_ends_at_n_of_n(tmp_path, weights, camvid_frames, capsys):
    for i in range(3):
        Image.fromarray(camvid_frames[i][:64, :96]).save(tmp_path / f"{i}.png")
    assert main(["segment", str(tmp_path), "--out", str(tmp_path / "o"), "--weights", str(weights)]) == 0
    assert "3/3" in capsys.readouterr().err
