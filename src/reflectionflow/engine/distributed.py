"""One run over many processes, GPUs and nodes: who does which unit of work, and when they wait.

    ctx = DistContext.from_environ(os.environ)     # the CLI only: RANK / WORLD_SIZE / LOCAL_RANK
    with ctx.connected() as ctx:                   # gloo process group when world_size > 1
        mine = ctx.share(units, done=is_done)      # collective: every rank calls it, in the same order
        ...                                        # work on `mine`; one writer per file
        parts = ctx.all_gather(summary)            # collective; then the main rank merges

`accelerate launch` (its torchrun launcher) and `torchrun` start the processes and set the variables;
`mpirun` (accelerate's `--cpu --mpirun_hostfile`) sets its own, read too. Coordination always goes
over gloo (TCP): it needs no GPU, works across nodes, and notices a peer that died at once (its
socket closes), so the long collective timeout below only bounds waiting for a live, slow peer.

Three rules make N processes give exactly what one process gives, and let a run killed with N
processes resume with any other number:
1. A unit's outputs depend only on the unit (for `generate`, on the run seed and the prompt index,
   through every derived seed), never on the rank that runs it or on the units beside it.
2. What is left is read from the folder (done-markers) by rank 0 alone, before anyone writes, and
   every rank takes that one list (a network file system's caches may differ between nodes):
   unit k of it goes to rank k % world_size.
3. One writer per file. Shared files (config.json) are written by rank 0 while the others wait at a
   barrier, a unit's files by the rank that owns it, merged files (ledger.json, report.html) by
   rank 0 after every rank has finished, and they can be rebuilt from the per-unit files alone
   (`reflectionflow report DIR`). A crash therefore leaves only what one process leaves: unfinished
   units, which the next `--resume` deals out again.

Another command reuses this as `generate` does (runner.py: `run`): make units whose outputs depend on
the unit alone (`sweep`: one (method, budget, prompt-group) per unit, each writing its own run folder;
`genref build`: one output shard per unit), `ctx.share(units, done=...)` with "done" read from the
unit's own marker file, write shared files on `ctx.is_main` before a `ctx.barrier()`, and merge on the
main rank after `ctx.all_gather(...)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from ..runtime import is_int

T = TypeVar("T")

# Rendezvous: every process must join within this (a launcher that started fewer processes than it
# announced fails here instead of hanging).
JOIN_TIMEOUT = timedelta(minutes=30)
# Collectives: the final gather waits for the slowest rank to finish its whole share (hours at FLUX
# scale). A peer that dies is noticed at once, whatever this is.
WAIT_TIMEOUT = timedelta(days=7)

# Variable names by launcher: torchrun / accelerate first, then Open MPI, Intel MPI (PMI), MVAPICH.
_RANK = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")
_WORLD = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
_LOCAL = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK")


class DistributedError(RuntimeError):
    """The processes of one run could not agree or lost one of their number."""


class Comm(Protocol):
    def barrier(self) -> None: ...

    def all_gather(self, obj: Any) -> list: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------------------------
# Who does what: pure functions, the same on every rank


def my_share(units: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Unit k goes to rank k % world_size: disjoint, covering, balanced to within one unit."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return list(units[rank::world_size])


def work_units(indices: Sequence[int], group: int = 1) -> list[tuple[int, ...]]:
    """Consecutive runs of `group` indices (the last may be shorter), each searched by one process.

    `generate` uses group 1 (a prompt) unless prompts of a wave share their savings
    (`--early-stop --reallocate prompts`): then the wave of `prompt_batch` prompts is the unit, as
    its prompts' outputs depend on each other. The groups are cut from the whole prompt list, so they
    are the waves a single process would form.
    """
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    idx = list(indices)
    return [tuple(idx[k : k + group]) for k in range(0, len(idx), group)]


# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run; a single process by default (every collective is then local)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # which GPU of its node this process takes
    comm: Comm | None = None  # None: not connected (a single process, or before `connected()`)

    def __post_init__(self):
        for name in ("rank", "world_size", "local_rank"):
            v = getattr(self, name)
            if not is_int(v, 1 if name == "world_size" else 0):
                raise DistributedError(f"{name} must be an integer >= {1 if name == 'world_size' else 0}, got {v!r}")
        if self.rank >= self.world_size:
            raise DistributedError(f"rank {self.rank} is not below world_size {self.world_size}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def label(self) -> str:
        return f"rank {self.rank}/{self.world_size}"

    # The launcher's variables -----------------------------------------------------------------
    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> DistContext:
        """Rank, world size and local rank as the launcher set them (the CLI passes os.environ)."""
        world = _first_int(environ, _WORLD)
        if world is None or world <= 1:
            return cls()
        rank = _first_int(environ, _RANK)
        if rank is None:
            raise DistributedError(f"{_named(environ, _WORLD)} = {world} but no rank is set ({', '.join(_RANK)}); "
                                   f"start the processes with accelerate launch or torchrun")
        local = _first_int(environ, _LOCAL)
        return cls(rank=rank, world_size=world, local_rank=rank if local is None else local)

    # Connecting ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def connected(self, join_timeout: timedelta = JOIN_TIMEOUT,
                  wait_timeout: timedelta = WAIT_TIMEOUT) -> Iterator[DistContext]:
        """This context joined to its peers over gloo for the block (a single process: unchanged)."""
        if not self.distributed or self.comm is not None:
            yield self
            return
        comm = GlooComm(self.rank, self.world_size, join_timeout, wait_timeout)
        try:
            yield replace(self, comm=comm)
        finally:
            comm.close()

    def bind_device(self) -> str | None:
        """Make cuda:<local_rank> this process's current device, so components on "auto" / "cuda" land
        on their own GPU (an explicit device such as cuda:1 is the user's choice). Returns it."""
        if not self.distributed:
            return None
        import torch

        if not torch.cuda.is_available():
            return None
        # A launcher that gives each process one visible GPU leaves device_count() == 1.
        index = self.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return f"cuda:{index}"

    # Collectives (every rank calls them, in the same order) -------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            self._comm().barrier()

    def all_gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        return self._comm().all_gather(obj)

    def agree(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        return self.all_gather(obj if self.is_main else None)[0]

    def check_same(self, what: str, value: Any) -> None:
        """Raise on every rank when some rank's `value` differs from rank 0's (say, started with other flags)."""
        values = self.all_gather(value)
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            raise DistributedError(f"process(es) of rank {', '.join(map(str, odd))} have other {what} than rank 0; "
                                   f"start every process with the same command")

    def share(self, units: Sequence[T], done: Callable[[T], bool] | None = None) -> list[T]:
        """This rank's units among those not done, as rank 0 finds them (the others never call `done`)."""
        pending = self.agree([u for u in units if done is None or not done(u)] if self.is_main else None)
        return my_share(pending, self.rank, self.world_size)

    def _comm(self) -> Comm:
        if self.comm is None:
            raise DistributedError(f"{self.label}: not connected to the other processes; use DistContext.connected()")
        return self.comm


class GlooComm:
    """torch.distributed over gloo: a barrier and an object all-gather, errors made readable."""

    def __init__(self, rank: int, world_size: int, join_timeout: timedelta = JOIN_TIMEOUT,
                 wait_timeout: timedelta = WAIT_TIMEOUT):
        import torch.distributed as td

        if not td.is_available():
            raise DistributedError("this torch build has no torch.distributed; a multi-process run needs it")
        self.rank, self.world_size = rank, world_size
        self._td = td
        self._owns = not td.is_initialized()
        try:
            if self._owns:
                # env://: the address and port the launcher exported (MASTER_ADDR / MASTER_PORT, or the
                # torchrun agent's store); the CLI is what runs this.
                td.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size,
                                      timeout=join_timeout)
            self._group = td.new_group(backend="gloo", timeout=wait_timeout)
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"rank {rank}/{world_size} could not join the other processes: "
                                   f"{_first_line(e)}") from None

    def barrier(self) -> None:
        self._call(lambda: self._td.barrier(group=self._group))

    def all_gather(self, obj: Any) -> list:
        out: list = [None] * self.world_size
        self._call(lambda: self._td.all_gather_object(out, obj, group=self._group))
        return out

    def close(self) -> None:
        if self._owns and self._td.is_initialized():
            self._td.destroy_process_group()

    def _call(self, fn) -> None:
        try:
            fn()
        except RuntimeError as e:
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: another process of this run stopped ({_first_line(e)}); "
                f"what finished is on disk: run the same command again with --resume (any number of "
                f"processes)") from None


def launch_note(environ: Mapping[str, str]) -> str | None:
    """A warning when accelerate was asked for several CPU processes but started one.

    `accelerate launch --cpu --num_processes N` starts N processes only through mpirun
    (`--mpirun_hostfile`); without it, it starts one and exports MASTER_ADDR all the same.
    """
    cpu = str(environ.get("ACCELERATE_USE_CPU", "")).lower() in ("1", "true", "yes")
    if cpu and environ.get("MASTER_ADDR") and _first_int(environ, _WORLD) is None:
        return ("accelerate launch --cpu started a single process (it starts several CPU processes only "
                "through mpirun: --mpirun_hostfile); this process searches every prompt. For N CPU processes "
                "without MPI use: accelerate launch --multi_gpu --num_processes N (torchrun; no GPU needed, "
                "the processes coordinate over gloo)")
    return None


def _first_int(environ: Mapping[str, str], names: Sequence[str]) -> int | None:
    for name in names:
        v = environ.get(name)
        if v is not None and str(v).strip() != "":
            try:
                return int(v)
            except ValueError:
                raise DistributedError(f"environment variable {name}={v!r} is not an integer") from None
    return None


def _named(environ: Mapping[str, str], names: Sequence[str]) -> str:
    return next((n for n in names if environ.get(n)), names[0])


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
