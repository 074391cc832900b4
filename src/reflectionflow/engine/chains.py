"""The prompt and reflection axes: chains of images, advanced in lockstep.

`prompt`: N chains over M rounds. Round 0 of chain c generates from the original prompt; every
later round refines the chain's prompt from its latest image and verdict, then generates with
fresh noise. Images are always scored against the ORIGINAL prompt.

`reflection` (ReflectionFlow): an initial pool of P noise samples; the best N start N chains;
each round writes a reflection on the chain's image, refines the chain's prompt with it and lets
the corrector edit the image. The verifier then picks the best image over everything produced.
Options the original lacks:
- backtrack: correct the chain's best image so far instead of its latest (the original always
  continues from the latest, even when a correction made it worse);
- early_stop: a chain stops once the verifier is confident about one of its images; its unspent
  rounds go to the prompt's chains that still fail (reallocate=chains), and a prompt whose chains
  all stopped gives its rest to the prompts of its wave that still fail (reallocate=prompts).
Without early stopping every chain runs exactly `depth` rounds: pool + chains x depth = budget.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from .candidates import Candidate, Make, NeedBudget, best, confident, ranked
from .context import PromptContext
from .noise import make_noise


@dataclass
class Chain:
    index: int
    latest: Candidate
    best: Candidate
    prompt: str  # the chain's current (possibly refined) prompt
    depth: int = 0  # rounds made
    stopped_at: int | None = None  # depth at which the verifier was confident
    members: list[str] = field(default_factory=list)

    def add(self, c: Candidate) -> None:
        self.latest = c
        self.best = best([self.best, c])
        self.prompt = c.prompt
        self.depth += 1
        self.members.append(c.id)


def chain_id(chain: int, round: int) -> str:
    return f"c{chain:02d}r{round:04d}"


def run_chains(ctx: PromptContext, chains: list[Chain], left: int,
               step: Callable[[Chain], Make]) -> Generator[list[Make] | NeedBudget, list[Candidate] | int, dict]:
    """Advance the active chains one round at a time until `left` images are spent (or all stopped).

    Rounds are lockstep: one Make per active chain per round, so the engine batches the chains.
    When fewer images are left than active chains, the lowest-numbered chains go first.
    """
    cfg = ctx.config
    # A chain's depth cap: with reallocation a stopped chain's rounds go to the others.
    cap = cfg.depth if (cfg.early_stop is None or cfg.reallocate == "none") else None
    granted = 0
    while True:
        for ch in chains:
            if ch.stopped_at is None and confident(ch.best, cfg.early_stop):
                ch.stopped_at = ch.depth
        active = [ch for ch in chains if ch.stopped_at is None and (cap is None or ch.depth < cap)]
        if not active:
            break
        if left <= 0:
            if cfg.early_stop is None or cfg.reallocate != "prompts":
                break
            extra = yield NeedBudget(len(active))
            if extra <= 0:
                break
            left += extra
            granted += extra
        movers = active[:left]
        kids = yield [step(ch) for ch in movers]
        left -= len(kids)
        for ch, kid in zip(movers, kids):
            ch.add(kid)
    return {
        "chains": [{"chain": ch.index, "members": ch.members, "depth": ch.depth, "stopped_at": ch.stopped_at,
                    "best": ch.best.id} for ch in chains],
        "granted": granted,
        "unspent": max(left, 0),
    }


def prompt_chains(ctx: PromptContext) -> Generator[list[Make] | NeedBudget, list[Candidate] | int, dict]:
    cfg = ctx.config
    n = cfg.chains
    firsts = yield [make_noise(ctx, c) for c in range(n)]
    chains = [Chain(c, latest=f, best=f, prompt=ctx.prompt, depth=1, members=[f.id]) for c, f in enumerate(firsts)]

    def step(ch: Chain) -> Make:
        r = ch.depth  # round r >= 1: refine from the latest image, fresh noise
        return Make(id=chain_id(ch.index, r), kind="prompt", chain=ch.index, round=r,
                    seed=ctx.seed(ch.index, r, "noise"), prompt=ch.prompt, parent=ch.latest, refine=True)

    notes = yield from run_chains(ctx, chains, ctx.budget - n, step)
    return notes


def reflection_flow(ctx: PromptContext) -> Generator[list[Make] | NeedBudget, list[Candidate] | int, dict]:
    cfg = ctx.config
    pool = yield [make_noise(ctx, k) for k in range(cfg.pool)]
    heads = ranked(pool)[: cfg.chains]
    chains = [Chain(c, latest=h, best=h, prompt=ctx.prompt) for c, h in enumerate(heads)]

    def step(ch: Chain) -> Make:
        r = ch.depth + 1
        parent = ch.best if cfg.backtrack else ch.latest
        return Make(id=chain_id(ch.index, r), kind="correct", chain=ch.index, round=r,
                    seed=ctx.seed(ch.index, r, "correct"), prompt=ch.prompt, parent=parent,
                    reflect=True, refine=cfg.refine_prompts, correct=True)

    notes = yield from run_chains(ctx, chains, ctx.budget - cfg.pool, step)
    notes["heads"] = [h.id for h in heads]
    return notes
