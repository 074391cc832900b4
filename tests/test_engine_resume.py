"""Determinism and resume: a run killed at any moment and resumed equals an uninterrupted one, and
the resumed run regenerates nothing that is already on disk."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from reflectionflow import io, runs
from reflectionflow.components import build
from reflectionflow.engine import Components
from reflectionflow.runs import RunFolderError

from .conftest import STAND_INS
from .test_engine_support import Counting, done_markers, outputs, run, subset_file

CONFIGS = {
    "reflection-shared": dict(method="reflection", budget=6, early_stop=1.0, reallocate="prompts", backtrack=True,
                              prompt_batch=4, batch_size=5),
    "zero-order": dict(method="zero-order", budget=6, prompt_batch=3),
}


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the engine may catch it."""


class Killer:
    """Counts file writes; at the chosen one, writes part of it (as a kill mid-write would) and dies."""

    def __init__(self, at: int | None):
        self.at, self.n = at, 0

    def tick(self) -> bool:
        self.n += 1
        return self.at is not None and self.n == self.at


def _install(monkeypatch, killer: Killer):
    real_atomic, real_append, real_replacing = io.atomic_write_bytes, runs.RunFolder.append_trace, runs.write_replacing

    def atomic(path, data):
        if killer.tick():
            tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data[: len(data) // 2])
            raise Killed
        real_atomic(path, data)

    def replacing(path, data):
        if killer.tick():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp"), "wb") as f:
                f.write(data[: len(data) // 3])
            raise Killed
        real_replacing(path, data)

    def append(self, i, records):
        if records and killer.tick():
            import json

            data = "".join(json.dumps(r) + "\n" for r in records)
            path = self.trace_path(i)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(data[: max(1, len(data) * 2 // 3)])  # a torn line
            raise Killed
        real_append(self, i, records)

    monkeypatch.setattr(io, "atomic_write_bytes", atomic)
    monkeypatch.setattr(runs, "atomic_write_bytes", atomic)
    monkeypatch.setattr(runs.RunFolder, "append_trace", append)
    monkeypatch.setattr(runs, "write_replacing", replacing)


def _counting_components():
    gen = Counting(build("generator", "world-render"))
    cor = Counting(build("corrector", "world-edit"))
    comps = Components(generator=gen, verifier=build("verifier", "world-oracle"),
                       reflector=build("reflector", "world-oracle"), refiner=build("refiner", "world-rule"),
                       corrector=cor)
    return comps, gen, cor


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_resume_after_kills_at_random_points_is_byte_identical(tmp_path, monkeypatch, name):
    cfg = CONFIGS[name]
    prompts = subset_file(tmp_path, 2)  # 12 prompts, several waves
    ref = tmp_path / "ref"
    run(ref, prompts, report=True, **cfg)
    again = tmp_path / "again"
    run(again, prompts, **cfg)
    assert outputs(again) == outputs(ref)  # the same command gives the same bytes
    expected, markers = outputs(ref), done_markers(ref)
    total_images = len(list(ref.glob("*/images/*.png")))

    counter = Killer(None)
    with monkeypatch.context() as m:
        _install(m, counter)
        run(tmp_path / "count", prompts, report=True, **cfg)
    writes = counter.n
    rng = random.Random(7)
    points = sorted(rng.sample(range(1, writes + 1), 7)) + [1, writes]
    for k in points:
        out = tmp_path / f"kill{k}"
        with monkeypatch.context() as m:
            _install(m, Killer(k))
            with pytest.raises(Killed):
                run(out, prompts, report=True, **cfg)
        on_disk = len(list(out.glob("*/images/*.png")))
        comps, gen, cor = _counting_components()
        run(out, prompts, report=True, resume=True, components=comps, **cfg)
        assert outputs(out) == expected, f"killed at write {k}/{writes}"
        assert done_markers(out) == markers
        # Nothing already on disk was made again.
        assert gen.requests + cor.requests == total_images - on_disk, f"killed at write {k}/{writes}"
        assert (out / "report.html").is_file() and (out / "ledger.json").is_file()
        assert not list(out.rglob(".*.tmp"))  # what the killed writer left half-written is gone


def test_resume_of_a_finished_run_calls_no_component(tmp_path):
    prompts = subset_file(tmp_path, 1)
    out = tmp_path / "run"
    run(out, prompts, method="reflection", budget=8)
    before = outputs(out)
    comps, gen, cor = _counting_components()
    # Execution settings may change on resume; search settings may not.
    run(out, prompts, method="reflection", budget=8, batch_size=3, resume=True, components=comps)
    assert gen.requests == cor.requests == 0 and outputs(out) == before
    with pytest.raises(RunFolderError, match=r"budget: 8 -> 9"):
        run(out, prompts, method="reflection", budget=9, resume=True)
    with pytest.raises(RunFolderError, match="already holds a run with the same config; pass --resume"):
        run(out, prompts, method="reflection", budget=8)
    assert outputs(out) == before


def test_batching_across_prompts_and_chains_does_not_change_outputs(tmp_path):
    prompts = subset_file(tmp_path, 2)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run(a, prompts, method="reflection", budget=8)
    run(b, prompts, method="reflection", budget=8, batch_size=1, prompt_batch=1)
    run(c, prompts, method="reflection", budget=8, batch_size=7, prompt_batch=5, workers=3)
    assert outputs(a) == outputs(b) == outputs(c)


@pytest.mark.slow
def test_sigkill_then_resume_from_the_command_line(tmp_path):
    prompts = subset_file(tmp_path, 4)
    base = [sys.executable, "-m", "reflectionflow", "generate", *STAND_INS, "--prompts", str(prompts), "--budget", "8",
            "--quiet", "--early-stop", "1.0", "--reallocate", "prompts", "--prompt-batch", "6", "--batch-size", "4"]
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    subprocess.run(base + ["--out", str(ref)], check=True, capture_output=True)
    took = time.perf_counter() - t0
    rng = random.Random(3)
    for attempt in range(2):
        out = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen(base + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, max(0.4, took * 0.9)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        res = subprocess.run(base + ["--out", str(out), "--resume"], capture_output=True, text=True)
        if not out.exists():  # killed before it wrote anything: --resume is an error, the run starts anew
            assert res.returncode == 2 and "no such run folder" in res.stderr, res.stderr
            res = subprocess.run(base + ["--out", str(out)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert outputs(out) == outputs(ref)
        assert done_markers(out) == done_markers(ref)
