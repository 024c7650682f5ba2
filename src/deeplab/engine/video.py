"""Segmenting videos: decoding with PyAV, the network frame by frame, an H.264 overlay video.

:func:`segment_video` runs a :class:`~deeplab.engine.segment.ModelBundle` on the frames of one
video file and writes, into an output folder:

- ``<stem>_overlay.mp4``: H.264, the frames blended with the class colours and a legend, at the
  stream's frame rate (divided by ``every``), its size (after the rotation metadata) and one
  frame per segmented frame;
- ``<stem>_classes.csv``: a header ``frame,time_s,<class names...>``, then one row per segmented
  frame: its index in the stream, its timestamp in seconds from the stream's start and the share
  of the frame's pixels given to every class;
- with ``save_frames``, ``<stem>/NNNNNN.png``: the label map of every segmented frame as a
  palette PNG, numbered by the frame's index in the stream (from 0).

Choices made here:

- **Decoding** is PyAV's (FFmpeg in its wheel: any container and codec FFmpeg reads); audio and
  other streams are not even demuxed. The decoder runs without frame threading: with it, FFmpeg
  drops a damaged packet without an error, and a truncated file would end early in silence.
- **Rotation metadata** (the display matrix phones write) is applied to the frames before the
  network sees them, as a player shows them; the outputs have the displayed size.
- **Bad input**: a file that does not open, has no video stream or yields no frame raises
  :class:`VideoReadError`. Decoding that fails part way (a truncated or damaged file) keeps every
  frame decoded before the failure, including those still buffered in the decoder, finishes the
  outputs with them and reports the failing frame in :attr:`VideoResult.error`. A stream that
  ends silently short of the frame count (or the duration) its container declares counts as
  truncated too.
- **Atomic outputs**: the overlay video and the CSV are written under temporary names and renamed
  when complete, so a killed run leaves no half file under a final name; each label PNG is
  written atomically on its own.
- **Temporal smoothing** (off by default): an exponential moving average of the network's
  probabilities at its output resolution over the segmented frames,
  ``p_t = w * p_(t-1) + (1 - w) * softmax(logits_t)``; its log is upsampled as the logits are
  (kept as a log throughout, so that confident probabilities do not underflow to 0).
  It is causal (a frame never sees later frames) and restarts if the frame size changes.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deeplab.engine.inference import DEFAULT_MAX_PIXELS, finish_prediction, model_align_corners, predict_logits
from deeplab.engine.outputs import video_output_names
from deeplab.engine.segment import ModelBundle, class_pixels, overlay
from deeplab.fileio import atomic_open, atomic_path

__all__ = [
    "DecodedFrame",
    "VideoDecodeError",
    "VideoReadError",
    "VideoReader",
    "VideoResult",
    "import_av",
    "segment_video",
    "video_output_names",
]

# Encoders tried in order for the overlay video (PyAV's wheels ship libx264).
_H264_ENCODERS = ("libx264", "libopenh264", "h264")


class VideoReadError(ValueError):
    """A video file could not be read as asked; the message names the file."""


class VideoDecodeError(VideoReadError):
    """Decoding stopped part way; ``frame`` is the index of the first frame not decoded and
    ``reason`` FFmpeg's (or this module's) word for it."""

    def __init__(self, message: str, frame: int, reason: str) -> None:
        super().__init__(message)
        self.frame = frame
        self.reason = reason


def import_av() -> Any:
    """Import PyAV, or raise an ``ImportError`` that says how to install it."""
    try:
        import av
    except ImportError as e:
        raise ImportError(
            "reading videos needs PyAV, which is not installed: pip install 'deeplab[video]' "
            "(or pip install av)"
        ) from e
    return av


@dataclass(frozen=True)
class DecodedFrame:
    """One decoded frame: its ``index`` in the stream (from 0), ``time_s`` from the stream's
    start and ``rgb``, uint8 (H,W,3) with the rotation metadata applied."""

    index: int
    time_s: float
    rgb: np.ndarray


class VideoReader:
    """The first video stream of a file, decoded frame by frame to RGB (a context manager).

    Attributes:
        path: the file.
        width / height: the displayed frame size (after the rotation metadata).
        rate: the stream's average frame rate (frames per second), None when unknown.
        declared_frames: the frame count the container declares (0: unknown).
        duration_s: the stream's duration in seconds, None when unknown.
        rotation: degrees the frames are turned counterclockwise to display (0, 90, 180, 270).
        codec: the decoder's name.

    Raises:
        VideoReadError: the file is missing, not a container FFmpeg reads, or has no video stream.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        av = import_av()
        self.path = Path(path)
        if not self.path.is_file():
            raise VideoReadError(f"{self.path}: file not found")
        try:
            self._container = av.open(str(self.path), "r")
        except av.error.FFmpegError as e:
            raise VideoReadError(
                f"{self.path}: not a video FFmpeg can read ({_reason(e)}): the file is corrupt, "
                "truncated before its index, or in an unknown container"
            ) from None
        streams = self._container.streams.video
        if not streams:
            kinds = sorted({s.type for s in self._container.streams}) or ["none"]
            self._container.close()
            raise VideoReadError(
                f"{self.path}: holds no video stream (streams: {', '.join(kinds)}): give a video file"
            )
        self._stream = stream = streams[0]
        self.codec = stream.codec_context.name
        self.rate = _fraction(stream.average_rate) or _fraction(stream.guessed_rate)
        self.declared_frames = int(stream.frames or 0)
        self._time_base = tb = _fraction(stream.time_base)
        self._start = stream.start_time
        # The container's duration covers every stream: the video's only when it is alone (an
        # estimate for the progress bar otherwise).
        whole = self._container.duration / 1_000_000 if self._container.duration is not None else None
        if stream.duration is not None and tb is not None:
            self.duration_s: float | None = float(stream.duration * tb)
        elif len(self._container.streams) == 1:
            self.duration_s = whole
        else:
            self.duration_s = None
        self._estimated_s = self.duration_s or whole
        self.rotation = 0
        self.width, self.height = stream.codec_context.width, stream.codec_context.height
        self.sample_aspect_ratio = _fraction(stream.sample_aspect_ratio)
        self._first: Any = None
        self._opened_frames: Iterator[Any] | None = None
        self._peek()

    # -- context manager
    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    @property
    def expected_frames(self) -> int | None:
        """The declared frame count, else an estimate from the duration and rate (None: unknown)."""
        if self.declared_frames:
            return self.declared_frames
        if self._estimated_s and self.rate:
            return max(1, round(self._estimated_s * float(self.rate)))
        return None

    def _peek(self) -> None:
        # Decode the first frame now: its size and rotation are the outputs', and a file that
        # yields no frame at all is an error before any output is opened.
        self._opened_frames = self._raw_frames()
        try:
            self._first = next(self._opened_frames)
        except StopIteration:
            self.close()
            raise VideoReadError(f"{self.path}: no frame could be decoded from its video stream") from None
        except VideoDecodeError as e:
            self.close()
            raise VideoReadError(f"{self.path}: no frame could be decoded ({e.reason})") from None
        self.rotation = _quarter_turns(getattr(self._first, "rotation", 0) or 0) * 90
        if self.rotation in (90, 270):
            self.width, self.height = self._first.height, self._first.width
        else:
            self.width, self.height = self._first.width, self._first.height

    def _raw_frames(self) -> Iterator[Any]:
        av = import_av()
        stream = self._stream
        decoded = 0
        try:
            for packet in self._container.demux(stream):
                for frame in packet.decode():
                    decoded += 1
                    yield frame
        except av.error.FFmpegError as e:
            failure = _reason(e)
        else:
            failure = None
        if failure is not None:
            # Frames already sent to the decoder (B-frame reordering) are still good.
            try:
                for frame in stream.codec_context.decode(None):
                    decoded += 1
                    yield frame
            except av.error.FFmpegError:
                pass
            raise VideoDecodeError(
                f"{self.path}: decoding failed at frame {decoded} ({failure}): the file is truncated "
                f"or damaged; kept the {decoded} frame(s) decoded before it", frame=decoded, reason=failure)
        short = self._silently_short(decoded)
        if short:
            raise VideoDecodeError(f"{self.path}: {short}; kept the {decoded} frame(s) decoded", frame=decoded,
                                   reason=short)

    def _silently_short(self, decoded: int) -> str | None:
        # A few frames less than declared can be an edit list; a truncated file ends short of
        # the declared duration too.
        interval = 1 / float(self.rate) if self.rate else 0.0
        ends = decoded * interval
        if self.duration_s is not None and self.rate and ends + 2 * interval >= self.duration_s:
            return None
        if self.declared_frames and decoded < self.declared_frames:
            return (f"the stream ended at frame {decoded} of the {self.declared_frames} its container "
                    "declares: the file is truncated")
        if self.duration_s is not None and self.rate and not self.declared_frames:
            return (f"the stream ended at frame {decoded} ({ends:.2f} s) of a declared duration of "
                    f"{self.duration_s:.2f} s: the file is truncated")
        return None

    def frames(self) -> Iterator[DecodedFrame]:
        """Every frame in stream order, rotated for display.

        Raises:
            VideoDecodeError: decoding failed part way (after yielding every frame before it).
        """
        if self._opened_frames is None:
            raise RuntimeError("frames() can be iterated once")
        raw, self._opened_frames = self._opened_frames, None
        first, self._first = self._first, None
        index = 0
        for frame in _chain_one(first, raw):
            rgb = frame.to_ndarray(format="rgb24")
            turns = _quarter_turns(getattr(frame, "rotation", 0) or 0)
            if turns:
                rgb = np.rot90(rgb, k=turns)
            yield DecodedFrame(index, self._time_of(frame, index), np.ascontiguousarray(rgb))
            index += 1

    def _time_of(self, frame: Any, index: int) -> float:
        # Frames flushed out of the decoder may come without a time base: the stream's.
        tb = _fraction(frame.time_base) or self._time_base
        if frame.pts is not None and tb is not None:
            start = self._start if self._start is not None else 0
            return float((frame.pts - start) * tb)
        return index / float(self.rate) if self.rate else float("nan")


def _chain_one(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _fraction(value: Any) -> Fraction | None:
    """A PyAV rational as a ``Fraction``; None when unset (None, or 0/1 in newer PyAV)."""
    if value is None:
        return None
    value = Fraction(int(value.numerator), int(value.denominator)) if value.denominator else Fraction(0)
    return value or None


def _quarter_turns(degrees: float) -> int:
    """Counterclockwise quarter turns for a display rotation (rounded to the nearest 90)."""
    return int(round(float(degrees) / 90.0)) % 4


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e)


def _h264_encoder() -> str:
    av = import_av()
    for name in _H264_ENCODERS:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - PyAV raises different errors for an absent encoder
            continue
    raise VideoReadError("this FFmpeg (PyAV) has no H.264 encoder: install PyAV from its wheels (pip install av)")


class _OverlayWriter:
    """H.264 in MP4 at a constant ``rate``, written to ``path`` (a temporary name)."""

    def __init__(self, path: Path, width: int, height: int, rate: Fraction,
                 sample_aspect_ratio: Fraction | None = None) -> None:
        av = import_av()
        self._container = av.open(str(path), "w", format="mp4")
        self._stream = self._container.add_stream(_h264_encoder(), rate=rate)
        self._stream.width, self._stream.height = width, height
        # 4:2:0 halves the chroma planes: an odd size needs 4:4:4 (H.264 High 4:4:4).
        self._stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        if sample_aspect_ratio:
            self._stream.codec_context.sample_aspect_ratio = sample_aspect_ratio
        self._rate = rate
        self.count = 0

    def write(self, rgb: np.ndarray) -> None:
        av = import_av()
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = self.count
        frame.time_base = 1 / self._rate
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.count += 1

    def close(self) -> None:
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        finally:
            self._container.close()


@dataclass
class VideoResult:
    """What :func:`segment_video` did.

    Attributes:
        path: the input file.
        frames: frames segmented (every ``every``-th decoded frame).
        decoded: frames decoded.
        width / height: the frame size (as displayed).
        rate: the overlay video's frame rate.
        class_pixels: int64 (C,) pixels given to each class over all segmented frames.
        seconds: wall time of the whole video.
        timings: seconds spent in ``decode`` (incl. RGB conversion and rotation), ``network``
            (the forward passes), ``labels`` (upsampling, argmax, CRF, smoothing), ``overlay``
            (drawing), ``encode`` (H.264) and ``write`` (label PNGs and the CSV).
        outputs: the files written.
        error: None, or why decoding stopped early (the outputs hold the frames before it).
    """

    path: Path
    frames: int
    decoded: int
    width: int
    height: int
    rate: Fraction
    class_pixels: np.ndarray
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    outputs: list[Path] = field(default_factory=list)
    error: str | None = None

    @property
    def shares(self) -> np.ndarray:
        """float64 (C,) share of each class over all segmented frames."""
        total = self.class_pixels.sum()
        return self.class_pixels / total if total else self.class_pixels.astype(np.float64)


def _frame_times(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"


def segment_video(
    bundle: ModelBundle,
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    stem: str | None = None,
    *,
    every: int = 1,
    batch: int = 1,
    crf: Callable[[np.ndarray, torch.Tensor], torch.Tensor] | None = None,
    flip: bool = False,
    msc_scales: Sequence[float] | None = None,
    msc_fusion: str | None = None,
    input_scale: float | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    temporal_ema: float = 0.0,
    save_frames: bool = False,
    alpha: float = 0.5,
    progress: bool = False,
    notice: Callable[[str], None] | None = None,
) -> VideoResult:
    """Segment the frames of one video and write its overlay video, per-frame CSV and label maps.

    Args:
        bundle: the model and its metadata (:func:`deeplab.engine.segment.load_bundle`); at
            most 256 classes (the label PNGs).
        path: the video file (any container and codec FFmpeg decodes).
        out_dir: the output folder (created if needed).
        stem: the outputs' name stem (default: the file's stem).
        every: segment every ``every``-th frame (1: all); the overlay's rate is divided by it.
        batch: frames per forward pass.
        crf: a ``deeplab.crf.DenseCRF`` (or any ``(image, probs) -> probs``), or None.
        flip / msc_scales / msc_fusion / input_scale / max_pixels: as for
            :func:`deeplab.engine.inference.predict_logits` (``input_scale`` None: the weights').
        temporal_ema: weight ``w`` of the previous frames in the moving average of the
            probabilities, in [0, 1); 0 (the default) is off.
        save_frames: also write ``<stem>/NNNNNN.png`` label maps.
        alpha: colour weight of the overlay.
        progress: show a progress bar in frames (frames/s and ETA).
        notice: receives notices (e.g. a downscaled frame); default ``warnings.warn``.

    Returns:
        A :class:`VideoResult`; its ``error`` says why decoding stopped early, if it did.

    Raises:
        VideoReadError: the file cannot be opened, has no video stream or no decodable frame.
        ImportError: PyAV is not installed.
        OSError: writing an output failed.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not 0.0 <= temporal_ema < 1.0:
        raise ValueError(f"temporal_ema must be in [0, 1), got {temporal_ema}")
    if bundle.num_classes > 256:
        raise ValueError(f"{bundle.num_classes} classes: a label PNG holds at most 256 class indices")
    path = Path(path)
    out_dir = Path(out_dir)
    stem = path.stem if stem is None else stem
    overlay_name, csv_name, *_ = video_output_names(stem, save_frames)
    frames_dir = out_dir / stem
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings = dict.fromkeys(("decode", "network", "labels", "overlay", "encode", "write"), 0.0)
    t0 = time.perf_counter()
    reader = VideoReader(path)
    timings["decode"] += time.perf_counter() - t0
    if reader.rate is None:
        rate = Fraction(25)
        if notice is not None:
            notice(f"{path}: the stream has no frame rate; the overlay video is written at 25 frames/s")
    else:
        rate = Fraction(reader.rate)
    out_rate = rate / every
    align_corners = model_align_corners(bundle.model)
    scale = bundle.scale_for(input_scale)
    pixels_per_class = np.zeros(bundle.num_classes, dtype=np.int64)
    rows: list[list[str]] = []
    seen_classes: set[int] = set()
    ema_state: torch.Tensor | None = None
    error: str | None = None
    decoded = 0
    if save_frames:
        frames_dir.mkdir(parents=True, exist_ok=True)

    expected = reader.expected_frames
    from tqdm import tqdm

    bar = tqdm(total=None if expected is None else -(-expected // every), unit="frame",
               desc=path.name, disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def run_network(group: list[DecodedFrame]) -> None:
        nonlocal ema_state
        t = time.perf_counter()
        logits = predict_logits(
            bundle.model, np.stack([f.rgb for f in group]), normalization=bundle.normalization,
            msc_scales=msc_scales, flip=flip, precision=bundle.precision, max_pixels=max_pixels,
            notice=notice, input_scale=scale, msc_fusion=msc_fusion,
        )
        timings["network"] += time.perf_counter() - t
        for k, frame in enumerate(group):
            t = time.perf_counter()
            one = logits[k : k + 1]
            if temporal_ema > 0:
                # The average of probabilities kept as its log (logaddexp): probabilities of
                # confident logits underflow to 0 in fp32, and log(0) would not upsample.
                log_probs = torch.log_softmax(one.float(), dim=1)
                if ema_state is None or ema_state.shape != log_probs.shape:
                    ema_state = log_probs
                else:
                    ema_state = torch.logaddexp(ema_state + math.log(temporal_ema),
                                                log_probs + math.log1p(-temporal_ema))
                one = ema_state
            labels_t, _ = finish_prediction(one, frame.rgb, crf=crf, align_corners=align_corners)
            labels = labels_t.numpy().astype(np.uint8)
            counts = class_pixels(labels, bundle.num_classes)
            timings["labels"] += time.perf_counter() - t
            pixels_per_class[:] += counts  # in place: the array belongs to the enclosing function
            seen_classes.update(int(c) for c in np.flatnonzero(counts))
            t = time.perf_counter()
            drawn = overlay(frame.rgb, labels, bundle.palette, bundle.class_names, alpha=alpha,
                            legend_classes=sorted(seen_classes))
            timings["overlay"] += time.perf_counter() - t
            t = time.perf_counter()
            writer.write(drawn)
            timings["encode"] += time.perf_counter() - t
            t = time.perf_counter()
            if save_frames:
                from deeplab.data.io import write_label_png

                write_label_png(frames_dir / f"{frame.index:06d}.png", labels, bundle.palette)
            timings["write"] += time.perf_counter() - t
            shares = counts / max(1, labels.size)
            rows.append([str(frame.index), _frame_times(frame.time_s), *(f"{s:.6f}" for s in shares)])
            bar.update(1)

    try:
        with reader, atomic_path(out_dir / overlay_name) as tmp_video:
            writer = _OverlayWriter(tmp_video, reader.width, reader.height, out_rate,
                                    reader.sample_aspect_ratio)
            try:
                group: list[DecodedFrame] = []
                frames = reader.frames()
                while True:
                    t = time.perf_counter()
                    try:
                        frame = next(frames)
                    except StopIteration:
                        break
                    except VideoDecodeError as e:
                        error = str(e)
                        break
                    finally:
                        timings["decode"] += time.perf_counter() - t
                    decoded = frame.index + 1
                    if frame.index % every:
                        continue
                    if group and (len(group) >= batch or group[0].rgb.shape != frame.rgb.shape):
                        run_network(group)
                        group = []
                    group.append(frame)
                if group:
                    run_network(group)
            finally:
                t = time.perf_counter()
                writer.close()
                timings["encode"] += time.perf_counter() - t
        if expected is not None and error is None:
            bar.total = bar.n  # the declared count was an estimate: end at N/N
            bar.refresh()
    finally:
        bar.close()
    t = time.perf_counter()
    with atomic_open(out_dir / csv_name, "w") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["frame", "time_s", *bundle.class_names])
        w.writerows(rows)
    timings["write"] += time.perf_counter() - t
    outputs = [out_dir / overlay_name, out_dir / csv_name, *([frames_dir] if save_frames else [])]
    return VideoResult(
        path=path, frames=len(rows), decoded=decoded, width=reader.width, height=reader.height,
        rate=out_rate, class_pixels=pixels_per_class, seconds=time.perf_counter() - t_start,
        timings=timings, outputs=outputs, error=error,
    )
