"""`genref build` over several processes: each makes its own shards, rank 0 merges the CoT parts, and
the folder equals a one-process build (the samples, key for key and byte for byte, and the merged
CoT); a build killed midway resumes with another number of processes without redoing a shard.

Ranks run as threads here (tests/test_engine_distributed.py's in-memory all-gather); the last test
launches real processes with `accelerate launch`."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pytest

from reflectionflow.data.build import BuildConfig, build_genref
from reflectionflow.engine import DistributedError

from .test_engine_distributed import _env, _free_port, on_threads

pytest.importorskip("webdataset")

N, SHARD = 14, 3  # 5 shards, the last one short
MIX = {"rule": 1.0, "reward": 1.0, "length": 1.0, "editing": 1.0}


def config(out, n=N) -> BuildConfig:
    return BuildConfig(out=str(out), n=n, mix=dict(MIX), shard_size=SHARD, samples_per_prompt=2)


def samples(folder) -> dict[str, bytes]:
    """(key.field -> bytes) over every shard: the sample content, whatever shard holds it."""
    out = {}
    for shard in sorted(folder.glob("genref_*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                out[m.name] = tar.extractfile(m).read()
    return out


def files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_ranks(n: int, out, components=None, size=N) -> list:
    return on_threads(n, lambda ctx, r: build_genref(config(out, size), progress=False, dist=ctx,
                                                     components=components[r] if components else None))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = tmp_path_factory.mktemp("genref-ref") / "one"
    summary = build_genref(config(ref), progress=False)
    assert summary["shards"] == 5 and summary["processes"] == 1
    return ref


@pytest.mark.parametrize("n", [2, 3])
def test_ranks_together_write_what_one_process_writes(reference, tmp_path, n):
    out = tmp_path / "out"
    results = run_ranks(n, out)
    assert all(not isinstance(r, BaseException) for r in results), results
    assert samples(out) == samples(reference) and len(samples(out)) == 5 * N
    assert (out / "genref_cot.jsonl").read_bytes() == (reference / "genref_cot.jsonl").read_bytes()
    assert files(out) == files(reference)  # shards, CoT parts, build.json: byte for byte
    main = results[0]
    assert main["processes"] == n and main["written_now"] == N and main["resumed_at"] == 0
    shares = [r["shards"] for r in results[1:]] + [5 - sum(r["shards"] for r in results[1:])]
    assert sum(shares) == 5 and max(shares) - min(shares) <= 1  # shards dealt out, none twice
    assert not list(out.rglob(".*.tmp"))


class Dies(Exception):
    pass


class DiesAfter:
    """A generator that fails on its (after+1)-th call, midway through its rank's second shard."""

    def __init__(self, after: int):
        from reflectionflow.backends.world.simulated import RenderGenerator

        self.inner, self.after, self.calls = RenderGenerator(), after, 0

    def generate(self, requests):
        self.calls += 1
        if self.calls > self.after:
            raise Dies
        return self.inner.generate(requests)


def test_a_rank_dies_midway_and_the_build_resumes_with_another_count(reference, tmp_path):
    out = tmp_path / "out"
    results = run_ranks(2, out, components=[None, {"generator": DiesAfter(1)}])
    assert isinstance(results[1], Dies) and isinstance(results[0], DistributedError)
    done = sorted(p.name for p in out.glob("genref_*.tar"))
    assert 0 < len(done) < 5 and not (out / "genref_cot.jsonl").exists()
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("genref_*.tar")}
    results = run_ranks(3, out)
    assert all(not isinstance(r, BaseException) for r in results), results
    sizes = {f"genref_{k}.tar": min(SHARD, N - k * SHARD) for k in range(5)}
    assert results[0]["resumed_at"] == sum(sizes[name] for name in done) and results[0]["processes"] == 3
    assert files(out) == files(reference)
    assert all((out / name).stat().st_ino == ino and (out / name).stat().st_mtime_ns == t
               for name, (ino, t) in before.items())  # a finished shard is never made again
    # Resumed once more with one process and a larger --n: only the short last shard and new ones.
    results = run_ranks(1, out, size=N + 4)
    assert results[0]["resumed_at"] == 12 and results[0]["samples"] == N + 4


def test_merge_command_checks_and_rebuilds_the_merged_cot(reference, tmp_path, cli):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    (out / "genref_cot.jsonl").unlink()
    code, stdout, err = cli("genref", "merge", out)
    assert code == 0, err
    assert json.loads(stdout)["samples"] == N
    assert (out / "genref_cot.jsonl").read_bytes() == (reference / "genref_cot.jsonl").read_bytes()
    (out / "genref_2.tar").unlink()
    code, _, err = cli("genref", "merge", out)
    assert code == 2 and "genref_2.tar missing" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_accelerate_two_processes_equal_one(reference, tmp_path):
    pytest.importorskip("accelerate")
    out = tmp_path / "two"
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "reflectionflow", "genref", "build", "--no-generator",
            "--out", str(out), "--n", str(N), "--shard-size", str(SHARD), "--samples-per-prompt", "2",
            "--mix", ",".join(f"{k}={v}" for k, v in MIX.items()), "--quiet"]
    res = subprocess.run(argv, capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert files(out) == files(reference)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["processes"] == 2  # rank 0 reports
