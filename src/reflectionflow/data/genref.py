"""GenRef triplets: read webdataset shards once, serve the four subsets in a scheduled mix.

GenRef-wds (docs/method.md, section 4) stores one triplet per webdataset sample with the fields
`good_image.jpg`, `bad_image.jpg`, `reflection.txt`, `prompt.txt` and `subset.txt`
(general | length | rule | editing). The original trainer builds one webdataset pipeline per
subset and so streams every shard four times, each pipeline throwing away the other three
subsets. Here one stream feeds four per-subset buffers and a sampler draws from them with the
weights of the current training step (`MixSchedule`), so each shard is read once per epoch.

The reader is deterministic (seeded shard order per epoch, seeded draws) and resumable:
`state_dict()` records the stream position, the sampler's RNG and which samples sit in the
buffers; `load_state_dict()` rebuilds exactly that, so a trainer resumed at step k sees the same
samples as an uninterrupted run. Damaged samples and shards are skipped and counted in
`reader.stats`, never raised.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .shards import RawSample, ShardReport, iter_shard, resolve_shards

SUBSETS = ("general", "length", "rule", "editing")
IMAGE_FIELDS = ("good_image", "bad_image")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_FIELDS = ("prompt.txt", "reflection.txt", "subset.txt")
IMAGE_KINDS = ("numpy", "pil")

# Why a sample or a shard was skipped; the keys of `ReadStats.corrupt`.
MISSING_KEY = "missing_key"
REPEATED_KEY = "repeated_key"
UNKNOWN_SUBSET = "unknown_subset"
UNDECODABLE_TEXT = "undecodable_text"
EMPTY_TEXT = "empty_text"  # a prompt.txt with nothing in it: nothing to train or validate on
UNDECODABLE_IMAGE = "undecodable_image"
TRUNCATED_TAR = "truncated_tar"
UNREADABLE_SHARD = "unreadable_shard"
SHARD_REASONS = (TRUNCATED_TAR, UNREADABLE_SHARD)

# train_flux/config.yaml of the original: `training_stages: [0, 5000]` with `split_ratios`.
ORIGINAL_STAGES = (0, 5000)
ORIGINAL_RATIOS = {
    "general": (0.1, 0.3),
    "length": (0.1, 0.3),
    "rule": (0.1, 0.4),
    "editing": (0.7, 0.0),
}


class GenRefError(ValueError):
    """Bad GenRef input: a mix schedule, reader settings, or a saved state that does not fit."""


class CorruptSample(Exception):
    """A sample that cannot be used; `reason` is one of the reason constants above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class GenRefSample:
    key: str
    prompt: str
    reflection: str
    subset: str
    good: Any  # np.ndarray (H, W, 3) uint8 or PIL.Image.Image in RGB, as the reader was asked
    bad: Any
    source_shard: str


@dataclass(frozen=True)
class GenRefRecord:
    """A sample whose fields are all present and whose text is valid; images still encoded.

    Buffers hold records rather than decoded samples: decoding costs time and memory, and most
    samples of an over-represented subset are passed over without ever being drawn.
    """

    key: str
    prompt: str
    reflection: str
    subset: str
    good: bytes
    bad: bytes
    shard: str
    index: int  # position inside its shard, which is how a saved state names it


def parse_record(raw: RawSample) -> GenRefRecord:
    """Check a raw sample's fields; raise CorruptSample naming what is wrong."""
    if raw.problem:
        raise CorruptSample(REPEATED_KEY, raw.problem)
    fields = raw.fields
    missing = [name for name in TEXT_FIELDS if name not in fields]
    images: dict[str, bytes] = {}
    for stem in IMAGE_FIELDS:
        ext = next((e for e in IMAGE_EXTENSIONS if f"{stem}.{e}" in fields), None)
        if ext is None:
            missing.append(f"{stem}.{'|'.join(IMAGE_EXTENSIONS)}")
        else:
            images[stem] = fields[f"{stem}.{ext}"]
    if missing:
        raise CorruptSample(MISSING_KEY, ", ".join(missing))
    text: dict[str, str] = {}
    for name in TEXT_FIELDS:
        try:
            text[name] = fields[name].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise CorruptSample(UNDECODABLE_TEXT, f"{name}: {e}") from None
    if not text["prompt.txt"]:
        raise CorruptSample(EMPTY_TEXT, "prompt.txt is empty")
    subset = text["subset.txt"].lower()
    if subset not in SUBSETS:
        raise CorruptSample(UNKNOWN_SUBSET, f"{text['subset.txt']!r} (accepted: {', '.join(SUBSETS)})")
    return GenRefRecord(raw.key, text["prompt.txt"], text["reflection.txt"], subset,
                        images["good_image"], images["bad_image"], raw.shard, raw.index)


def decode_image(data: bytes, image: str = "numpy", name: str = "image"):
    """io.decode_image (its byte and pixel caps) with the failure as one corrupt sample."""
    from ..io import ImageError
    from ..io import decode_image as _decode

    try:
        return _decode(data, name, pil=image == "pil")
    except ImageError as e:
        raise CorruptSample(UNDECODABLE_IMAGE, str(e)) from None


def decode_record(record: GenRefRecord, image: str = "numpy") -> GenRefSample:
    return GenRefSample(
        key=record.key,
        prompt=record.prompt,
        reflection=record.reflection,
        subset=record.subset,
        good=decode_image(record.good, image, "good_image"),
        bad=decode_image(record.bad, image, "bad_image"),
        source_shard=record.shard,
    )


def _check_image_kind(image: str) -> None:
    if image not in IMAGE_KINDS:
        raise GenRefError(f"image must be one of {', '.join(IMAGE_KINDS)}, got {image!r}")


@dataclass
class ReadStats:
    """Counters of one read; `corrupt` holds samples and damaged shards by reason."""

    shards: int = 0  # shards read to their end or to their damage
    read: int = 0  # samples taken from shards, whatever their state
    served: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SUBSETS, 0))
    corrupt: dict[str, int] = field(default_factory=dict)
    corrupt_items: list[dict[str, str]] = field(default_factory=list)  # the first `max_items`
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SUBSETS, 0))
    max_items: int = 100

    @property
    def samples(self) -> int:
        return sum(self.served.values())

    @property
    def corrupt_samples(self) -> int:
        return sum(n for reason, n in self.corrupt.items() if reason not in SHARD_REASONS)

    @property
    def corrupt_shards(self) -> int:
        return sum(n for reason, n in self.corrupt.items() if reason in SHARD_REASONS)

    def note_corrupt(self, reason: str, shard: str, key: str | None = None, detail: str = "") -> None:
        self.corrupt[reason] = self.corrupt.get(reason, 0) + 1
        if len(self.corrupt_items) < self.max_items:
            self.corrupt_items.append({"shard": shard, "key": key or "", "reason": reason, "detail": detail})

    def finish_shard(self, report: ShardReport) -> None:
        self.shards += 1
        if report.error:
            self.note_corrupt(report.error, report.shard, detail=report.detail)

    def to_dict(self) -> dict:
        return {
            "shards": self.shards,
            "read": self.read,
            "samples": self.samples,
            "served": dict(self.served),
            "corrupt": dict(self.corrupt),
            "corrupt_items": [dict(item) for item in self.corrupt_items],
            "dropped": dict(self.dropped),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ReadStats:
        return cls(shards=d["shards"], read=d["read"], served=dict(d["served"]), corrupt=dict(d["corrupt"]),
                   corrupt_items=[dict(i) for i in d["corrupt_items"]], dropped=dict(d["dropped"]))


def iter_genref(shards: str | Sequence[str], *, image: str = "numpy",
                stats: ReadStats | None = None) -> Iterator[GenRefSample]:
    """Every readable sample in shard order, images decoded; the rest counted in `stats`."""
    _check_image_kind(image)
    names = resolve_shards(shards)
    stats = stats if stats is not None else ReadStats()
    for shard in names:
        report = ShardReport(shard)
        for raw in iter_shard(shard, report):
            stats.read += 1
            try:
                sample = decode_record(parse_record(raw), image)
            except CorruptSample as c:
                if not raw.cut_off:  # a sample cut short is part of the truncated shard counted below
                    stats.note_corrupt(c.reason, shard, raw.key, c.detail)
                continue
            stats.served[sample.subset] += 1
            yield sample
        stats.finish_shard(report)


@dataclass(frozen=True)
class MixSchedule:
    """Subset weights as a piecewise-linear function of the training step.

    `ratios[subset][i]` is the weight at step `stages[i]`; between stages the weights move
    linearly and after the last one they stay. Weights need not sum to one; a subset left out
    has weight zero. This is the original's `training_stages` / `split_ratios`, and the default
    is its warm-up: 0.1/0.1/0.1/0.7 (general/length/rule/editing) to 0.3/0.3/0.4/0.0 in 5000 steps.
    """

    stages: tuple[int, ...] = ORIGINAL_STAGES
    ratios: Mapping[str, tuple[float, ...]] = field(default_factory=lambda: dict(ORIGINAL_RATIOS))

    def __post_init__(self):
        stages = tuple(self.stages)
        if not stages or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in stages):
            raise GenRefError(f"mix stages must be non-negative integer steps, got {list(self.stages)}")
        if any(b <= a for a, b in zip(stages, stages[1:])):
            raise GenRefError(f"mix stages must increase, got {list(stages)}")
        unknown = sorted(set(self.ratios) - set(SUBSETS))
        if unknown:
            raise GenRefError(f"unknown subset(s) in the mix: {', '.join(unknown)} (accepted: {', '.join(SUBSETS)})")
        ratios = {}
        for subset in SUBSETS:
            values = self.ratios.get(subset, (0.0,) * len(stages))
            values = (values,) if isinstance(values, (int, float)) else tuple(values)
            if len(values) == 1:
                values = values * len(stages)
            if len(values) != len(stages):
                raise GenRefError(f"mix ratios for {subset} have {len(values)} values for {len(stages)} stages")
            if any(not math.isfinite(v) or v < 0 for v in values):
                raise GenRefError(f"mix ratios for {subset} must be finite and >= 0, got {list(values)}")
            ratios[subset] = tuple(float(v) for v in values)
        for i, step in enumerate(stages):
            if sum(r[i] for r in ratios.values()) <= 0:
                raise GenRefError(f"every mix ratio is zero at step {step}")
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "ratios", ratios)

    @classmethod
    def constant(cls, weights: Mapping[str, float]) -> MixSchedule:
        return cls(stages=(0,), ratios={s: (w,) for s, w in weights.items()})

    @classmethod
    def linear(cls, start: Mapping[str, float], end: Mapping[str, float], steps: int) -> MixSchedule:
        subsets = set(start) | set(end)
        return cls(stages=(0, steps), ratios={s: (start.get(s, 0.0), end.get(s, 0.0)) for s in subsets})

    @classmethod
    def from_dict(cls, d: Mapping) -> MixSchedule:
        """Read `{"stages", "ratios"}` or the original's `{"training_stages", "split_ratios"}`."""
        if "training_stages" in d or "split_ratios" in d:
            d = {"stages": d.get("training_stages", [0]), "ratios": d.get("split_ratios", {})}
        unknown = sorted(set(d) - {"stages", "ratios"})
        if unknown:
            raise GenRefError(f"unknown mix setting(s): {', '.join(unknown)} (accepted: stages, ratios)")
        return cls(stages=tuple(d.get("stages", ORIGINAL_STAGES)), ratios=dict(d.get("ratios", ORIGINAL_RATIOS)))

    def to_dict(self) -> dict:
        return {"stages": list(self.stages), "ratios": {s: list(v) for s, v in self.ratios.items()}}

    def weights(self, step: int) -> dict[str, float]:
        """Normalised weights at `step`."""
        raw = {s: float(np.interp(step, self.stages, v)) for s, v in self.ratios.items()}
        total = sum(raw.values())
        return {s: w / total for s, w in raw.items()}


class GenRefReader:
    """Stream GenRef shards once and draw samples with the subset mix of the current step.

    shards: anything `resolve_shards` takes (paths, globs, brace patterns, URLs, a directory).
    seed: fixes the shard order of every epoch and every draw.
    shuffle: shard order shuffled per epoch and random draws from the buffers; False keeps file
        order (shard list order, first-in first-out buffers).
    buffer_size: samples held per subset, still encoded (memory: about 4 x buffer_size x two
        encoded images). Draws keep the drawn subset's buffer full, which is the sample-level
        shuffle; a sample arriving for a full buffer is dropped (counted in `stats.dropped`), as
        the original's per-subset filters drop what they skip.
    mix: subset weights per step; the original's warm-up by default.
    samples_per_step: how the reader counts steps when `draw` is not told the step.
    epochs: passes over the shards; None repeats forever (training), a number ends the stream.
    rank, world_size: this process takes shards rank, rank + world_size, ... of the list.
    """

    def __init__(self, shards: str | Sequence[str], *, seed: int = 0, shuffle: bool = True,
                 buffer_size: int = 256, mix: MixSchedule | None = None, samples_per_step: int = 1,
                 epochs: int | None = None, image: str = "numpy", rank: int = 0, world_size: int = 1):
        _check_image_kind(image)
        if buffer_size < 1:
            raise GenRefError(f"buffer_size must be >= 1, got {buffer_size}")
        if samples_per_step < 1:
            raise GenRefError(f"samples_per_step must be >= 1, got {samples_per_step}")
        if epochs is not None and epochs < 1:
            raise GenRefError(f"epochs must be >= 1 or None, got {epochs}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise GenRefError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.shards = resolve_shards(shards)
        if len(self.shards) < world_size:
            raise GenRefError(f"{len(self.shards)} shard(s) cannot feed {world_size} processes")
        self.seed, self.shuffle, self.buffer_size = seed, shuffle, buffer_size
        self.mix = mix if mix is not None else MixSchedule()
        self.samples_per_step, self.epochs, self.image = samples_per_step, epochs, image
        self.rank, self.world_size = rank, world_size
        self._mine = list(range(rank, len(self.shards), world_size))
        self._shard_ids = {name: i for i, name in enumerate(self.shards)}
        self._reset()

    def _reset(self) -> None:
        self.stats = ReadStats()
        self.samples_drawn = 0
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._buffers: dict[str, list[GenRefRecord]] = {s: [] for s in SUBSETS}
        self._epoch, self._pos, self._index = 0, 0, 0  # next sample: epoch, place in its order, index
        self._epoch_counts = dict.fromkeys(SUBSETS, 0)
        self._full_epoch_counts: dict[str, int] | None = None
        self._absent: set[str] = set()
        self._live: Iterator[RawSample] | None = None
        self._report: ShardReport | None = None
        self._order_cache: tuple[int, list[int]] | None = None

    # -- the stream: shards in a seeded order per epoch ------------------------------------------

    def _order(self, epoch: int) -> list[int]:
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = list(self._mine)
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
                order = [order[i] for i in rng.permutation(len(order))]
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _exhausted(self) -> bool:
        return self.epochs is not None and self._epoch >= self.epochs

    def _next_raw(self) -> RawSample | None:
        while not self._exhausted():
            if self._live is None:
                shard = self.shards[self._order(self._epoch)[self._pos]]
                self._report = ShardReport(shard)
                skip = self._index  # resuming inside a shard: its first samples were consumed before
                self._live = (r for r in iter_shard(shard, self._report) if r.index >= skip)
            raw = next(self._live, None)
            if raw is not None:
                self._index = raw.index + 1
                return raw
            self._finish_shard()
        return None

    def _finish_shard(self) -> None:
        self.stats.finish_shard(self._report)
        self._live, self._report = None, None
        self._pos, self._index = self._pos + 1, 0
        if self._pos < len(self._mine):
            return
        if sum(self._epoch_counts.values()) == 0:
            raise GenRefError(f"no readable GenRef sample in {len(self._mine)} shard(s) "
                              f"(first: {self.shards[self._mine[0]]}); skipped: {self.stats.corrupt}")
        # A subset missing from a whole pass is missing for good: the next passes read the same shards.
        self._absent = {s for s, n in self._epoch_counts.items() if n == 0}
        self._full_epoch_counts = self._epoch_counts
        self._epoch_counts = dict.fromkeys(SUBSETS, 0)
        self._epoch, self._pos = self._epoch + 1, 0

    def _ingest(self, raw: RawSample) -> None:
        self.stats.read += 1
        try:
            record = parse_record(raw)
        except CorruptSample as c:
            if not raw.cut_off:
                self.stats.note_corrupt(c.reason, raw.shard, raw.key, c.detail)
            return
        self._epoch_counts[record.subset] += 1
        buffer = self._buffers[record.subset]
        if len(buffer) >= self.buffer_size:
            self.stats.dropped[record.subset] += 1
        else:
            buffer.append(record)

    # -- the sampler ------------------------------------------------------------------------------

    def _fill_target(self, subset: str) -> int:
        if not self.shuffle:
            return 1
        if self._full_epoch_counts is not None and self._full_epoch_counts[subset] > 0:
            return min(self.buffer_size, self._full_epoch_counts[subset])
        return self.buffer_size

    def _take(self, subset: str) -> GenRefRecord | None:
        buffer = self._buffers[subset]
        target, start_epoch = self._fill_target(subset), self._epoch
        while len(buffer) < target and subset not in self._absent:
            # A subset smaller than the buffer would otherwise read the whole stream on each draw.
            if buffer and self._epoch != start_epoch:
                break
            raw = self._next_raw()
            if raw is None:
                break
            self._ingest(raw)
        if not buffer:
            return None
        if not self.shuffle:
            return buffer.pop(0)
        i = int(self._rng.integers(len(buffer)))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]  # swap-remove: O(1) and still a uniform draw
        return buffer.pop()

    def _choose(self, step: int) -> str | None:
        weights = self.mix.weights(step)
        usable = {s: w for s, w in weights.items() if w > 0 and s not in self._absent
                  and not (self._exhausted() and not self._buffers[s])}
        if not usable:
            if self._exhausted():
                return None
            wanted = [s for s, w in weights.items() if w > 0]
            raise GenRefError(f"at step {step} the mix asks only for {', '.join(wanted)}, which the "
                              f"shards do not hold (present: {', '.join(self.present_subsets()) or 'none'})")
        u = self._rng.random() * sum(usable.values())
        for subset, w in usable.items():
            u -= w
            if u < 0:
                return subset
        return subset  # u landed on the top edge through rounding

    def present_subsets(self) -> list[str]:
        return [s for s in SUBSETS if s not in self._absent]

    def draw(self, step: int | None = None) -> GenRefSample | None:
        """The next sample under the mix of `step` (default: samples drawn // samples_per_step).

        Returns None only when a finite number of epochs is used up.
        """
        if step is None:
            step = self.samples_drawn // self.samples_per_step
        failures = 0
        while True:
            subset = self._choose(step)
            if subset is None:
                return None
            record = self._take(subset)
            if record is None:  # the subset turned out absent or ran dry; choose again
                continue
            try:
                sample = decode_record(record, self.image)
            except CorruptSample as c:
                self.stats.note_corrupt(c.reason, record.shard, record.key, c.detail)
                failures += 1
                # More failures in a row than samples in a pass: nothing in the shards decodes.
                if self._full_epoch_counts and failures > sum(self._full_epoch_counts.values()):
                    raise GenRefError(f"no decodable GenRef image in {len(self._mine)} shard(s); "
                                      f"skipped: {self.stats.corrupt}") from None
                continue
            self.samples_drawn += 1
            self.stats.served[subset] += 1
            return sample

    def __iter__(self) -> GenRefReader:
        return self

    def __next__(self) -> GenRefSample:
        sample = self.draw()
        if sample is None:
            raise StopIteration
        return sample

    # -- resuming ---------------------------------------------------------------------------------

    def _settings(self) -> dict:
        digest = hashlib.sha256("\n".join(self.shards).encode()).hexdigest()[:16]
        return {"shards": len(self.shards), "shards_sha256": digest, "seed": self.seed, "shuffle": self.shuffle,
                "buffer_size": self.buffer_size, "rank": self.rank, "world_size": self.world_size}

    def state_dict(self) -> dict:
        """Everything needed to continue this exact stream, as plain JSON-ready values.

        Buffered samples are named by (shard, index) rather than stored, so a state stays small;
        restoring reads those shards again.
        """
        return {
            "format": "reflectionflow.genref.reader/1",
            "settings": self._settings(),
            "position": {"epoch": self._epoch, "shard": self._pos, "index": self._index},
            "rng": self._rng.bit_generator.state,
            "buffers": {s: [[self._shard_ids[r.shard], r.index] for r in buf] for s, buf in self._buffers.items()},
            "samples_drawn": self.samples_drawn,
            "epoch_counts": dict(self._epoch_counts),
            "full_epoch_counts": None if self._full_epoch_counts is None else dict(self._full_epoch_counts),
            "absent": sorted(self._absent),
            "stats": self.stats.to_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("format") != "reflectionflow.genref.reader/1":
            raise GenRefError(f"not a GenRef reader state (format {state.get('format')!r})")
        mine = self._settings()
        differ = [f"{k}: saved {v!r}, now {mine.get(k)!r}" for k, v in state["settings"].items() if mine.get(k) != v]
        if differ:
            raise GenRefError("the reader state was saved with other settings: " + "; ".join(differ))
        buffers = self._reload_buffers(state["buffers"])
        self._reset()
        self._buffers = buffers
        pos = state["position"]
        self._epoch, self._pos, self._index = pos["epoch"], pos["shard"], pos["index"]
        self._rng.bit_generator.state = state["rng"]
        self.samples_drawn = state["samples_drawn"]
        self._epoch_counts = dict(state["epoch_counts"])
        self._full_epoch_counts = None if state["full_epoch_counts"] is None else dict(state["full_epoch_counts"])
        self._absent = set(state["absent"])
        self.stats = ReadStats.from_dict(state["stats"])

    def _reload_buffers(self, saved: Mapping[str, list]) -> dict[str, list[GenRefRecord]]:
        wanted: dict[int, set[int]] = {}
        for refs in saved.values():
            for shard_id, index in refs:
                wanted.setdefault(shard_id, set()).add(index)
        found: dict[tuple[int, int], GenRefRecord] = {}
        for shard_id in sorted(wanted):
            left = set(wanted[shard_id])
            for raw in iter_shard(self.shards[shard_id]):
                if raw.index in left:
                    left.discard(raw.index)
                    try:
                        found[shard_id, raw.index] = parse_record(raw)
                    except CorruptSample:
                        break  # reported as missing below
                if not left:
                    break  # the rest of the shard is not needed
        buffers = {}
        for subset in SUBSETS:
            buffers[subset] = []
            for shard_id, index in saved.get(subset, []):
                if (shard_id, index) not in found:
                    raise GenRefError(f"shard {self.shards[shard_id]} changed since the reader state was saved: "
                                      f"its sample #{index} is gone or no longer readable")
                buffers[subset].append(found[shard_id, index])
        return buffers
