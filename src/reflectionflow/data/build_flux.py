"""`reflectionflow genref build --backend flux`: GenRef's four sources from FLUX samples and VLM judges.

The components are the flux backend's, picked by registry name and checked exactly as `reflectionflow
generate --backend flux` checks them (folders, LoRA keys, the endpoint, its model and key) before
any weights load:

source   subset   bad image                                   good image            decided by
rule     rule     a sample the verifier says no to            a sample it says yes  the verifier's yes/no
reward   general  the lowest-ranked of k samples              the highest-ranked    the verifier's ranking
length   length   a sample of the short prompt judged no      a sample of its long  the verifier's yes/no,
                                                              form judged yes       against the short prompt
editing  editing  a Kontext edit of the good image asked      a sample judged yes   the verifier's yes/no
                  to plant a flaw, judged no

Every judgement is against the prompt the pair is filed under (the short one for length pairs).
The rule source has no GenEval detector at FLUX scale: the yes/no verifier decides (vlm-yesno,
local-yesno; the NVILA-style "does the image match the prompt?"), so rule, length and editing need
one; reward pairs rank by any verifier. The reflection on every pair is the reflector's, written
for the bad image and the prompt with the bad image's verdict; long prompts come from the refiner
asked to spell the prompt out.

Prompts: a prompt file or set (`--prompts`), or GenEval-style prompts drawn per sample over
GenEval's 80 classes and 10 colours with its six templates, never one of the benchmark's own.
Sample i, attempt j draws its prompt and seeds from (seed, i, j) alone, as the world build does.
A judge call that fails for good stops the build (BuildFailed): writing a pair without its
judgement would make the data depend on the endpoint's luck; the complete shards stay.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .build_config import MAX_ATTEMPTS, SOURCES, BuildConfig, BuildError, BuildFailed, Triplet, choose, seeded_rng

FORMAT = "reflectionflow-genref-flux/1"
DEFAULTS = {"generator": "flux", "verifier": "vlm-yesno", "reflector": "vlm", "refiner": "vlm", "corrector": "kontext"}
YESNO_VERIFIERS = ("vlm-yesno", "local-yesno")
# What the refiner is asked, as the reflection it works from, to turn a short prompt into a long one.
EXPAND = ("- Rewrite the prompt as one detailed sentence that states every object, its count, colour and "
          "position, and the setting, explicitly.")
# Settings that change no output: left out of build.json's identity, so they may change on resume.
_SPEED = ("batch_size", "device")
_VLM_IDENTITY = ("model", "reflector_style", "refine_with_image")

# GenEval's templates (docs/method.md, section 6) and proportions (80/99/80/94/100/100), but no single
# object: GenEval's 80 single-object prompts are all 80 classes, so each would be a benchmark prompt.
TAG_WEIGHTS = {"single_object": 0, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
               "color_attr": 100}
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBERS = {2: "two", 3: "three", 4: "four"}
_PLURAL = {"person": "people", "sheep": "sheep", "skis": "skis", "knife": "knives", "mouse": "mice",
           "computer mouse": "computer mice", "scissors": "scissors", "wine glass": "wine glasses"}


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(name: str) -> str:
    if name in _PLURAL:
        return _PLURAL[name]
    if name.endswith(("s", "sh", "ch", "x")):
        return name + "es"
    return name + "s"


@lru_cache(maxsize=1)
def _geneval() -> tuple[tuple[str, ...], frozenset[str]]:
    from ..world.data import FILES, HERE

    classes = tuple(c.strip() for c in (HERE / "geneval_object_names.txt").read_text().splitlines() if c.strip())
    import json

    benchmark = frozenset(json.loads(line)["prompt"] for line in FILES["geneval"].read_text().splitlines()
                          if line.strip())
    return classes, benchmark


def draw_geneval_style(rng: np.random.Generator) -> dict:
    """A GenEval metadata line (tag, include, exclude?, prompt) over GenEval's classes, not one of
    the benchmark's 553 prompts."""
    classes, benchmark = _geneval()
    tags = list(TAG_WEIGHTS)
    while True:
        tag = choose(rng, TAG_WEIGHTS, tags)
        a, b = (classes[int(j)] for j in rng.choice(len(classes), size=2, replace=False))
        ca, cb = (COLORS[int(j)] for j in rng.choice(len(COLORS), size=2, replace=False))
        if tag == "single_object":
            meta = {"include": [{"class": a, "count": 1}], "prompt": f"a photo of {_a(a)}"}
        elif tag == "two_object":
            meta = {"include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                    "prompt": f"a photo of {_a(a)} and {_a(b)}"}
        elif tag == "counting":
            n = int(rng.integers(2, 5))
            meta = {"include": [{"class": a, "count": n}], "exclude": [{"class": a, "count": n + 1}],
                    "prompt": f"a photo of {NUMBERS[n]} {plural(a)}"}
        elif tag == "colors":
            meta = {"include": [{"class": a, "count": 1, "color": ca}], "prompt": f"a photo of {_a(ca)} {a}"}
        elif tag == "position":
            rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
            meta = {"include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                    "prompt": f"a photo of {_a(a)} {rel} {_a(b)}"}
        else:
            meta = {"include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                    "prompt": f"a photo of {_a(ca)} {a} and {_a(cb)} {b}"}
        if meta["prompt"] not in benchmark:
            return {"tag": tag, **meta}


def flaw_instruction(meta: Mapping, rng: np.random.Generator) -> tuple[str, str]:
    """(kind, edit instruction) that breaks what the prompt asks for: from its GenEval clauses when it
    has them (remove / add an object, recolour it, move it to the other side), else generic."""
    include = list(meta.get("include") or [])
    options: list[tuple[str, str]] = []
    for clause in include:
        c, n = clause["class"], int(clause.get("count", 1))
        options.append(("remove", f"Remove the {c}." if n == 1 else f"Remove one of the {plural(c)}."))
        options.append(("add", f"Add one more {c}."))
        if clause.get("color"):
            other = [x for x in COLORS if x != clause["color"]][int(rng.integers(len(COLORS) - 1))]
            options.append(("recolor", f"Make the {clause['color']} {c} {other}."))
        if clause.get("position"):
            rel, ref = clause["position"][0], include[int(clause["position"][1])]["class"]
            options.append(("move", f"Move the {c} so that it is {OPPOSITE.get(rel, rel)} the {ref}."))
    if not options:
        options = [("remove", "Remove the main subject of the image."),
                   ("recolor", "Change the colours of the main objects to different ones."),
                   ("replace", "Replace the main subject with a different object.")]
    return options[int(rng.integers(len(options)))]


# ----------------------------------------------------------------------------------------------
# Settings: checks before weights, identity


@dataclass
class FluxBuildPlan:
    names: dict  # kind -> registry name, the kinds this build calls
    settings: dict  # the backend's public settings, resolved (steps, guidance, absolute paths)
    flux: object  # backends.flux.options.FluxPlan: what build_run takes
    prompts: list[dict] | None = None  # None: drawn GenEval-style
    prompts_arg: str | None = None
    needs_yes: tuple[str, ...] = field(default_factory=tuple)


def needed_names(cfg: BuildConfig) -> dict[str, str]:
    unknown = sorted(set(cfg.components) - set(DEFAULTS))
    if unknown:
        raise BuildError(f"unknown component kind(s) {', '.join(unknown)}; accepted: {', '.join(DEFAULTS)}")
    kinds = ["generator", "verifier", "reflector"]
    if cfg.mix.get("length", 0) > 0:
        kinds.append("refiner")
    if cfg.mix.get("editing", 0) > 0:
        kinds.append("corrector")
    return {k: cfg.components.get(k) or DEFAULTS[k] for k in kinds}


def check(cfg: BuildConfig, secrets: Mapping[str, str]) -> FluxBuildPlan:
    """Every check before any weights load: component names, what the sources need of the verifier,
    the prompts, then the flux backend's own (folders, LoRA, the endpoint, its model and key)."""
    from ..backends.flux.options import check_run

    names = needed_names(cfg)
    needs_yes = tuple(s for s in ("rule", "length", "editing") if cfg.mix.get(s, 0) > 0)
    if needs_yes and names["verifier"] not in YESNO_VERIFIERS:
        from ..backends.flux.options import CHOICES

        if names["verifier"] in CHOICES["verifier"]:
            raise BuildError(f"the {', '.join(needs_yes)} source(s) need a yes/no verifier "
                             f"({', '.join(YESNO_VERIFIERS)}); --verifier {names['verifier']} only scores: "
                             "choose one or build only reward pairs "
                             "(--mix reward=1)")
    prompts = None
    prompts_arg = cfg.prompts
    if cfg.prompts is not None:
        from ..world.data import resolve_prompts

        prompts = resolve_prompts(cfg.prompts, world_only=False)
        if not prompts:
            raise BuildError(f"--prompts {cfg.prompts}: no prompts in it")
        if Path(cfg.prompts).expanduser().exists():
            prompts_arg = str(Path(cfg.prompts).expanduser().resolve())
    settings, flux_plan = check_run(cfg.flux, names, secrets)
    return FluxBuildPlan(names=names, settings=settings, flux=flux_plan, prompts=prompts, prompts_arg=prompts_arg,
                         needs_yes=needs_yes)


def identity(cfg: BuildConfig, plan: FluxBuildPlan) -> dict:
    """What build.json records and a resume must match: the settings that change what is written."""
    settings = {k: v for k, v in plan.settings.items() if k not in (*_SPEED, "vlm")}
    vlm = {k: v for k, v in (plan.settings.get("vlm") or {}).items() if k in _VLM_IDENTITY}
    return {"format": FORMAT, "backend": "flux", "seed": cfg.seed, "mix": cfg.mix, "shard_size": cfg.shard_size,
            "samples_per_prompt": cfg.samples_per_prompt, "prompts": plan.prompts_arg, "components": plan.names,
            "flux": settings, "vlm": vlm}


def build_components(plan: FluxBuildPlan) -> dict:
    """The components by kind (this is where weights load)."""
    from ..backends.flux.options import build_run

    return build_run(plan.flux)


# ----------------------------------------------------------------------------------------------
# Making triplets


@dataclass
class _Draw:
    i: int
    source: str
    meta: dict
    seeds: list[int]
    flaw: tuple[str, str] | None = None
    long_prompt: str | None = None
    start: int = 0  # first of its images in the attempt's batch
    count: int = 0

    @property
    def prompt(self) -> str:
        return self.meta["prompt"]


def _failed(what: str, errors: list[str]) -> BuildFailed:
    return BuildFailed(f"the {what} failed for good ({errors[0]}); the complete shards are on disk: run the same "
                       "command again to resume")


class FluxBuilder:
    """Makes triplet i of a flux build, in chunks: every component call is batched across the chunk."""

    def __init__(self, cfg: BuildConfig, plan: FluxBuildPlan, components: Mapping):
        self.cfg, self.plan = cfg, plan
        self.generator = components["generator"]
        self.verifier = components["verifier"]
        self.reflector = components["reflector"]
        self.refiner = components.get("refiner")
        self.corrector = components.get("corrector")

    def _meta(self, rng: np.random.Generator) -> dict:
        if self.plan.prompts is None:
            return draw_geneval_style(rng)
        return dict(self.plan.prompts[int(rng.integers(len(self.plan.prompts)))])

    def _score(self, images, prompts) -> list:
        verdicts = self.verifier.score(images, prompts) if images else []
        errors = [v.error for v in verdicts if v.error]
        if errors:
            raise _failed(f"verifier {self.plan.names['verifier']}", errors)
        return verdicts

    def _generate(self, requests) -> list[np.ndarray]:
        results = self.generator.generate(requests) if requests else []
        errors = [r.error for r in results if r.error]
        if errors:
            raise _failed("generator", errors)
        return [r.image for r in results]

    def _long_prompts(self, draws: list[_Draw]) -> None:
        from ..components import RefineRequest

        if not draws:
            return
        refined = self.refiner.refine([RefineRequest(original_prompt=d.prompt, current_prompt=d.prompt,
                                                     reflection=EXPAND) for d in draws])
        errors = [r.error for r in refined if r.error]
        if errors:
            raise _failed(f"refiner {self.plan.names['refiner']}", errors)
        for d, r in zip(draws, refined):
            d.long_prompt = r.text

    def _passes(self, v) -> bool:
        return bool(v.yes)

    def _pair(self, d: _Draw, images: list, verdicts: list, edited=None) -> dict | None:
        k = self.cfg.samples_per_prompt
        mine = range(d.start, d.start + d.count)
        if d.source == "editing":
            good = d.start
            if edited is None or not self._passes(verdicts[good]) or self._passes(edited[1]):
                return None
            return {"bad": (edited[0], edited[1]), "good": (images[good], verdicts[good]),
                    "extra": {"flaw": d.flaw[0], "flaw_edit": d.flaw[1]}}
        if d.source == "reward":
            order = sorted(mine, key=lambda j: verdicts[j].rank_key)  # stable: ties keep generation order
            bad, good = order[0], order[-1]
            if verdicts[bad].rank_key == verdicts[good].rank_key:
                return None
        else:
            short = list(mine)[:k]
            goods = list(mine)[k:] if d.source == "length" else short
            bad = next((j for j in short if not self._passes(verdicts[j])), None)
            good = next((j for j in goods if self._passes(verdicts[j])), None)
            if bad is None or good is None:
                return None
        extra = {"long_prompt": d.long_prompt} if d.source == "length" else {}
        return {"bad": (images[bad], verdicts[bad]), "good": (images[good], verdicts[good]), "extra": extra}

    def chunk(self, start: int, stop: int) -> list[Triplet]:
        from ..components import CorrectionRequest, GenerationRequest, ReflectionRequest

        k = self.cfg.samples_per_prompt
        todo = [(i, choose(seeded_rng(self.cfg.seed, i, 0), self.cfg.mix, SOURCES)) for i in range(start, stop)]
        found: dict[int, tuple[_Draw, dict]] = {}
        for attempt in range(MAX_ATTEMPTS):
            if not todo:
                break
            draws = []
            for i, source in todo:
                rng = seeded_rng(self.cfg.seed, i, 2, attempt)
                meta = self._meta(rng)
                seeds = rng.integers(2**40, 2**62, size=2 * k + 1).tolist()  # never a benchmark's seed
                flaw = flaw_instruction(meta, rng) if source == "editing" else None
                draws.append(_Draw(i, source, meta, seeds, flaw))
            self._long_prompts([d for d in draws if d.source == "length"])
            requests, judged_as = [], []
            for d in draws:
                prompts = [d.prompt] * (1 if d.source == "editing" else k)
                if d.source == "length":
                    prompts += [d.long_prompt] * k
                d.start, d.count = len(requests), len(prompts)
                requests += [GenerationRequest(prompt=p, seed=s) for p, s in zip(prompts, d.seeds)]
                judged_as += [d.prompt] * len(prompts)  # always against the prompt the pair is filed under
            images = self._generate(requests)
            verdicts = self._score(images, judged_as)
            edits = [d for d in draws if d.source == "editing" and self._passes(verdicts[d.start])]
            edited = {}
            if edits:
                results = self.corrector.correct([CorrectionRequest(image=images[d.start], prompt=d.prompt,
                                                                    reflection="- " + d.flaw[1], seed=d.seeds[-1])
                                                  for d in edits])
                errors = [r.error for r in results if r.error]
                if errors:
                    raise _failed(f"corrector {self.plan.names['corrector']}", errors)
                judged = self._score([r.image for r in results], [d.prompt for d in edits])
                edited = {d.i: (r.image, v) for d, r, v in zip(edits, results, judged)}
            left = []
            for d in draws:
                pair = self._pair(d, images, verdicts, edited.get(d.i))
                if pair is None:
                    left.append((d.i, d.source))
                else:
                    pair["extra"]["attempt"] = attempt
                    found[d.i] = (d, pair)
            todo = left
        if todo:
            raise BuildError(f"samples {[i for i, _ in todo][:5]}: no {todo[0][1]} pair in {MAX_ATTEMPTS} prompt "
                             f"draws (verifier {self.plan.names['verifier']} never says no, or never yes, to them)")
        order = list(range(start, stop))
        reflections = self.reflector.reflect([
            ReflectionRequest(image=found[i][1]["bad"][0], original_prompt=found[i][0].prompt,
                              current_prompt=found[i][0].prompt, verdict=found[i][1]["bad"][1]) for i in order])
        errors = [r.error for r in reflections if r.error]
        if errors:
            raise _failed(f"reflector {self.plan.names['reflector']}", errors)
        return [self._triplet(*found[i], r.text) for i, r in zip(order, reflections)]

    def _triplet(self, d: _Draw, pair: dict, reflection: str) -> Triplet:
        (bad, vb), (good, vg) = pair["bad"], pair["good"]
        name = self.plan.names["verifier"]
        analysis = f"The prompt asks for: {d.prompt}. The verifier ({name}) {_says(vb)}."
        result = f"The better image: the verifier {_says(vg)}."
        extra = {"bad_score": round(float(vb.score), 4), "good_score": round(float(vg.score), 4),
                 "bad_yes": vb.yes, "good_yes": vg.yes, **pair["extra"]}
        if "tag" in d.meta:
            extra["tag"] = d.meta["tag"]
        return Triplet(d.source, d.prompt, np.asarray(bad), np.asarray(good), reflection, analysis, result, extra)


def _says(v) -> str:
    head = ("says no" if v.yes is False else "says yes" if v.yes else "scores it") + f" (score {v.score:.3f})"
    reason = next((str(v.details[k]) for k in ("explanation", "reason") if (v.details or {}).get(k)), None)
    return head + (f": {reason}" if reason else "")
