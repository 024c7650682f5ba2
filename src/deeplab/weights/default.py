"""The packaged models: the default that ``deeplab segment`` uses when no weights are given, and
the others by short name (``--weights camvid-v2``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_WEIGHTS_NAME", "PACKAGED_WEIGHTS", "default_weights_path", "packaged_weights_path",
           "resolve_weights"]

#: Short name -> file in ``deeplab/assets/``. ``camvid-v2`` is the DeepLab v2 ResNet-18 trained on
#: CamVid (the paper's architecture; docs/model-cards.md).
PACKAGED_WEIGHTS = {"camvid-v2": "deeplab_v2_camvid.safetensors"}
#: The short name of the default model.
DEFAULT_MODEL = "camvid-v2"
DEFAULT_WEIGHTS_NAME = PACKAGED_WEIGHTS[DEFAULT_MODEL]

_ASSETS = Path(__file__).resolve().parents[1] / "assets"


def packaged_weights_path(name: str) -> Path:
    """The file of a packaged model by its short name (``PACKAGED_WEIGHTS``).

    Raises:
        ValueError: no packaged model has that name.
        FileNotFoundError: the file is not installed (a package built without its data files).
    """
    if name not in PACKAGED_WEIGHTS:
        raise ValueError(f"no packaged model is called {name!r}: the names are {', '.join(PACKAGED_WEIGHTS)}")
    path = _ASSETS / PACKAGED_WEIGHTS[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"the packaged weights {name!r} are missing: {path} does not exist. "
            "Pass --weights FILE (a .safetensors from 'deeplab train' or 'deeplab convert'), "
            "or reinstall the package with its data files."
        )
    return path


def default_weights_path() -> Path:
    """Return the path of the packaged default weights (``deeplab/assets/``).

    Raises:
        FileNotFoundError: the file is not installed (a source checkout without the asset, or
            a package built without package data); the message says how to get weights.
    """
    return packaged_weights_path(DEFAULT_MODEL)


def resolve_weights(weights: str | os.PathLike | None) -> Path:
    """The weights file meant by ``--weights``: None is the default model, a packaged short name
    (``camvid-v2``) its file, unless a file of that name exists here; anything else a path."""
    if weights is None:
        return default_weights_path()
    text = os.fspath(weights)
    if text in PACKAGED_WEIGHTS and not Path(text).exists():
        return packaged_weights_path(text)
    return Path(os.path.expanduser(text))
