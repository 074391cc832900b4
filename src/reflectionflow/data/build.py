"""`reflectionflow genref build`: GenRef's four sources, built in the Shapes world or at FLUX scale.

GenRef (docs/method.md, section 4) pairs a flawed image with a better one and a reflection that
says what to change. `--backend world` builds all four of its sources, judged by the exact
evaluator, with reflections from the oracle reflector (backends.world.oracle):

source     subset   bad image                               good image
rule       rule     a failed generator sample of a prompt   a passed sample of the same prompt
reward     general  the lowest graded score of k samples    the highest graded score (both may fail)
length     length   a failed sample of the short prompt     a passed sample of its explicit long form
                                                            (the rule refiner with every aspect)
editing    editing  a correct scene with one planted flaw   the correct scene (both rendered)

Samples come from the trained world generator (`world-mmdit`), or, with `--no-generator`, from
the renderer-backed stand-in with planted flaws (`world-render`: CPU, milliseconds).
`--backend flux` builds the same four sources from FLUX samples, VLM judges and Kontext edits
(build_flux.py).

Output: DIR/genref_{k}.tar shards with GenRef-wds keys (bad_image.png, good_image.png,
prompt.txt, reflection.txt, subset.txt), DIR/cot/genref_{k}.jsonl GenRef-CoT-style records
(prompt, analysis, instructions, result) for the same samples, DIR/genref_cot.jsonl (those
parts merged in key order) and DIR/build.json (the settings).

Shard k is the unit of work: it holds samples k*S .. k*S+S-1, sample i is a function of (seed, i)
alone, and a shard is made in fixed chunks inside it, so its bytes depend on nothing but its index.
Its CoT part is written before it, and it appears under its final name only when complete; so a
shard file on disk with its full count of samples is done. A run killed at any point and started
again redoes only the shards that are not, and several processes (accelerate launch / torchrun)
deal the shards that are left among themselves, each writing its own; rank 0 merges the CoT parts
when all have finished (`reflectionflow genref merge DIR` does it again at any time). The folder is
the one a single process writes, byte for byte, whatever the number of processes and resumes.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .build_config import (  # noqa: F401  (re-exported: the build's public names)
    BACKENDS,
    COT_MERGED,
    DEFAULT_MIX,
    FORMAT,
    MAX_ATTEMPTS,
    SOURCES,
    SUBSET_OF,
    WORLD_DEFAULTS,
    BuildConfig,
    BuildError,
    BuildFailed,
    Triplet,
    choose,
    seeded_rng,
)

_SHARD = re.compile(r"^genref_(\d+)\.tar$")


def _draw_meta(rng: np.random.Generator, tag_weights: dict) -> dict:
    from ..world import spec

    tag = choose(rng, tag_weights, spec.TAGS)
    space = spec._all_combinations(tag)
    return space[int(rng.integers(len(space)))]


def _analysis(label, meta: dict) -> str:
    seen = ", ".join(label.objects) if label.objects else "no object"
    verdict = "It matches the prompt." if label.correct else \
        "Problems: " + "; ".join(r for r in label.reason.splitlines() if r) + "."
    return f"The prompt asks for: {meta['prompt'][len('a photo of '):]}. The image shows: {seen}. {verdict}"


class Builder:
    """Makes triplet i of the build, in chunks (generation batched across the chunk)."""

    def __init__(self, cfg: BuildConfig, generator):
        from ..backends.world.refine import RuleRefiner
        from ..world.data import DEFAULT_TAG_WEIGHTS, POOL_TAG_WEIGHTS

        self.cfg, self.generator = cfg, generator
        self.hard_tags, self.all_tags = POOL_TAG_WEIGHTS, DEFAULT_TAG_WEIGHTS
        self.refiner = RuleRefiner()

    def long_prompt(self, prompt: str) -> str:
        from ..components import RefineRequest

        return self.refiner.refine([RefineRequest(original_prompt=prompt, current_prompt=prompt)])[0].text

    def editing(self, i: int) -> Triplet:
        from ..world.flaws import FLAW_KINDS, plant_flaw
        from ..world.render import render, sample_scene
        from .labels import label_one

        for attempt in range(MAX_ATTEMPTS * 4):
            rng = seeded_rng(self.cfg.seed, i, 1, attempt)
            meta = _draw_meta(rng, self.all_tags)
            prng = random.Random(int(rng.integers(2**62)))
            scene = sample_scene(meta, prng)
            flawed = plant_flaw(meta, scene, FLAW_KINDS[int(rng.integers(len(FLAW_KINDS)))], prng)
            if flawed is None:
                continue
            bad, good = render(flawed), render(scene)
            label = label_one(bad, meta, 0, with_target=False)
            if label.reflection.startswith("- Keep"):  # a flaw the evaluator cannot see teaches nothing
                continue
            return Triplet("editing", meta["prompt"], bad, good, label.reflection, _analysis(label, meta),
                           "After the edit the image matches the prompt.", {"flawed": True})
        raise BuildError(f"sample {i}: no visible flaw in {MAX_ATTEMPTS * 4} draws")

    def generated(self, items: list[tuple[int, str]]) -> dict[int, Triplet]:
        """Triplets of the generator sources for (index, source) pairs, trying fresh prompt draws
        (attempt j of sample i: prompt and seeds from (seed, i, j)) until each finds its pair."""
        from ..components import GenerationRequest
        from .labels import label_images

        k, done = self.cfg.samples_per_prompt, {}
        todo = list(items)
        for attempt in range(MAX_ATTEMPTS):
            if not todo:
                break
            plans, requests, metas = [], [], []
            for i, source in todo:
                rng = seeded_rng(self.cfg.seed, i, 2, attempt)
                meta = _draw_meta(rng, self.hard_tags)
                seeds = rng.integers(2**40, 2**62, size=2 * k).tolist()  # never a benchmark's seed
                prompts = [meta["prompt"]] * k
                if source == "length":
                    prompts += [self.long_prompt(meta["prompt"])] * k
                plans.append((i, source, meta, len(requests), len(prompts)))
                requests += [GenerationRequest(prompt=p, seed=s) for p, s in zip(prompts, seeds)]
                metas += [meta] * len(prompts)
            results = self.generator.generate(requests)
            images = np.stack([r.image for r in results])
            labels = label_images(images, metas, [0] * len(metas), self.cfg.workers, with_target=False)
            left = []
            for i, source, meta, start, count in plans:
                t = self._pair(source, meta, images[start : start + count], labels[start : start + count])
                if t is None:
                    left.append((i, source))
                else:
                    t.extra["attempt"] = attempt
                    done[i] = t
            todo = left
        if todo:
            raise BuildError(f"samples {[i for i, _ in todo][:5]}: no {todo[0][1]} pair in {MAX_ATTEMPTS} prompt "
                             "draws (the generator never fails or never succeeds on them)")
        return done

    def _pair(self, source: str, meta: dict, images: np.ndarray, labels) -> Triplet | None:
        k = self.cfg.samples_per_prompt
        short = list(range(k))
        if source == "rule":
            bad = next((j for j in short if not labels[j].correct), None)
            good = next((j for j in short if labels[j].correct), None)
        elif source == "reward":
            scores = [labels[j].score for j in short]
            bad, good = int(np.argmin(scores)), int(np.argmax(scores))
            if scores[bad] == scores[good]:
                return None
        else:  # length: a failed short-prompt sample, a passed long-prompt one
            bad = next((j for j in short if not labels[j].correct), None)
            good = next((j for j in range(k, 2 * k) if labels[j].correct), None)
        if bad is None or good is None:
            return None
        lb, lg = labels[bad], labels[good]
        extra = {"bad_score": round(lb.score, 4), "good_score": round(lg.score, 4)}
        if source == "length":
            extra["long_prompt"] = self.long_prompt(meta["prompt"])
        result = "The better image matches the prompt." if lg.correct else \
            f"The better image satisfies {lg.score:.0%} of the prompt's requirements."
        return Triplet(source, meta["prompt"], images[bad], images[good], lb.reflection, _analysis(lb, meta), result,
                       extra)

    def chunk(self, start: int, stop: int) -> list[Triplet]:
        sources = [choose(seeded_rng(self.cfg.seed, i, 0), self.cfg.mix, SOURCES) for i in range(start, stop)]
        gen = self.generated([(i, s) for i, s in zip(range(start, stop), sources) if s != "editing"])
        return [self.editing(i) if s == "editing" else gen[i] for i, s in zip(range(start, stop), sources)]


def chunk_size(shard_size: int, cap: int = 256) -> int:
    """The largest divisor of the shard size up to `cap`: chunks never straddle a shard, so a
    shard is batched the same way whoever makes it, first time or on resume."""
    return max(d for d in range(1, min(shard_size, cap) + 1) if shard_size % d == 0)


# ----------------------------------------------------------------------------------------------
# The folder: which shards exist, which are done, the merged CoT


@dataclass(frozen=True)
class Layout:
    n: int
    shard_size: int

    @property
    def shards(self) -> int:
        return math.ceil(self.n / self.shard_size)

    def span(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.n))


def shard_path(out: Path, k: int) -> Path:
    return out / f"genref_{k}.tar"


def cot_part(out: Path, k: int) -> Path:
    return out / "cot" / f"genref_{k}.jsonl"


def _existing_shards(out: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in out.iterdir() if (m := _SHARD.match(p.name))) if out.is_dir() else []


def _lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _shard_done(out: Path, k: int, size: int) -> bool:
    from .shards import count_samples

    path = shard_path(out, k)
    if not path.is_file():
        return False
    count = count_samples(path)
    if count is not None and count > size:
        raise BuildError(f"{out} holds {path.name} with {count} samples, more than this build's {size} for it "
                         f"(a larger --n or another run); build into another folder")
    return count == size and cot_part(out, k).is_file() and _lines(cot_part(out, k)) == size


def prepare_folder(out: Path, ident: dict, layout: Layout) -> tuple[list[int], int]:
    """Rank 0, before anyone writes: check build.json, clear what killed writers left, record the
    settings, and find the shards still to make. Returns (pending shard indices, samples done)."""
    from ..io import atomic_write_json
    from .writer import remove_stale_temporaries

    out.mkdir(parents=True, exist_ok=True)
    saved = out / "build.json"
    if saved.is_file():
        before = json.loads(saved.read_text())
        differ = sorted(k for k in set(before) | set(ident) if before.get(k) != ident.get(k))
        if differ:
            raise BuildError(f"{out} holds a build with other settings ({', '.join(differ)}); build into another "
                             "folder or use the same settings")
    beyond = [k for k in _existing_shards(out) if k >= layout.shards]
    if beyond:
        raise BuildError(f"{out} already holds shard genref_{beyond[0]}.tar, beyond the {layout.shards} shard(s) of "
                         f"--n {layout.n}; use at least the --n it was built with")
    remove_stale_temporaries(out)
    if (out / "cot").is_dir():
        remove_stale_temporaries(out / "cot")
    atomic_write_json(saved, ident)
    done = [k for k in range(layout.shards) if _shard_done(out, k, len(layout.span(k)))]
    pending = [k for k in range(layout.shards) if k not in set(done)]
    return pending, sum(len(layout.span(k)) for k in done)


def merge_build(out: str | os.PathLike) -> dict:
    """Check that DIR holds a complete build (shards 0..K-1, all but the last full, each with its CoT
    part of as many records) and write DIR/genref_cot.jsonl, the parts in key order. Safe to run
    again at any time; it changes nothing else."""
    from .shards import count_samples
    from .writer import _temp_path

    out = Path(out)
    saved = out / "build.json"
    if not saved.is_file():
        raise BuildError(f"{out}: no build.json; not a folder of `reflectionflow genref build`")
    size = json.loads(saved.read_text()).get("shard_size")
    indices = _existing_shards(out)
    if not indices:
        raise BuildError(f"{out}: no genref_*.tar shards yet")
    if indices != list(range(len(indices))):
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))
        raise BuildError(f"{out}: shard(s) {', '.join(f'genref_{k}.tar' for k in missing[:5])} missing; finish the "
                         "build first (run the same genref build command again)")
    counts = []
    for k in indices:
        count = count_samples(shard_path(out, k))
        last = k == indices[-1]
        if count is None or (count != size and not last) or (last and not 1 <= count <= size):
            raise BuildError(f"{out}: genref_{k}.tar is damaged or not complete; run the build again to redo it")
        if not cot_part(out, k).is_file() or _lines(cot_part(out, k)) != count:
            raise BuildError(f"{out}: cot/genref_{k}.jsonl is missing or does not match genref_{k}.tar; run the "
                             "build again to redo that shard")
        counts.append(count)
    merged = out / COT_MERGED
    tmp = _temp_path(merged)
    with open(tmp, "wb") as f:
        for k in indices:
            f.write(cot_part(out, k).read_bytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, merged)
    return {"shards": len(indices), "samples": sum(counts), "cot": str(merged)}


# ----------------------------------------------------------------------------------------------
# Building


def _builder(cfg: BuildConfig, plan, components: Mapping | None):
    """The backend's chunk maker (this is where weights load)."""
    components = dict(components or {})
    if cfg.backend == "flux":
        from .build_flux import FluxBuilder, build_components

        return FluxBuilder(cfg, plan, components or build_components(plan))
    generator = components.get("generator")
    if generator is None and cfg.generator is None:
        from ..backends.world.simulated import RenderGenerator

        generator = RenderGenerator()
    elif generator is None:
        from ..backends.world.mmdit import MMDiTGenerator

        generator = MMDiTGenerator(weights=cfg.generator, steps=cfg.steps, guidance=cfg.guidance,
                                   batch_size=cfg.batch_size, device=cfg.device)
    return Builder(cfg, generator)


def _write_shard(out: Path, k: int, span: range, builder, step: int, bar, counts: dict) -> None:
    """Make shard k: its CoT part first, then the shard itself, each appearing whole."""
    from .writer import CoTRecord, CoTWriter, ShardFile

    cot: list[CoTRecord] = []
    with ShardFile(shard_path(out, k)) as shard:
        for lo in range(span.start, span.stop, step):
            hi = min(lo + step, span.stop)
            for i, t in zip(range(lo, hi), builder.chunk(lo, hi)):
                subset, key = SUBSET_OF[t.source], f"{i:09d}"
                cot.append(CoTRecord(t.prompt, t.analysis, t.reflection.splitlines(), t.result,
                                     {"key": key, "subset": subset, "source": t.source, **t.extra}))
                shard.write(prompt=t.prompt, reflection=t.reflection, subset=subset, good=t.good, bad=t.bad, key=key)
                counts[subset] += 1
                bar.update(1)
        with CoTWriter(cot_part(out, k)) as w:
            for r in cot:
                w.write(r)


def build_genref(cfg: BuildConfig, progress: bool = True, dist=None, secrets: Mapping[str, str] | None = None,
                 components: Mapping | None = None) -> dict:
    """Write (or finish) this process's share of the shards; rank 0 returns the whole build's summary
    (the others their own). `dist`: this process's place among several (engine.distributed.DistContext;
    None: a single process). `secrets`: the flux backend's API key, never written anywhere.
    `components`: already-built components by kind, instead of the configured ones (tests)."""
    from tqdm import tqdm

    from ..engine.distributed import DistContext, my_share

    dist = dist or DistContext()
    cfg.validate()
    plan = None
    if cfg.backend == "flux":
        from .build_flux import check

        plan = check(cfg, secrets or {})  # every check, before any weights load
    if cfg.backend == "flux":
        from .build_flux import identity

        ident = identity(cfg, plan)
    else:
        ident = cfg.identity()
    dist.check_same("genref build settings", ident)
    out, layout = Path(cfg.out), Layout(cfg.n, cfg.shard_size)
    found = None
    if dist.is_main:
        try:
            found = ("ok", prepare_folder(out, ident, layout))
        except BuildError as e:
            found = ("error", str(e))
    # Rank 0's view of the folder, on every rank (also the point after which rank 0 has written build.json).
    status, value = dist.agree(found)
    if status == "error":
        raise BuildError(value)
    pending, resumed_at = value
    mine = my_share(pending, dist.rank, dist.world_size)
    counts = dict.fromkeys(SUBSET_OF.values(), 0)
    t0 = time.perf_counter()
    total = sum(len(layout.span(k)) for k in mine)
    desc = "genref build" + (f" ({dist.label})" if dist.distributed else "")
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress or not dist.is_main)
    if mine:
        builder = _builder(cfg, plan, components)
        step = chunk_size(cfg.shard_size)
        for k in mine:
            _write_shard(out, k, layout.span(k), builder, step, bar, counts)
    bar.close()
    mine_summary = {"rank": dist.rank, "shards": len(mine), "samples": total, "subsets": counts,
                    "seconds": round(time.perf_counter() - t0, 2)}
    ranks = dist.all_gather(mine_summary)  # every process has finished its share
    if not dist.is_main:
        return mine_summary
    merged = merge_build(out)
    written = {s: sum(r["subsets"][s] for r in ranks) for s in counts}
    return {"out": str(out), "samples": cfg.n, "written_now": cfg.n - resumed_at, "resumed_at": resumed_at,
            "shards": layout.shards, "subsets_written_now": written, "cot": merged["cot"],
            "processes": dist.world_size, "seconds": round(time.perf_counter() - t0, 2)}
