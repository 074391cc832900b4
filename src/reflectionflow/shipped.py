"""Where the shipped world weights are found: inside the installed package, through importlib.resources.

The package holds them as `reflectionflow/weights/` (world-generator, world-corrector, ...,
MODEL_CARD.md): a wheel carries the files themselves, and an editable install reads the same folder
of the checkout. Every default weights folder of the world backend is named here.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

PACKAGE = "reflectionflow"
FOLDER = "weights"


def weights_dir() -> Path:
    """The folder of the shipped weights inside the installed package (a real directory)."""
    return Path(str(files(PACKAGE).joinpath(FOLDER))).resolve()


WEIGHTS_DIR = weights_dir()


def shipped(name: str) -> Path:
    """The shipped weights folder `name` (world-generator, world-verifier, ...)."""
    return WEIGHTS_DIR / name
