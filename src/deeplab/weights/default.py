"""The packaged default model: the weights ``deeplab segment`` uses when none are given."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_WEIGHTS_NAME", "default_weights_path"]

DEFAULT_WEIGHTS_NAME = "deeplab_v2_camvid.safetensors"


def default_weights_path() -> Path:
    """Return the path of the packaged default weights (``deeplab/assets/``).

    Raises:
        FileNotFoundError: the file is not installed (a source checkout without the asset, or
            a package built without package data); the message says how to get weights.
    """
    path = Path(__file__).resolve().parents[1] / "assets" / DEFAULT_WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"the packaged default weights are missing: {path} does not exist. "
            "Pass --weights FILE (a .safetensors from 'deeplab train' or 'deeplab convert'), "
            "or reinstall the package with its data files."
        )
    return path
