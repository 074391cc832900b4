"""Write GenRef: triplet shards in GenRef-wds layout and GenRef-CoT-style JSONL.

Shards are written with `tarfile` directly, with fixed member metadata and member order, so the
same samples always give byte-identical tars. Each shard appears under its final name only once
it is complete (temporary file, then rename), so the names on disk tell a resumed run exactly
which shards are done.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .genref import SUBSETS, GenRefError, GenRefSample
from .shards import count_samples

IMAGE_FORMATS = {"png": "png", "jpeg": "jpg", "jpg": "jpg"}
COT_FIELDS = ("prompt", "analysis", "instructions", "result")

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# Keys become member-name prefixes: webdataset cuts a key at its first dot, so none is allowed.
_KEY = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def encode_image(image, image_format: str = "png", jpeg_quality: int = 95) -> tuple[bytes, str]:
    """(encoded bytes, extension) for an RGB array, a PIL image, or already-encoded PNG/JPEG bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        # Encoded images are stored untouched: re-encoding a JPEG would lose quality each time.
        if data.startswith(_PNG_MAGIC):
            return data, "png"
        if data.startswith(_JPEG_MAGIC):
            return data, "jpg"
        raise GenRefError("image bytes are neither PNG nor JPEG")
    from PIL import Image

    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise GenRefError(f"image arrays must be uint8 (H, W) or (H, W, 1|3|4), got {image.dtype} {image.shape}")
        pil = Image.fromarray(np.ascontiguousarray(image.squeeze(2) if image.ndim == 3 and image.shape[2] == 1
                                                   else image)).convert("RGB")
    else:
        raise GenRefError(f"an image must be a uint8 array, a PIL image or PNG/JPEG bytes, got {type(image).__name__}")
    buf = io.BytesIO()
    ext = IMAGE_FORMATS[image_format]
    if ext == "png":
        pil.save(buf, format="PNG", compress_level=6)  # fixed level: same pixels, same bytes
    else:
        pil.save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue(), ext


def _tar_member(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    # Fixed metadata: a tar records who wrote it and when, which would make every run's bytes differ.
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
    return info


def _check_sample(prompt: str, reflection: str, subset: str, key: str) -> None:
    if subset not in SUBSETS:
        raise GenRefError(f"subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    for name, text in (("prompt", prompt), ("reflection", reflection)):
        if not isinstance(text, str):
            raise GenRefError(f"{name} must be a string, got {type(text).__name__}")
    if not _KEY.match(key):
        raise GenRefError(f"sample key {key!r} must be letters, digits, '_', '-' and '/', without dots")


def _sample_members(prompt: str, reflection: str, subset: str, good, bad, image_format: str,
                    jpeg_quality: int) -> dict[str, bytes]:
    good_bytes, good_ext = encode_image(good, image_format, jpeg_quality)
    bad_bytes, bad_ext = encode_image(bad, image_format, jpeg_quality)
    return {
        f"bad_image.{bad_ext}": bad_bytes,
        f"good_image.{good_ext}": good_bytes,
        "prompt.txt": prompt.encode("utf-8"),
        "reflection.txt": reflection.encode("utf-8"),
        "subset.txt": subset.encode("utf-8"),
    }


def _add_sample(tar: tarfile.TarFile, key: str, members: Mapping[str, bytes]) -> None:
    for field_name in sorted(members):  # one fixed member order, whatever the caller's order
        data = members[field_name]
        tar.addfile(_tar_member(f"{key}.{field_name}", data), io.BytesIO(data))


class _WholeFile:
    """A file written under a temporary name (`.NAME.PID.tmp`) and renamed whole on close, or
    removed on abort (an exception inside `with`): a reader never sees half of it."""

    path: Path
    _file: object

    def _close_inner(self) -> None:
        """What must be written before the file closes (a tar's end blocks)."""

    def close(self) -> Path:
        if not self._file.closed:
            self._close_inner()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(_temp_path(self.path), self.path)
        return self.path

    def abort(self) -> None:
        if not self._file.closed:
            self._close_inner()
            self._file.close()
            _temp_path(self.path).unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ShardFile(_WholeFile):
    """One shard under a name the caller chooses, written whole: the samples go into a temporary
    file of this process (`.NAME.PID.tmp`), which takes the final name only when the shard is
    complete. Several processes can each write their own shards into one folder; the bytes are
    those GenRefWriter writes for the same samples. Leaving the block through an exception
    discards the unfinished shard."""

    def __init__(self, path: str | os.PathLike, image_format: str = "png", jpeg_quality: int = 95):
        if image_format not in IMAGE_FORMATS:
            raise GenRefError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.image_format, self.jpeg_quality = image_format, jpeg_quality
        self._file = open(_temp_path(self.path), "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.keys: list[str] = []

    def write(self, *, prompt: str, reflection: str, subset: str, good, bad, key: str) -> str:
        _check_sample(prompt, reflection, subset, key)
        if key in self.keys:
            raise GenRefError(f"sample key {key!r} appears twice in shard {self.path.name}")
        _add_sample(self._tar, key, _sample_members(prompt, reflection, subset, good, bad, self.image_format,
                                                    self.jpeg_quality))
        self.keys.append(key)
        return key

    def _close_inner(self) -> None:
        self._tar.close()  # the end-of-archive blocks


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporary files that killed writers left in `folder` (ShardFile, GenRefWriter,
    CoTWriter all name them `.NAME.PID.tmp`). Only safe while no writer works in the folder."""
    n = 0
    for stale in Path(folder).glob(".*.tmp"):
        stale.unlink(missing_ok=True)
        n += 1
    return n


class GenRefWriter:
    """Write GenRef triplets into `out_dir/{prefix}_{i}.tar`, `max_samples_per_shard` per shard.

    Resuming: the writer finds the complete shards already in `out_dir` (full, intact tars under
    their final names) and continues after them. `samples_committed` says how many samples those
    hold, so the producer skips that many of its (deterministic) inputs. A last, partial shard is
    rewritten. Use it as a context manager: leaving normally writes the last partial shard,
    leaving through an exception discards the unfinished one.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "genref", max_samples_per_shard: int = 1000,
                 image_format: str = "png", jpeg_quality: int = 95):
        if not _NAME.match(prefix):
            raise GenRefError(f"prefix must be letters, digits, '_' or '-', got {prefix!r}")
        if max_samples_per_shard < 1:
            raise GenRefError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
        if image_format not in IMAGE_FORMATS:
            raise GenRefError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
        if not 1 <= jpeg_quality <= 100:
            raise GenRefError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise GenRefError(f"{self.out_dir} exists and is not a directory")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_samples_per_shard = prefix, max_samples_per_shard
        self.image_format, self.jpeg_quality = image_format, jpeg_quality
        for stale in self.out_dir.glob(f".{prefix}_*.tar.*.tmp"):
            stale.unlink()  # the unfinished shard of a run that was killed
        self.complete_shards = self._find_complete()
        self.samples_committed = len(self.complete_shards) * max_samples_per_shard
        self.written: list[Path] = []  # shards this writer completed
        self._count = self.samples_committed  # samples written so far, over all shards
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._path: Path | None = None
        self._keys: set[str] = set()

    def shard_path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}_{index}.tar"

    def _find_complete(self) -> list[Path]:
        pattern = re.compile(rf"^{re.escape(self.prefix)}_(\d+)\.tar$")
        existing = sorted(int(m.group(1)) for p in self.out_dir.iterdir() if (m := pattern.match(p.name)))
        complete: list[Path] = []
        for i in existing:
            path = self.shard_path(i)
            n = count_samples(path) if i == len(complete) else None
            if i == len(complete) and n == self.max_samples_per_shard:
                complete.append(path)
            elif i != existing[-1] or i != len(complete) or (n is not None and n > self.max_samples_per_shard):
                # Only the last shard of an interrupted or finished run can be short.
                raise GenRefError(f"{self.out_dir} holds shards of another run ({path.name} does not follow "
                                  f"{len(complete)} complete shard(s) of {self.max_samples_per_shard}); "
                                  "write to an empty directory or remove them")
        return complete

    # -- writing ----------------------------------------------------------------------------------

    def write(self, *, prompt: str, reflection: str, subset: str, good, bad, key: str | None = None) -> str:
        """Add one triplet; returns its key. Images: uint8 arrays, PIL images or PNG/JPEG bytes."""
        key = f"{self._count:09d}" if key is None else key
        _check_sample(prompt, reflection, subset, key)
        if key in self._keys:
            raise GenRefError(f"sample key {key!r} appears twice in shard {self.shard_path(self._shard_index).name}")
        _add_sample(self._open_shard(), key, _sample_members(prompt, reflection, subset, good, bad,
                                                              self.image_format, self.jpeg_quality))
        self._keys.add(key)
        self._count += 1
        if len(self._keys) == self.max_samples_per_shard:
            self._commit()
        return key

    def write_sample(self, sample: GenRefSample, key: str | None = None) -> str:
        return self.write(prompt=sample.prompt, reflection=sample.reflection, subset=sample.subset,
                          good=sample.good, bad=sample.bad, key=sample.key if key is None else key)

    def write_all(self, samples: Iterable[GenRefSample]) -> int:
        n = 0
        for sample in samples:
            self.write_sample(sample)
            n += 1
        return n

    @property
    def _shard_index(self) -> int:
        return self._count // self.max_samples_per_shard

    def _open_shard(self) -> tarfile.TarFile:
        if self._tar is None:
            self._path = self.shard_path(self._shard_index)
            self._file = open(_temp_path(self._path), "wb")
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        return self._tar

    def _commit(self) -> None:
        self._tar.close()  # writes the end-of-archive blocks
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(_temp_path(self._path), self._path)
        self.written.append(self._path)
        self._tar, self._file, self._keys = None, None, set()

    def close(self) -> list[Path]:
        """Write the last, partial shard; returns the shards this writer completed."""
        if self._tar is not None:
            self._commit()
        return self.written

    def abort(self) -> None:
        """Drop the unfinished shard; complete shards stay."""
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            _temp_path(self._path).unlink(missing_ok=True)
            self._tar, self._file, self._keys = None, None, set()
            self._count = self._shard_index * self.max_samples_per_shard

    def __enter__(self) -> GenRefWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# -- GenRef-CoT ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoTRecord:
    """One chain-of-thought reflection: the prompt, the analysis of the image, the edit
    instructions and the verdict. `extra` holds anything else (image paths, scores, ids)."""

    prompt: str
    analysis: str
    instructions: str | Sequence[str]
    result: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        clash = sorted(set(self.extra) & set(COT_FIELDS))
        if clash:
            raise GenRefError(f"extra fields may not reuse {', '.join(clash)}")
        instructions = self.instructions if isinstance(self.instructions, str) else list(self.instructions)
        line = {"prompt": self.prompt, "analysis": self.analysis, "instructions": instructions, "result": self.result}
        return line | {k: self.extra[k] for k in sorted(self.extra)}

    @classmethod
    def from_dict(cls, d: Mapping) -> CoTRecord:
        missing = [f for f in COT_FIELDS if f not in d]
        if missing:
            raise GenRefError(f"CoT record lacks {', '.join(missing)}")
        return cls(d["prompt"], d["analysis"], d["instructions"], d["result"],
                   {k: v for k, v in d.items() if k not in COT_FIELDS})


class CoTWriter(_WholeFile):
    """Write CoT records as JSONL; the file appears under its name only once complete."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(_temp_path(self.path), "w", encoding="utf-8")
        self.count = 0

    def write(self, record: CoTRecord | Mapping) -> None:
        record = record if isinstance(record, CoTRecord) else CoTRecord.from_dict(record)
        self._file.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
        self.count += 1


def read_cot(path: str | os.PathLike) -> list[CoTRecord]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(CoTRecord.from_dict(json.loads(line)))
            except (json.JSONDecodeError, GenRefError, AttributeError, TypeError) as e:
                raise GenRefError(f"{path}:{n}: not a CoT record ({e})") from None
    return records
