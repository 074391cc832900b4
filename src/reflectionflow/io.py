"""Small file helpers: atomic writes, PNG in and out, GenEval layout names, model folders' config.json.

`decode_image` is the one decoder of images that come from outside the process (a `serve`
request, a GenRef shard, a run folder being resumed, evaluated or compared, a JSONL data set):
it caps the encoded size and the pixel count before anything is decoded, reads only PNG, JPEG and
WebP, and names the file or field in its one-line `ImageError`.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
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
    """JSON through atomic_write_bytes, every string scrubbed of secrets (reflectionflow.redact)."""
    from .redact import scrub_obj

    atomic_write_text(path, json.dumps(scrub_obj(obj), indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike, rows: list, fsync: bool = False) -> None:
    """Append JSON lines in one write, every string scrubbed of secrets (reflectionflow.redact)."""
    from .redact import scrub_obj

    if not rows:
        return
    data = "".join(json.dumps(scrub_obj(r)) + "\n" for r in rows).encode("utf-8")
    with open(path, "ab") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    # compress_level fixed so the same pixels always give the same bytes
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    atomic_write_bytes(path, png_bytes(image))


# Caps of decode_image. 4096 x 4096 holds every image the project makes or trains on (FLUX: 1024,
# GenRef: up to 2048) and decodes in about 50 MB; a 12000 x 12000 PNG, which fits in a few hundred
# KB, would take over a GB. PIL's own decompression-bomb limit (89 M pixels) is far above it.
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGE_BYTES = 32 * 1024 * 1024
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


class ImageError(ValueError):
    """Bytes that are not an image this project reads: names the file or field, and why."""


def decode_image(data: bytes, name: str, *, size: int | None = None, pil: bool = False,
                 max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES):
    """Encoded bytes -> (H, W, 3) uint8 (a PIL RGB image with `pil`), resized to size x size (box
    filter) when `size` is given and differs. Raises ImageError (a ValueError) naming `name` for
    anything else: over `max_bytes`, over `max_pixels` (checked from the header, before decoding),
    a format other than PNG / JPEG / WebP, or bytes the decoder refuses."""
    from PIL import Image

    if len(data) > max_bytes:
        raise ImageError(f"{name}: {len(data)} bytes, over the cap of {max_bytes} bytes for one image")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{name}: {w}x{h} pixels, over the cap of {max_pixels} pixels for one image")
            im.load()  # open() is lazy: a truncated or garbled file only fails here
            rgb = im.convert("RGB")
        if size and rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.BOX)
    except ImageError:
        raise
    except Image.DecompressionBombError:  # PIL's own limit, far above ours, seen at open()
        raise ImageError(f"{name}: over the cap of {max_pixels} pixels for one image") from None
    except Exception as e:  # any decoder failure on foreign bytes: one bad image, never a crash
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise ImageError(f"{name}: not a readable PNG, JPEG or WebP image ({why[:200]})") from None
    return rgb if pil else np.asarray(rgb)


def read_capped(path: str | os.PathLike, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """A file's bytes, refused (ImageError naming it) when over max_bytes, before it is read."""
    path = Path(path)
    try:
        n = path.stat().st_size
        if n > max_bytes:
            raise ImageError(f"{path}: {n} bytes, over the cap of {max_bytes} bytes for one image")
        return path.read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None


def load_image(path: str | os.PathLike, *, size: int | None = None, pil: bool = False):
    """An image file through decode_image (the caps; errors name the file)."""
    return decode_image(read_capped(path), str(path), size=size, pil=pil)


def load_png(path: str | os.PathLike) -> np.ndarray:
    return load_image(path)


def check_writable_dir(path: str | os.PathLike, flag: str = "--out") -> None:
    """Raise ValueError (one line naming `flag`) unless `path` is, or can become, a folder this
    process can write in: tried with a probe file in it or in its nearest existing parent, which
    works where permission bits do not tell (root on a read-only mount). Nothing is left behind."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {p}: exists and is not a folder (a folder is expected)")
    probe_in = p
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if probe_in.exists() and not probe_in.is_dir():
        raise ValueError(f"{flag} {p}: {probe_in} is a file, so no folder can be made there")
    try:
        fd, name = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=probe_in)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ValueError(f"{flag} {p}: cannot write in {probe_in} ({e.strerror or e}); choose a writable folder") \
            from None


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
