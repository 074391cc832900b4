"""Webdataset shards without the webdataset pipeline: name them, open them, group their members.

Shard lists follow webdataset's syntax: brace ranges (`genref_{0..208}.tar`), several lists joined
with `::`, and URLs (`pipe:CMD`, `http(s)://`, `s3://`, ...) opened through webdataset's `gopen`.
Local names may also be globs or a directory of shards. Reading is done here with `tarfile` in
stream mode so that a damaged shard is reported (and skipped by the caller) instead of raised,
and so that every sample keeps a stable position inside its shard, which is what resuming needs.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")

# A URL scheme has at least two characters, so a Windows drive letter ("C:") stays a local path.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
_GLOB = re.compile(r"[*?\[]")


class ShardError(ValueError):
    """A shard list names nothing readable (no match, a missing file or directory)."""


def is_url(name: str) -> bool:
    return bool(_URL.match(name)) and not name.startswith("file:")


def natural_key(name: str) -> list:
    """Sort key that puts genref_2.tar before genref_10.tar, as brace ranges list them."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def resolve_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a shard list into shard names (local paths or URLs), in order, without duplicates.

    Remote names are only expanded: they are checked when opened, never listed. Every local name
    must exist, so a typo fails here rather than after hours of training on a subset.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ShardError("no shards given")
    found: list[str] = []
    for item in specs:
        parts = [p.strip() for p in os.fspath(item).split("::") if p.strip()]
        if not parts:
            raise ShardError(f"empty shard pattern {os.fspath(item)!r}")
        for part in parts:
            found.extend(_resolve_pattern(part))
    return list(dict.fromkeys(found))


def _resolve_pattern(pattern: str) -> list[str]:
    names = list(braceexpand(pattern))
    if is_url(pattern):
        return names
    found: list[str] = []
    missing: list[str] = []
    for name in names:
        name = name.removeprefix("file:")
        path = Path(name).expanduser()
        if _GLOB.search(name):
            matches = sorted((m for m in glob.glob(str(path)) if os.path.isfile(m)), key=natural_key)
            (found.extend(matches) if matches else missing.append(name))
        elif path.is_dir():
            matches = sorted((str(p) for p in path.iterdir() if p.is_file() and p.name.endswith(SHARD_SUFFIXES)),
                             key=natural_key)
            if not matches:
                raise ShardError(f"directory {name} holds no shards (*{', *'.join(SHARD_SUFFIXES)})")
            found.extend(matches)
        elif path.is_file():
            found.append(str(path))
        else:
            missing.append(name)
    if not missing:
        return found
    parent = Path(missing[0]).expanduser().parent
    if not parent.is_dir():
        where = f" (directory {parent} does not exist)"
    else:
        where = "" if _GLOB.search(missing[0]) else " (no such file or directory)"
    if not found:
        raise ShardError(f"no shard matches {pattern!r}{where}")
    raise ShardError(f"{len(missing)} of {len(names)} shards named by {pattern!r} do not exist "
                     f"(first: {missing[0]}){where}")


@dataclass
class RawSample:
    """The members of one webdataset sample: field name (e.g. "prompt.txt") -> bytes."""

    key: str
    fields: dict[str, bytes]
    shard: str
    index: int  # position among the shard's samples; stable across reads of the same file
    problem: str | None = None  # set when the grouping itself went wrong (a repeated field)
    cut_off: bool = False  # the last sample of a truncated shard: it may be missing fields


@dataclass
class ShardReport:
    """What went wrong while reading one shard, if anything."""

    shard: str
    samples: int = 0
    error: str | None = None  # "truncated_tar" or "unreadable_shard"
    detail: str = ""


def split_member(name: str) -> tuple[str, str] | None:
    """webdataset's naming rule: the key runs up to the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def open_shard(shard: str):
    """A binary stream of the shard; URLs go through webdataset so pipe:/http/s3 behave as there."""
    if is_url(shard):
        # Imported here: webdataset pulls in torch, which local shards never need.
        from webdataset import gopen

        return gopen(shard, "rb")
    return open(shard.removeprefix("file:"), "rb")


# Everything a damaged or cut-off archive (or its gzip layer) can raise while being read.
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except _READ_ERRORS:
        # A pipe left before its end reports its command killed by SIGPIPE here; the bytes read
        # were judged already, and a failing command shows up earlier as a read error.
        pass


def iter_shard(shard: str, report: ShardReport | None = None) -> Iterator[RawSample]:
    """Yield the samples of one shard in file order; damage ends the shard and lands in `report`.

    A sample cut off by truncation is still yielded when it was complete up to the cut, since a
    member is only seen once all its bytes arrived; the caller decides whether it has every field.
    """
    report = report if report is not None else ShardReport(shard)
    try:
        stream = open_shard(shard)
    except _READ_ERRORS as e:
        report.error, report.detail = "unreadable_shard", f"{type(e).__name__}: {e}"
        return
    current: RawSample | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                parts = split_member(info.name)
                if parts is None:
                    continue
                key, ext = parts
                data = tar.extractfile(info).read()
                if current is not None and current.key != key:
                    report.samples += 1
                    yield current
                    current = None
                if current is None:
                    current = RawSample(key, {}, shard, report.samples)
                if ext in current.fields:
                    current.problem = f"field {ext} appears twice"
                current.fields[ext] = data
            # tarfile ends quietly when the file stops at or inside a header; only a zero
            # block (which every complete archive ends with) proves nothing was cut off.
            if tar.fileobj.tell() < tar.offset + tarfile.BLOCKSIZE:
                raise tarfile.ReadError("archive ends without its end-of-archive block")
    except _READ_ERRORS as e:
        report.error = "truncated_tar" if report.samples or current is not None else "unreadable_shard"
        report.detail = f"{type(e).__name__}: {e}"
        if current is not None:
            current.cut_off = True
    finally:
        _close_quietly(stream)
    if current is not None:
        report.samples += 1
        yield current


def count_samples(path: str | os.PathLike) -> int | None:
    """Samples in a complete local shard, or None when it is damaged or cut off.

    Reads headers only (random access skips the data), so checking a finished dataset is cheap.
    """
    keys: set[str] = set()
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for info in tar:
                parts = split_member(info.name) if info.isfile() else None
                if parts is not None:
                    keys.add(parts[0])
            if tar.fileobj.tell() < tar.offset + tarfile.BLOCKSIZE:
                return None
    except _READ_ERRORS:
        return None
    return len(keys)


def iter_shards(shards: Iterable[str], reports: list[ShardReport] | None = None) -> Iterator[RawSample]:
    for shard in shards:
        report = ShardReport(shard)
        if reports is not None:
            reports.append(report)
        yield from iter_shard(shard, report)
