"""Small file helpers: atomic writes, PNG in and out, GenEval layout names, model folders' config.json."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    # compress_level fixed so the same pixels always give the same bytes
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    atomic_write_bytes(path, png_bytes(image))


def load_png(path: str | os.PathLike) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def prompt_dir(root: str | os.PathLike, index: int) -> Path:
    return Path(root) / f"{index:05d}"


def sample_name(k: int) -> str:
    return f"{k:04d}.png"


def read_model_config(path: str | os.PathLike, flag: str, error: type[Exception] = ValueError) -> tuple[Path, dict]:
    """(folder, its config.json) of a transformers-style model folder named by `flag`; `error`
    (a one-line message naming the flag) when the folder or a readable config.json is missing."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise error(f"{flag} {p}: no such folder")
    try:
        return p, json.loads((p / "config.json").read_text())
    except FileNotFoundError:
        raise error(f"{flag} {p}: no config.json (not a transformers model folder)") from None
    except ValueError as e:
        raise error(f"{flag} {p}/config.json: not valid JSON ({e})") from None
