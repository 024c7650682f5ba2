"""The file names ``deeplab segment`` writes for a video. Imports nothing, so the command can check
and skip existing outputs before PyTorch loads; :mod:`deeplab.engine.video` writes by them."""

from __future__ import annotations

__all__ = ["video_output_names"]


def video_output_names(stem: str, save_frames: bool) -> list[str]:
    """The names :func:`deeplab.engine.video.segment_video` writes into its output folder for
    ``stem`` (the frames' folder, with ``save_frames``, last)."""
    return [f"{stem}_overlay.mp4", f"{stem}_classes.csv", *([stem] if save_frames else [])]
