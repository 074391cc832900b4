"""GenRef data layer: shard lists, damage-tolerant reading, the subset mix, resuming, writing."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from reflectionflow.data.genref import (
    SUBSETS,
    GenRefError,
    GenRefReader,
    MixSchedule,
    iter_genref,
)
from reflectionflow.data.preview import inspect_shards
from reflectionflow.data.shards import ShardError, resolve_shards
from reflectionflow.data.writer import CoTRecord, CoTWriter, GenRefWriter, read_cot


def triplets(n: int, seed: int = 0, subsets=SUBSETS):
    """n small random triplets, subsets in turn; the same seed gives the same triplets."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield {
            "prompt": f"a photo of {i} circles",
            "reflection": f"Add {i % 3 + 1} red circle(s) on the left",
            "subset": subsets[i % len(subsets)],
            "good": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
            "bad": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
        }


def write_dataset(out: Path, n: int, per_shard: int, seed: int = 0, subsets=SUBSETS, **kw) -> list[str]:
    with GenRefWriter(out, max_samples_per_shard=per_shard, **kw) as w:
        return [w.write(**t) for t in triplets(n, seed, subsets)]


def tar_with(path: Path, samples: list[dict[str, bytes]]) -> None:
    """A shard written by hand, for samples the writer refuses to make."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            key = s.pop("__key__")
            for name, data in s.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def png(seed: int) -> bytes:
    from reflectionflow.io import png_bytes

    return png_bytes(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8))


def good_fields(key: str, subset: str = "general") -> dict[str, bytes]:
    return {"__key__": key, "bad_image.png": png(1), "good_image.png": png(2),
            "prompt.txt": b"a photo of a ring", "reflection.txt": b"Add a ring", "subset.txt": subset.encode()}


# -- shard lists ----------------------------------------------------------------------------------


def test_brace_glob_directory_and_url_patterns(tmp_path):
    write_dataset(tmp_path, 12, per_shard=1)  # genref_0.tar ... genref_11.tar
    braced = resolve_shards(str(tmp_path / "genref_{0..11}.tar"))
    assert [Path(p).name for p in braced] == [f"genref_{i}.tar" for i in range(12)]
    # Globs and directories sort like brace ranges: genref_2 before genref_10.
    assert resolve_shards(str(tmp_path / "genref_*.tar")) == braced
    assert resolve_shards(tmp_path) == braced
    assert resolve_shards(f"{tmp_path}/genref_{{0..1}}.tar::{tmp_path}/genref_5.tar") == braced[:2] + [braced[5]]
    # URLs are expanded, never fetched.
    urls = resolve_shards("pipe:curl -s -f -L https://example.org/genref_{0..208}.tar")
    assert len(urls) == 209 and urls[10] == "pipe:curl -s -f -L https://example.org/genref_10.tar"
    assert resolve_shards(["https://example.org/a.tar", "s3://bucket/b.tar"]) == [
        "https://example.org/a.tar", "s3://bucket/b.tar"]


def test_missing_shards_are_errors(tmp_path):
    write_dataset(tmp_path, 3, per_shard=1)
    with pytest.raises(ShardError, match="no shard matches"):
        resolve_shards(str(tmp_path / "other_{0..3}.tar"))
    with pytest.raises(ShardError, match="2 of 5 shards"):
        resolve_shards(str(tmp_path / "genref_{0..4}.tar"))
    with pytest.raises(ShardError, match="does not exist"):
        resolve_shards(str(tmp_path / "nowhere" / "*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="holds no shards"):
        resolve_shards(tmp_path / "empty")


# -- reading --------------------------------------------------------------------------------------


def test_inspect_counts_match_what_was_written(tmp_path):
    keys = write_dataset(tmp_path, 22, per_shard=5, image_format="jpeg")
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [f"genref_{i}.tar" for i in range(5)]
    report = inspect_shards(str(tmp_path / "genref_{0..4}.tar")).to_dict()
    assert report["samples"] == 22 and report["shards"] == 5
    assert report["subsets"] == {"general": 6, "length": 6, "rule": 5, "editing": 5}
    assert report["corrupt"]["count"] == 0
    samples = list(iter_genref(tmp_path))
    assert [s.key for s in samples] == keys
    first = samples[0]
    assert first.good.dtype == np.uint8 and first.good.shape == (8, 8, 3)
    assert (first.prompt, first.subset) == ("a photo of 0 circles", "general")
    assert first.source_shard.endswith("genref_0.tar")


def test_corrupt_samples_and_truncated_tar_are_skipped_and_counted(tmp_path):
    write_dataset(tmp_path, 8, per_shard=8)  # genref_0.tar, intact
    broken = good_fields("b3")
    broken["good_image.png"] = b"\x89PNG\r\n\x1a\n" + b"not really a png"
    missing = good_fields("b1")
    del missing["reflection.txt"]
    tar_with(tmp_path / "genref_1.tar", [good_fields("b0"), missing, good_fields("b2", "painting"), broken,
                                         good_fields("b4", "editing")])
    # A copy of an intact shard cut in the middle of a member.
    whole = (tmp_path / "genref_0.tar").read_bytes()
    cut = len(whole) // 2 + 100
    (tmp_path / "genref_2.tar").write_bytes(whole[:cut])
    with tarfile.open(tmp_path / "genref_0.tar") as tar:
        ends: dict[str, int] = {}
        for m in tar.getmembers():
            ends[m.name.split(".")[0]] = m.offset_data + m.size
    complete_before_cut = sum(end <= cut for end in ends.values())
    assert 0 < complete_before_cut < 8

    report = inspect_shards(tmp_path).to_dict()
    assert report["samples"] == 8 + 2 + complete_before_cut
    assert report["corrupt"]["reasons"] == {"missing_key": 1, "truncated_tar": 1, "undecodable_image": 1,
                                            "unknown_subset": 1}
    assert report["corrupt"]["count"] == 4 and report["corrupt"]["shards"] == 1
    by_reason = {item["reason"]: item for item in report["corrupt"]["items"]}
    assert by_reason["missing_key"]["key"] == "b1" and "reflection.txt" in by_reason["missing_key"]["detail"]
    assert by_reason["unknown_subset"]["key"] == "b2"
    assert by_reason["truncated_tar"]["shard"].endswith("genref_2.tar")

    # The training reader skips the same samples and serves every other one exactly once.
    reader = GenRefReader(tmp_path, shuffle=False, epochs=1, buffer_size=100,
                          mix=MixSchedule.constant(dict.fromkeys(SUBSETS, 1.0)))
    served = list(reader)
    assert len(served) == report["samples"]
    assert reader.stats.corrupt == report["corrupt"]["reasons"]
    assert reader.stats.read == report["read"]


def test_empty_or_unreadable_shards_only(tmp_path):
    (tmp_path / "genref_0.tar").write_bytes(b"")
    (tmp_path / "genref_1.tar").write_bytes(b"garbage" * 100)
    report = inspect_shards(tmp_path).to_dict()
    assert report["samples"] == 0 and report["corrupt"]["reasons"] == {"unreadable_shard": 2}
    with pytest.raises(GenRefError, match="no readable GenRef sample"):
        GenRefReader(tmp_path).draw()


# -- the subset mix -------------------------------------------------------------------------------


def test_default_schedule_is_the_original_warm_up():
    mix = MixSchedule()
    assert mix.weights(0) == pytest.approx({"general": 0.1, "length": 0.1, "rule": 0.1, "editing": 0.7})
    assert mix.weights(2500) == pytest.approx({"general": 0.2, "length": 0.2, "rule": 0.25, "editing": 0.35})
    for step in (5000, 10**7):
        assert mix.weights(step) == pytest.approx({"general": 0.3, "length": 0.3, "rule": 0.4, "editing": 0.0})
    original = {"training_stages": [0, 5000], "split_ratios": {"general": [0.1, 0.3], "length": [0.1, 0.3],
                                                               "rule": [0.1, 0.4], "editing": [0.7, 0.0]}}
    assert MixSchedule.from_dict(original) == mix
    assert MixSchedule.from_dict(mix.to_dict()) == mix
    with pytest.raises(GenRefError, match="unknown subset"):
        MixSchedule.constant({"paintings": 1.0})
    with pytest.raises(GenRefError, match="increase"):
        MixSchedule(stages=(0, 0), ratios={"general": (1, 1)})


def test_draws_follow_the_schedule(tmp_path):
    # Equal shares on disk, so the proportions drawn come from the mix alone.
    write_dataset(tmp_path, 160, per_shard=20)
    reader = GenRefReader(tmp_path, seed=3, buffer_size=16)
    n = 1200
    for step, expected in ((0, (0.1, 0.1, 0.1, 0.7)), (5000, (0.3, 0.3, 0.4, 0.0)), (9000, (0.3, 0.3, 0.4, 0.0))):
        counts = Counter(reader.draw(step).subset for _ in range(n))
        for subset, p in zip(SUBSETS, expected):
            # binomial standard deviation is at most 0.0145 here; 0.05 is over three of them
            assert abs(counts[subset] / n - p) < 0.05, (step, subset, counts)
    assert counts["editing"] == 0


def test_one_pass_serves_every_subset(tmp_path):
    write_dataset(tmp_path, 40, per_shard=10)
    reader = GenRefReader(tmp_path, seed=0, epochs=1, buffer_size=64,
                          mix=MixSchedule.constant({"general": 1, "length": 1, "rule": 1, "editing": 1}))
    served = list(reader)
    assert len(served) == 40 and len({s.key for s in served}) == 40
    assert reader.stats.read == 40 and reader.stats.shards == 4  # each shard read once


def test_absent_subset_gives_way_and_an_impossible_mix_is_an_error(tmp_path):
    write_dataset(tmp_path, 12, per_shard=6, subsets=("general", "editing"))
    reader = GenRefReader(tmp_path, seed=0, buffer_size=4)
    assert {reader.draw(0).subset for _ in range(50)} == {"general", "editing"}
    assert reader.present_subsets() == ["general", "editing"]
    with pytest.raises(GenRefError, match="do not hold"):
        GenRefReader(tmp_path, mix=MixSchedule.constant({"rule": 1.0})).draw()


# -- resuming -------------------------------------------------------------------------------------


def _reader(path, **kw) -> GenRefReader:
    # A short warm-up and a small data set, so the mix changes and epochs turn over within the run.
    mix = MixSchedule(stages=(0, 30), ratios={"general": (0.1, 0.3), "length": (0.1, 0.3),
                                              "rule": (0.1, 0.4), "editing": (0.7, 0.0)})
    return GenRefReader(path, seed=7, buffer_size=6, mix=mix, samples_per_step=2, **kw)


@pytest.mark.parametrize("shuffle", [True, False])
def test_resume_sees_the_same_data_order(tmp_path, shuffle):
    write_dataset(tmp_path, 37, per_shard=5)  # 8 shards, the last one short
    total = 160
    uninterrupted = _reader(tmp_path, shuffle=shuffle)
    expected = [uninterrupted.draw().key for _ in range(total)]
    assert uninterrupted.stats.shards > 8  # more than one epoch
    for stop in (0, 1, 23, 97):
        first = _reader(tmp_path, shuffle=shuffle)
        keys = [first.draw().key for _ in range(stop)]
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
        resumed = _reader(tmp_path, shuffle=shuffle)
        resumed.load_state_dict(state)
        keys += [resumed.draw().key for _ in range(total - stop)]
        assert keys == expected, f"resumed after {stop} draws"
        assert resumed.stats.to_dict() == uninterrupted.stats.to_dict()


def test_resume_with_other_settings_is_refused(tmp_path):
    write_dataset(tmp_path, 10, per_shard=5)
    reader = _reader(tmp_path)
    reader.draw()
    other = GenRefReader(tmp_path, seed=8, buffer_size=6)
    with pytest.raises(GenRefError, match="seed: saved 7, now 8"):
        other.load_state_dict(reader.state_dict())


def test_rank_split_takes_disjoint_shards(tmp_path):
    write_dataset(tmp_path, 16, per_shard=4)
    mix = MixSchedule.constant(dict.fromkeys(SUBSETS, 1.0))
    seen = [{s.source_shard for s in GenRefReader(tmp_path, epochs=1, mix=mix, rank=r, world_size=2)}
            for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 2 and not seen[0] & seen[1]


# -- writing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_writer_is_byte_identical_across_runs(tmp_path, image_format):
    for run in ("a", "b"):
        write_dataset(tmp_path / run, 11, per_shard=4, seed=5, image_format=image_format)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["genref_0.tar", "genref_1.tar", "genref_2.tar"]  # no temporary files left
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with tarfile.open(tmp_path / "a" / "genref_0.tar") as tar:
        members = tar.getmembers()
    ext = "png" if image_format == "png" else "jpg"
    assert [m.name for m in members[:5]] == [f"000000000.{f}" for f in (
        f"bad_image.{ext}", f"good_image.{ext}", "prompt.txt", "reflection.txt", "subset.txt")]
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "")}


def test_writer_resumes_after_a_crash(tmp_path):
    write_dataset(tmp_path / "whole", 11, per_shard=4)
    data = list(triplets(11))
    with pytest.raises(RuntimeError), GenRefWriter(tmp_path / "crash", max_samples_per_shard=4) as w:
        for t in data[:10]:
            w.write(**t)
        raise RuntimeError("killed")
    assert sorted(p.name for p in (tmp_path / "crash").iterdir()) == ["genref_0.tar", "genref_1.tar"]
    with GenRefWriter(tmp_path / "crash", max_samples_per_shard=4) as w:
        assert [p.name for p in w.complete_shards] == ["genref_0.tar", "genref_1.tar"]
        assert w.samples_committed == 8
        for t in data[w.samples_committed:]:
            w.write(**t)
    for name in ("genref_0.tar", "genref_1.tar", "genref_2.tar"):
        assert (tmp_path / "crash" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    # Shards of another run (another shard size) are not silently mixed in.
    with pytest.raises(GenRefError, match="another run"):
        GenRefWriter(tmp_path / "crash", max_samples_per_shard=2)


def test_writer_rejects_bad_input(tmp_path):
    w = GenRefWriter(tmp_path)
    t = next(triplets(1))
    with pytest.raises(GenRefError, match="subset"):
        w.write(**(t | {"subset": "painting"}))
    with pytest.raises(GenRefError, match="without dots"):
        w.write(**t, key="a.b")
    with pytest.raises(GenRefError, match="uint8"):
        w.write(**(t | {"good": np.zeros((8, 8, 3), np.float32)}))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_cot_jsonl_round_trip(tmp_path):
    records = [CoTRecord("a photo of two rings", "Only one ring is visible.", ["Add a ring on the right"],
                         "incorrect", {"image": "images/0.png"}),
               {"prompt": "a red square", "analysis": "The square is red.", "instructions": "", "result": "correct"}]
    with CoTWriter(tmp_path / "cot.jsonl") as w:
        for r in records:
            w.write(r)
    lines = (tmp_path / "cot.jsonl").read_text().splitlines()
    assert list(json.loads(lines[0])) == ["prompt", "analysis", "instructions", "result", "image"]
    back = read_cot(tmp_path / "cot.jsonl")
    assert back[0] == records[0] and back[1].result == "correct"
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(GenRefError, match="bad.jsonl:1"):
        read_cot(tmp_path / "bad.jsonl")


def test_pipe_urls_go_through_webdataset(tmp_path):
    pytest.importorskip("webdataset")
    keys = write_dataset(tmp_path, 6, per_shard=3)
    urls = f"pipe:cat {tmp_path}/genref_{{0..1}}.tar"  # a local command: no network involved
    assert [s.key for s in iter_genref(urls)] == keys
    report = inspect_shards(f"pipe:cat {tmp_path}/missing.tar").to_dict()
    assert report["corrupt"]["reasons"] == {"unreadable_shard": 1}
