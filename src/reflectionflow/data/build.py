"""`reflectionflow genref build --backend world`: GenRef's four sources, built in the Shapes world.

GenRef (REFERENCE.md section 4) pairs a flawed image with a better one and a reflection that
says what to change. The world builds all four of its sources, judged by the exact evaluator,
with reflections from the oracle reflector (backends.world.oracle):

source     subset   bad image                               good image
rule       rule     a failed generator sample of a prompt   a passed sample of the same prompt
reward     general  the lowest graded score of k samples    the highest graded score (both may fail)
length     length   a failed sample of the short prompt     a passed sample of its explicit long form
                                                            (the rule refiner with every aspect)
editing    editing  a correct scene with one planted flaw   the correct scene (both rendered)

Samples come from the trained world generator (`world-mmdit`), or, with `--no-generator`, from
the renderer-backed stand-in with planted flaws (`world-render`: CPU, milliseconds).

Output: DIR/genref_{k}.tar shards with GenRef-wds keys (bad_image.png, good_image.png,
prompt.txt, reflection.txt, subset.txt), DIR/cot/genref_{k}.jsonl GenRef-CoT-style records
(prompt, analysis, instructions, result) for the same samples, and DIR/build.json (the settings).
Sample i is a function of (seed, i) alone and is made in fixed chunks aligned with the shards,
so a run killed at any point and started again continues after its last complete shard and
writes the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SOURCES = ("rule", "reward", "length", "editing")
SUBSET_OF = {"rule": "rule", "reward": "general", "length": "length", "editing": "editing"}
# GenRef's own proportions: 185K rule, 143K reward, 96K long/short, 619K editing.
DEFAULT_MIX = {"rule": 0.18, "reward": 0.14, "length": 0.09, "editing": 0.59}
BACKENDS = ("world",)
MAX_ATTEMPTS = 16  # prompt draws per sample before giving up (each draw: k fresh samples)
FORMAT = "reflectionflow-genref-world/1"


class BuildError(ValueError):
    """Bad `genref build` input."""


@dataclass
class BuildConfig:
    out: str
    n: int
    backend: str = "world"
    seed: int = 0
    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    shard_size: int = 1000
    samples_per_prompt: int = 4  # k: generator samples per prompt draw
    generator: str | None = None  # None: the renderer-backed stand-in (--no-generator)
    steps: int = 20
    guidance: float = 3.0
    batch_size: int = 256
    device: str = "auto"
    workers: int = 1  # processes judging images

    def validate(self) -> BuildConfig:
        if self.backend not in BACKENDS:
            raise BuildError(f"--backend {self.backend!r}: genref build knows {', '.join(BACKENDS)} (real-scale "
                             "GenRef is built from FLUX samples and a VLM judge, not here)")
        for name in ("n", "shard_size", "steps", "batch_size", "workers"):
            if getattr(self, name) < 1:
                raise BuildError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.samples_per_prompt < 2:
            raise BuildError(f"--samples-per-prompt must be >= 2 (pairs compare samples), "
                             f"got {self.samples_per_prompt}")
        bad = sorted(set(self.mix) - set(SOURCES))
        if bad or any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise BuildError(f"--mix must weigh {', '.join(SOURCES)} with weights >= 0 and a positive sum, "
                             f"got {self.mix}")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise BuildError(f"--out {out} exists and is not a folder")
        if self.generator is not None and not (Path(self.generator) / "model.safetensors").is_file():
            raise BuildError(f"--generator {self.generator}: no model.safetensors there (use --no-generator for the "
                             "renderer-backed stand-in)")
        return self

    def identity(self) -> dict:
        """What must not change between a run and its resumption (n may grow; speed settings may change)."""
        from ..backends.world.mmdit import file_sha256

        d = {k: v for k, v in asdict(self).items() if k not in ("out", "n", "batch_size", "device", "workers")}
        d["generator_sha256"] = file_sha256(Path(self.generator) / "model.safetensors") if self.generator else None
        return {"format": FORMAT, **d}


@dataclass
class Triplet:
    source: str
    prompt: str
    bad: np.ndarray
    good: np.ndarray
    reflection: str
    analysis: str
    result: str
    extra: dict


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


def _choose(rng: np.random.Generator, weights: dict, names) -> str:
    p = np.array([weights.get(n, 0.0) for n in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _draw_meta(rng: np.random.Generator, tag_weights: dict) -> dict:
    from ..world import spec

    tag = _choose(rng, tag_weights, spec.TAGS)
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
        from ..train.corrector_pool import POOL_TAG_WEIGHTS
        from ..train.world import DEFAULT_TAG_WEIGHTS

        self.cfg, self.generator = cfg, generator
        self.hard_tags, self.all_tags = POOL_TAG_WEIGHTS, DEFAULT_TAG_WEIGHTS
        self.refiner = RuleRefiner()

    def long_prompt(self, prompt: str) -> str:
        from ..components import RefineRequest

        return self.refiner.refine([RefineRequest(original_prompt=prompt, current_prompt=prompt)])[0].text

    def editing(self, i: int) -> Triplet:
        from ..train.corrector_pool import label_one
        from ..world.flaws import FLAW_KINDS, plant_flaw
        from ..world.render import render, sample_scene

        for attempt in range(MAX_ATTEMPTS * 4):
            rng = _rng(self.cfg.seed, i, 1, attempt)
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
        from ..train.corrector_pool import label_images

        k, done = self.cfg.samples_per_prompt, {}
        todo = list(items)
        for attempt in range(MAX_ATTEMPTS):
            if not todo:
                break
            plans, requests, metas = [], [], []
            for i, source in todo:
                rng = _rng(self.cfg.seed, i, 2, attempt)
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
        sources = [_choose(_rng(self.cfg.seed, i, 0), self.cfg.mix, SOURCES) for i in range(start, stop)]
        gen = self.generated([(i, s) for i, s in zip(range(start, stop), sources) if s != "editing"])
        return [self.editing(i) if s == "editing" else gen[i] for i, s in zip(range(start, stop), sources)]


def chunk_size(shard_size: int, cap: int = 256) -> int:
    """The largest divisor of the shard size up to `cap`: chunks never straddle a shard, so a
    resumed run batches exactly as the first one did."""
    return max(d for d in range(1, min(shard_size, cap) + 1) if shard_size % d == 0)


def build_genref(cfg: BuildConfig, progress: bool = True) -> dict:
    """Write (or finish) the shards; returns a summary."""
    from tqdm import tqdm

    from .writer import CoTRecord, CoTWriter, GenRefWriter

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ident = cfg.identity()
    saved = out / "build.json"
    if saved.is_file():
        before = json.loads(saved.read_text())
        differ = sorted(k for k in set(before) | set(ident) if before.get(k) != ident.get(k))
        if differ:
            raise BuildError(f"{out} holds a build with other settings ({', '.join(differ)}); build into another "
                             "folder or use the same settings")
    saved.write_text(json.dumps(ident, indent=1) + "\n")
    writer = GenRefWriter(out, max_samples_per_shard=cfg.shard_size)
    start = writer.samples_committed
    if start > cfg.n:
        raise BuildError(f"{out} already holds {start} samples, more than --n {cfg.n}")
    if cfg.generator is None:
        from ..backends.world.simulated import RenderGenerator

        generator = RenderGenerator()
    else:
        from ..backends.world.mmdit import MMDiTGenerator

        generator = MMDiTGenerator(weights=cfg.generator, steps=cfg.steps, guidance=cfg.guidance,
                                   batch_size=cfg.batch_size, device=cfg.device)
    builder = Builder(cfg, generator)
    step = chunk_size(cfg.shard_size)
    counts = dict.fromkeys(SUBSET_OF.values(), 0)
    t0 = time.perf_counter()
    cot: list[CoTRecord] = []
    bar = tqdm(total=cfg.n, initial=start, desc="genref build", unit="sample", disable=not progress)
    with writer:
        for lo in range(start, cfg.n, step):
            for i, t in zip(range(lo, min(lo + step, cfg.n)), builder.chunk(lo, min(lo + step, cfg.n))):
                subset = SUBSET_OF[t.source]
                key = f"{i:09d}"
                cot.append(CoTRecord(t.prompt, t.analysis, t.reflection.splitlines(), t.result,
                                     {"key": key, "subset": subset, "source": t.source, **t.extra}))
                if (i + 1) % cfg.shard_size == 0 or i + 1 == cfg.n:
                    # The CoT file is complete before its shard is: a resumed run redoes both.
                    with CoTWriter(out / "cot" / f"genref_{i // cfg.shard_size}.jsonl") as w:
                        for r in cot:
                            w.write(r)
                    cot = []
                writer.write(prompt=t.prompt, reflection=t.reflection, subset=subset, good=t.good, bad=t.bad, key=key)
                counts[subset] += 1
                bar.update(1)
    bar.close()
    return {"out": str(out), "samples": cfg.n, "written_now": cfg.n - start, "resumed_at": start,
            "shards": math.ceil(cfg.n / cfg.shard_size), "subsets_written_now": counts,
            "seconds": round(time.perf_counter() - t0, 2)}


# ----------------------------------------------------------------------------------------------
# The command


def _mix(text: str) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(f"expected SOURCE=WEIGHT[,...] with sources {', '.join(SOURCES)}")
    return out


def register(gsub: argparse._SubParsersAction) -> None:
    p = gsub.add_parser(
        "build", help="build GenRef triplet shards (world backend: the four sources, judged exactly)",
        description="Build GenRef-wds shards and GenRef-CoT records from the world: rule, reward and long/short "
        "pairs from generator samples judged by the evaluator, editing pairs from planted flaws; reflections from "
        "the oracle reflector. Deterministic and resumable (run the same command again).")
    p.add_argument("--backend", default="world", help="world (the only one that builds GenRef here)")
    p.add_argument("--out", required=True, help="output folder (shards, cot/, build.json)")
    p.add_argument("--n", type=int, required=True, help="triplets to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", type=_mix, default=None,
                   help="source weights, default " + ",".join(f"{k}={v}" for k, v in DEFAULT_MIX.items()))
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="generator samples per prompt draw")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--generator", default=None, help="world generator folder (default weights/world-generator)")
    g.add_argument("--no-generator", action="store_true",
                   help="the renderer-backed stand-in with planted flaws instead of the trained generator (CPU-fast)")
    p.add_argument("--steps", type=int, default=20, help="generator Euler steps")
    p.add_argument("--guidance", type=float, default=3.0, help="generator CFG scale")
    p.add_argument("--batch-size", type=int, default=256, help="generator batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=1, help="processes judging images")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_build)


def cmd_build(args) -> int:
    from ..backends.world.mmdit import DEFAULT_GENERATOR

    generator = None if args.no_generator else (args.generator or str(DEFAULT_GENERATOR))
    cfg = BuildConfig(out=args.out, n=args.n, backend=args.backend, seed=args.seed,
                      mix=args.mix if args.mix is not None else dict(DEFAULT_MIX), shard_size=args.shard_size,
                      samples_per_prompt=args.samples_per_prompt, generator=generator, steps=args.steps,
                      guidance=args.guidance, batch_size=args.batch_size, device=args.device, workers=args.workers)
    print(json.dumps(build_genref(cfg, progress=not args.quiet)))
    return 0
