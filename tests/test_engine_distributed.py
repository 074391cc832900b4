"""One run over several processes: disjoint shares, one writer per file, the merged folder equal to a
one-process run byte for byte, and resume after a kill with another number of processes.

The fast tests run the ranks as threads of this process (an in-memory all-gather stands in for
gloo); the last ones launch real processes with `accelerate launch` (its torchrun launcher, gloo).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from reflectionflow.components import build
from reflectionflow.config import RunConfig
from reflectionflow.engine import Components, DistContext, DistributedError, my_share, work_units
from reflectionflow.engine.distributed import launch_note
from reflectionflow.pipeline import generate

from .conftest import STAND_INS
from .test_engine_support import Counting, done_markers, outputs, run, subset_file

# ----------------------------------------------------------------------------------------------
# Who does what


def test_shares_are_disjoint_covering_balanced_and_deterministic():
    units = work_units(range(23))
    for n in (1, 2, 3, 8, 30):
        shares = [my_share(units, r, n) for r in range(n)]
        flat = sorted(u for s in shares for u in s)
        assert flat == units  # every unit once
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert shares == [my_share(units, r, n) for r in range(n)]
    assert my_share(units, 1, 2) == [(i,) for i in range(1, 23, 2)]
    with pytest.raises(ValueError, match="rank 2 is not in"):
        my_share(units, 2, 2)


def test_shared_waves_stay_whole_and_are_the_waves_one_process_cuts():
    assert work_units(range(10), 4) == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    # Whole groups dealt out and put back together cut into the same waves again.
    units = work_units(range(10), 4)
    mine = [i for u in my_share(units, 0, 2) for i in u]
    assert work_units(mine, 4) == [(0, 1, 2, 3), (8, 9)]


def test_context_from_the_launchers_variables():
    assert DistContext.from_environ({}) == DistContext()
    assert DistContext.from_environ({"WORLD_SIZE": "1", "RANK": "0"}).distributed is False
    ctx = DistContext.from_environ({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main) == (5, 8, 1, False)
    mpi = DistContext.from_environ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2",
                                    "OMPI_COMM_WORLD_LOCAL_RANK": "0"})
    assert (mpi.rank, mpi.world_size, mpi.local_rank) == (2, 4, 0)
    with pytest.raises(DistributedError, match="no rank is set"):
        DistContext.from_environ({"WORLD_SIZE": "2"})
    with pytest.raises(DistributedError, match="RANK='x' is not an integer"):
        DistContext.from_environ({"WORLD_SIZE": "2", "RANK": "x"})
    with pytest.raises(DistributedError, match="rank 2 is not below world_size 2"):
        DistContext.from_environ({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(DistributedError, match="not connected"):
        DistContext(rank=0, world_size=2).barrier()
    # accelerate launch --cpu --num_processes 2 without mpirun starts one process: say so.
    assert "single process" in launch_note({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"})
    assert launch_note({"ACCELERATE_USE_CPU": "True"}) is None
    assert launch_note({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "h", "WORLD_SIZE": "2", "RANK": "0"}) is None


# ----------------------------------------------------------------------------------------------
# Ranks as threads


class _Hub:
    """An all-gather between threads; a rank that dies breaks it, as a dead process breaks gloo's."""

    def __init__(self, n: int):
        self.n = n
        self.slots: list = [None] * n
        self.gate = threading.Barrier(n, timeout=60)


class ThreadComm:
    def __init__(self, hub: _Hub, rank: int):
        self.hub, self.rank = hub, rank

    def _wait(self):
        try:
            self.hub.gate.wait()
        except threading.BrokenBarrierError:
            raise DistributedError(f"rank {self.rank}: another process of this run stopped") from None

    def barrier(self):
        self._wait()

    def all_gather(self, obj):
        self.hub.slots[self.rank] = obj
        self._wait()
        out = list(self.hub.slots)
        self._wait()  # nobody overwrites a slot before everyone has read them all
        return out

    def close(self):
        pass


class Die(Exception):
    """A rank's component failing midway (the thread's stand-in for SIGKILL)."""


class DiesAfter(Counting):
    def __init__(self, inner, after: int):
        super().__init__(inner)
        self.after = after

    def correct(self, requests):
        if self.requests + len(requests) > self.after:
            raise Die
        return super().correct(requests)


def _components(corrector=None):
    gen = Counting(build("generator", "world-render"))
    cor = corrector or Counting(build("corrector", "world-edit"))
    return Components(generator=gen, verifier=build("verifier", "world-oracle"),
                      reflector=build("reflector", "world-oracle"), refiner=build("refiner", "world-rule"),
                      corrector=cor), gen, cor


def on_threads(n: int, work) -> list:
    """`work(ctx, r)` for ranks r = 0..n-1 as threads sharing one hub: every rank's result, or the
    exception it raised (a dying rank breaks the hub, as its closed socket breaks gloo)."""
    hub = _Hub(n)
    results: list = [None] * n

    def rank(r: int):
        try:
            results[r] = work(DistContext(rank=r, world_size=n, comm=ThreadComm(hub, r)), r)
        except Exception as e:
            results[r] = e
            hub.gate.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def run_ranks(n: int, out: Path, prompts: Path, resume: bool = False, components=None, **cfg) -> list:
    """Every rank's RunResult (or the exception it raised), ranks as threads."""
    return on_threads(n, lambda ctx, r: generate(RunConfig(progress=False, **cfg), out, prompts=str(prompts),
                                                 resume=resume, components=components[r] if components else None,
                                                 dist=ctx))


CONFIGS = {
    "reflection": dict(method="reflection", budget=6, prompt_batch=2, batch_size=3),
    "reflection-shared": dict(method="reflection", budget=6, early_stop=1.0, reallocate="prompts", backtrack=True,
                              prompt_batch=4, batch_size=5),
    "zero-order": dict(method="zero-order", budget=6, prompt_batch=3),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ranks_together_write_what_one_process_writes(tmp_path, name):
    cfg = CONFIGS[name]
    prompts = subset_file(tmp_path, 2)  # 12 prompts
    ref = tmp_path / "ref"
    run(ref, prompts, **cfg)
    for n in (2, 3):
        out = tmp_path / f"n{n}"
        results = run_ranks(n, out, prompts, **cfg)
        assert all(not isinstance(r, BaseException) for r in results), results
        assert outputs(out) == outputs(ref)
        assert done_markers(out) == done_markers(ref)
        main = results[0]
        assert sorted(main.selected) == list(range(12)) and main.processes == n
        ledger = json.loads((out / "ledger.json").read_text())
        ref_ledger = json.loads((ref / "ledger.json").read_text())
        assert ledger["prompts_done"] == 12 and ledger["totals"]["images"] == ref_ledger["totals"]["images"]
        assert ledger["session"]["processes"] == n
        assert sum(s["prompts"] for s in ledger["session"]["ranks"]) == 12
        assert all(r.ledger == {} for r in results[1:])  # one writer: rank 0 merges
        # Each prompt was searched by one rank only (its share), and the shares cover the run.
        shares = [set(r.selected) for r in results[1:]]
        assert all(not (a & b) for k, a in enumerate(shares) for b in shares[k + 1:])


def test_a_rank_dies_midway_and_the_run_resumes_with_another_count(tmp_path):
    cfg = dict(method="reflection", budget=8, prompt_batch=1, batch_size=4)
    prompts = subset_file(tmp_path, 3)  # 18 prompts
    ref = tmp_path / "ref"
    run(ref, prompts, **cfg)
    total = len(list(ref.glob("*/images/*.png")))
    out = tmp_path / "run"
    # Rank 1's corrector fails in its 4th prompt: 3 prompts done, the 4th's pool and first round on disk.
    comps = [_components()[0], _components(DiesAfter(build("corrector", "world-edit"), after=20))[0]]
    results = run_ranks(2, out, prompts, components=comps, **cfg)
    assert isinstance(results[1], Die)
    assert isinstance(results[0], DistributedError)  # rank 0 finished its share, then could not merge
    done = {p.parent.name for p in out.glob("*/done.json")}
    assert 0 < len(done) < 18
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*/images/*.png")}
    triples = [_components() for _ in range(3)]
    results = run_ranks(3, out, prompts, resume=True, components=[c for c, _, _ in triples], **cfg)
    assert all(not isinstance(r, BaseException) for r in results), results
    assert outputs(out) == outputs(ref) and done_markers(out) == done_markers(ref)
    made = sum(g.requests + c.requests for _, g, c in triples)
    assert made == total - len(before)  # nothing on disk was made again ...
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == v for p, v in before.items())  # ... or rewritten
    assert results[0].resumed and json.loads((out / "ledger.json").read_text())["prompts_done"] == 18


def test_ranks_started_with_other_settings_refuse_before_anything_is_written(tmp_path):
    prompts = subset_file(tmp_path, 1)
    hub = _Hub(2)
    errors: list = [None, None]

    def rank(r):
        try:
            generate(RunConfig(progress=False, budget=4 + 2 * r), tmp_path / "out", prompts=str(prompts),
                     dist=DistContext(rank=r, world_size=2, comm=ThreadComm(hub, r)))
        except Exception as e:
            errors[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(e, DistributedError) and "rank 1 have other run settings" in str(e) for e in errors)
    assert not (tmp_path / "out").exists()


def test_report_rebuilds_the_merged_ledger_from_the_prompt_folders(tmp_path, cli):
    prompts = subset_file(tmp_path, 1)
    out = tmp_path / "run"
    assert all(not isinstance(r, BaseException) for r in run_ranks(3, out, prompts, budget=4))
    merged = json.loads((out / "ledger.json").read_text())
    assert "last session: 3 processes" in (out / "report.html").read_text()
    (out / "ledger.json").unlink()
    (out / "report.html").unlink()
    code, stdout, err = cli("report", out)
    assert code == 0, err
    rebuilt = json.loads((out / "ledger.json").read_text())
    assert rebuilt["per_prompt"] == merged["per_prompt"] and rebuilt["totals"] == merged["totals"]
    assert (out / "report.html").is_file() and "6/6 prompts, 24 images" in stdout


# ----------------------------------------------------------------------------------------------
# Real processes: accelerate launch (torchrun + gloo on the CPU)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(n: int, tmp_path: Path, *argv, judges: bool = True) -> list[str]:
    # judges=False leaves the verifier and reflector to --config (STAND_INS names the oracle ones).
    # On a CPU, `--cpu --num_processes N` starts N processes only through mpirun; accelerate's torchrun
    # launcher (--multi_gpu, no GPU needed) starts them anywhere, and the processes talk over gloo.
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "reflectionflow", "generate",
            *(STAND_INS if judges else STAND_INS[:4]), *map(str, argv)]


def _env(tmp_path: Path) -> dict:
    # No accelerate config file of the machine's user may change the launch.
    return os.environ | {"HF_HOME": str(tmp_path / "hf"), "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_accelerate_two_processes_equal_one(tmp_path):
    pytest.importorskip("accelerate")
    prompts = subset_file(tmp_path, 2)  # 12 prompts
    ref = tmp_path / "ref"
    run(ref, prompts, budget=4)
    out = tmp_path / "two"
    res = subprocess.run(_launch(2, tmp_path, "--prompts", prompts, "--budget", "4", "--out", out, "--quiet"),
                         capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert outputs(out) == outputs(ref) and outputs(out)  # image bytes, selections, traces
    assert done_markers(out) == done_markers(ref)
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["prompts_done"] == 12 and ledger["session"]["processes"] == 2
    assert (out / "report.html").is_file()
    assert res.stdout.count("12/12 prompts") == 1 and "2 processes" in res.stdout  # rank 0 reports


def _rank_pid(launcher: int, rank: int) -> int | None:
    import psutil

    for child in psutil.Process(launcher).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "reflectionflow" in " ".join(child.cmdline()):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.slow
def test_accelerate_kill_one_process_then_resume_with_three(tmp_path):
    pytest.importorskip("accelerate")
    pytest.importorskip("psutil")
    prompts = subset_file(tmp_path, 6)  # 36 prompts
    argv = ["--prompts", prompts, "--budget", "8", "--quiet", "--prompt-batch", "1", "--batch-size", "4"]
    ref = tmp_path / "ref"
    run(ref, prompts, budget=8)
    out = tmp_path / "run"
    proc = subprocess.Popen(_launch(2, tmp_path, *argv, "--out", out), env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rank1 = [i for (i,) in my_share(work_units(range(36)), 1, 2)]  # a fresh run deals odd prompts to rank 1
    pid, deadline = None, time.monotonic() + 90
    try:
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before rank 1 could be killed"
            pid = pid or _rank_pid(proc.pid, 1)
            if pid and any((out / f"{i:05d}" / "done.json").exists() for i in rank1):
                os.kill(pid, signal.SIGKILL)  # rank 1, after its first prompt
                break
            time.sleep(0.002)
        proc.wait(timeout=60)  # the launcher stops the other rank too
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode != 0
    left = [i for i in range(36) if not (out / f"{i:05d}" / "done.json").exists()]
    assert left and any(i in rank1 for i in left), "rank 1 finished before the kill"
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*/images/*.png")}

    res = subprocess.run(_launch(3, tmp_path, *argv, "--out", out, "--resume"), capture_output=True, text=True,
                         env=_env(tmp_path), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert outputs(out) == outputs(ref) and done_markers(out) == done_markers(ref)
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == v for p, v in before.items())  # nothing redone
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["prompts_done"] == 36 and ledger["session"]["processes"] == 3 and ledger["session"]["resumed"]
    assert sum(r["prompts"] for r in ledger["session"]["ranks"]) == len(left)
    assert not list(out.rglob(".*.tmp"))


@pytest.mark.slow
def test_one_judge_server_shared_by_every_process(tmp_path):
    """docs/scale-out.md's recipe: one OpenAI-compatible server (vLLM there; `reflectionflow serve`,
    the world's judges, here), every generator process pointed at it."""
    pytest.importorskip("accelerate")
    import reflectionflow.backends.vlm.registry  # noqa: F401 (registers the VLM components, as the command line does)

    server = subprocess.Popen([sys.executable, "-u", "-m", "reflectionflow", "serve", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        url = line.split(" at ")[1].split()[0]
        vlm = {"url": url, "model": "reflectionflow-world", "concurrency": 4}
        conf = tmp_path / "vlm.json"
        conf.write_text(json.dumps({"verifier": "vlm-yesno", "reflector": "vlm", "refiner": "vlm",
                                    "options": {"verifier": vlm, "reflector": vlm, "refiner": vlm}}))
        prompts = subset_file(tmp_path, 1)  # 6 prompts
        ref = tmp_path / "ref"
        config = json.loads(conf.read_text())
        run(ref, prompts, budget=4, **config)
        out = tmp_path / "two"
        argv = ["--prompts", prompts, "--config", conf, "--budget", "4", "--out", out, "--quiet"]
        res = subprocess.run(_launch(2, tmp_path, *argv, judges=False), capture_output=True, text=True,
                             env=_env(tmp_path), timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
    finally:
        server.terminate()
        server.communicate(timeout=30)
    assert outputs(out) == outputs(ref)
    ledger = json.loads((out / "ledger.json").read_text())
    ref_ledger = json.loads((ref / "ledger.json").read_text())
    assert ledger["totals"]["vlm_calls"] == ref_ledger["totals"]["vlm_calls"] > 0
    assert all(r["prompts"] == 3 for r in ledger["session"]["ranks"])  # both processes asked the one server


_GLOO_RANK = """
import os, sys
from reflectionflow.engine import DistContext, DistributedError
ctx = DistContext(rank=int(sys.argv[1]), world_size=2)
with ctx.connected() as ctx:
    print(ctx.all_gather({"rank": ctx.rank}), flush=True)
    if ctx.rank == 1:
        os._exit(0)  # dies without a word, as a killed process does
    try:
        ctx.barrier()
    except DistributedError as e:
        print("ERROR", e, flush=True)
"""


@pytest.mark.slow
def test_gloo_gathers_in_rank_order_and_names_a_dead_peer(tmp_path):
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", _GLOO_RANK, str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all("[{'rank': 0}, {'rank': 1}]" in o for o in outs), outs
    assert "ERROR rank 0/2: another process of this run stopped" in outs[0] and "--resume" in outs[0], outs[0]
