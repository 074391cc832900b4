"""The Python API: a pipeline built from names or folders, called with prompts and a budget.

    from reflectionflow import ReflectionFlowPipeline

    pipe = ReflectionFlowPipeline.from_pretrained("world")          # the world backend's defaults
    out = pipe("a photo of a red circle and a blue square", budget=8)
    out.images[0].save("circle.png")                                # PIL images, one per prompt
    print(out.selected[0].score, out.ledger.images, len(out.traces[0]))

`from_pretrained` builds the components once (this is where weights load); each call searches its
prompts with `generate`, the code path of `reflectionflow generate`, and returns dataclasses:
`PipelineOutput` (images, selected candidates, traces, the ledger). Without `output_dir` the run
folder is a temporary one, removed once everything is read back; with it the folder is kept, in
GenEval's layout, with report.html, and `resume=True` continues it.

Bad input raises `ArgumentError` (a ValueError) naming the argument, before any search starts.
docs/api.md documents every argument.

`generate(config, out, ...)` is the same run as a function of a RunConfig: the engine's search,
then report.html.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .config import COMPONENT_KINDS, RunConfig

if TYPE_CHECKING:
    from PIL.Image import Image

    from .engine import RunResult
    from .engine.executor import Components

__all__ = ["ArgumentError", "Ledger", "PipelineOutput", "ReflectionFlowPipeline", "StageCost", "TraceEntry",
           "generate"]


def generate(config: RunConfig, out: str | Path, prompt: str | Sequence[str] | None = None, *,
             report: bool = True, **search) -> RunResult:
    """`reflectionflow generate` as a function: `engine.search` (every check, the components, the
    search, the run folder and its ledger; `search` holds its other arguments: prompts, resume,
    components, progress, secrets, dist), then, with `report`, report.html (rank 0 of several
    processes writes it, once all have finished)."""
    from .engine import search as run_search

    result = run_search(config, out, prompt=prompt, **search)
    if report and result.rank == 0:
        from .report import write_report

        write_report(result.out)
    return result


class ArgumentError(ValueError):
    """An argument of the Python API that is missing, malformed or does not fit the others."""

    def __init__(self, message: str, argument: str | None = None):
        super().__init__(message)
        self.argument = argument  # the argument at fault, when one is


# ----------------------------------------------------------------------------------------------
# What a call returns


@dataclass(frozen=True)
class TraceEntry:
    """One candidate image of the search, as the trace records it."""

    id: str  # n0003 (noise), z0002-1 (zero-order neighbour), c01r0004 (chain 1, round 4)
    order: int  # generation order within the prompt
    kind: str  # noise | neighbour | prompt | correct
    chain: int
    round: int
    seed: int
    prompt: str  # the prompt it was made from (a refined prompt differs from the original)
    parent: str | None  # the candidate it corrects or refines from
    reflection: str | None  # the edit commands that produced it (corrections)
    score: float | None  # the verifier's score (None: the verifier failed on it)
    yes: bool | None  # the verifier's yes/no, when it answers one
    correct: bool | None  # the exact GenEval-Shapes evaluator's verdict (world prompts; else None)
    nfe: int  # transformer passes spent on it
    errors: tuple[str, ...] = ()
    verdict: dict = field(default_factory=dict, repr=False)  # the verifier's details
    image: Image | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class StageCost:
    items: int = 0
    images: int = 0
    nfe: int = 0  # full transformer passes
    cached: int = 0  # passes a step cache served (only the first block ran)
    calls: int = 0  # judge calls (VLM requests)
    tokens: int = 0
    failed: int = 0
    wall_s: float = 0.0


@dataclass(frozen=True)
class Ledger:
    """What the call spent, counted from the traces (the run folder's ledger.json)."""

    prompts: int
    budget_per_prompt: int
    images: int
    nfe: int
    vlm_calls: int
    tokens: int
    failed: int
    wall_s: float  # seconds inside components
    by_stage: dict[str, StageCost]
    components: dict[str, str]  # kind -> registry name
    cached: int = 0  # transformer passes served from a step cache (not in nfe)

    @classmethod
    def from_dict(cls, d: Mapping) -> Ledger:
        t = d["totals"]
        names = {f.name for f in fields(StageCost)}
        return cls(prompts=d["prompts"], budget_per_prompt=d["budget_per_prompt"], images=t["images"],
                   nfe=t["nfe"], vlm_calls=t["vlm_calls"], tokens=t["tokens"], failed=t["failed"],
                   wall_s=t["wall_s"], components=dict(d.get("components") or {}), cached=t.get("cached", 0),
                   by_stage={s: StageCost(**{k: v for k, v in st.items() if k in names})
                             for s, st in t["by_stage"].items()})


@dataclass(frozen=True)
class PipelineOutput:
    """One entry per prompt, in the order given: its selected image, candidate and trace."""

    prompts: list[str]
    images: list[Image]  # the verifier's pick for each prompt
    selected: list[TraceEntry]
    traces: list[list[TraceEntry]]  # every candidate of each prompt, in generation order
    ledger: Ledger
    output_dir: Path | None  # the run folder when it was kept (output_dir=...), else None


# ----------------------------------------------------------------------------------------------
# The pipeline

# The world component a weights folder of each kind is for.
WORLD_WEIGHTS = {"generator": "world-mmdit", "corrector": "world-mmdit", "verifier": "world-learned",
                 "reflector": "world-learned"}
# Flags in the engine's messages, as the arguments of this API name them.
_FLAG_ARGUMENTS = {"--out": "output_dir", "--resume": "resume=True", "--no-refine": "refine_prompts=False",
                   "--prompts": "prompts"}
_CALL_ARGUMENTS = ("prompt", "prompts", "budget", "method", "seed", "chains", "depth", "pool", "backtrack",
                   "early_stop", "reallocate", "refine_prompts", "neighbors", "threshold", "limit", "batch_size",
                   "output_dir", "resume")


def _as_argument_error(err: ValueError, arguments: Sequence[str], default: str | None = None) -> ArgumentError:
    """The engine's message with its flags written as this API's arguments, and the argument it names."""
    text = str(err)
    text = re.sub(r"--[a-z][a-z0-9-]*", lambda m: _FLAG_ARGUMENTS.get(m.group(0), m.group(0)[2:].replace("-", "_")),
                  text)
    text = re.sub(r"\b(\w+) \(\1\)", r"\1", text)  # "budget (--budget)" -> "budget"
    text = text.replace("a PROMPT", "a prompt")
    found = [(m.start(), name) for name in arguments if (m := re.search(rf"\b{name}\b", text))]
    return ArgumentError(text, min(found)[1] if found else default)


class ReflectionFlowPipeline:
    """Inference-time scaling over built components: noise, prompt and reflection search.

    Build it with `from_pretrained`; call it with a prompt (or a list of prompts) and a budget.
    """

    def __init__(self, config: RunConfig, components: Components, secrets: Mapping[str, str] | None = None):
        self.config = config  # backend, component names and options (the method and budget come per call)
        self.components = components
        self._secrets = dict(secrets or {})

    def __repr__(self) -> str:
        names = ", ".join(f"{k}={getattr(self.config, k)!r}" for k in COMPONENT_KINDS)
        return f"ReflectionFlowPipeline(backend={self.config.backend!r}, {names})"

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained: str | Path = "world", *, generator: str | Path | None = None,
                        verifier: str | Path | None = None, reflector: str | Path | None = None,
                        refiner: str | Path | None = None, corrector: str | Path | None = None,
                        options: Mapping[str, Mapping] | None = None, backend_options: Mapping | None = None,
                        api_key: str | None = None) -> ReflectionFlowPipeline:
        """Build the five components (weights load here).

        `pretrained`: a backend name (`world`, `flux`) or a world generator folder (model.safetensors
        + config.json, as `reflectionflow train world-generator` writes). Each component is a registry
        name (`reflectionflow generate --help` lists them) or, on the world backend, a weights folder for
        that kind's trained component (world-mmdit for the generator and corrector, world-learned for
        the judges). `options`: per kind, the component's own settings (e.g.
        {"generator": {"steps": 10, "device": "cpu"}}). `backend_options` and `api_key`: the flux
        backend's shared settings (docs/backends.md) and the VLM endpoint's key.
        """
        from . import components as registry
        from .engine.backends import BACKENDS, build_components, check_backend, resolve_components

        given = {"generator": generator, "verifier": verifier, "reflector": reflector, "refiner": refiner,
                 "corrector": corrector}
        opts = {} if options is None else (
            {k: dict(v) if isinstance(v, Mapping) else v for k, v in options.items()}
            if isinstance(options, Mapping) else options)
        if not isinstance(pretrained, (str, Path)) or not str(pretrained).strip():
            raise ArgumentError(f"pretrained must be a backend name ({', '.join(BACKENDS)}) or a generator folder, "
                                f"got {pretrained!r}", "pretrained")
        backend = str(pretrained)
        if backend not in BACKENDS:
            folder = Path(pretrained).expanduser()
            if not folder.is_dir():
                raise ArgumentError(f"pretrained: {str(pretrained)!r} is neither a backend ({', '.join(BACKENDS)}) "
                                    f"nor a folder", "pretrained")
            if generator is not None:
                raise ArgumentError("pretrained is a generator folder and generator is given too; give one",
                                    "generator")
            backend, given["generator"] = "world", folder
        BACKENDS[backend].defaults()  # imports the backend's module: its components are registered
        names: dict[str, str | None] = {}
        for kind, value in given.items():
            if value is None:
                names[kind] = None
                continue
            if not isinstance(value, (str, Path)) or not str(value).strip():
                raise ArgumentError(f"{kind} must be a {kind} name or a folder, got {value!r}", kind)
            if isinstance(value, str) and value in registry.names(kind):
                names[kind] = value
                continue
            folder = Path(value).expanduser()
            if not folder.is_dir():
                raise ArgumentError(f"{kind}: {str(value)!r} is neither a {kind} name (accepted: "
                                    f"{', '.join(registry.names(kind))}) nor a folder", kind)
            if backend != "world":
                raise ArgumentError(f"{kind}: a folder names world weights; the {backend} backend takes its "
                                    f"folders in backend_options", kind)
            if kind not in WORLD_WEIGHTS:
                raise ArgumentError(f"{kind}: the world's {kind}s take no weights folder; accepted: "
                                    f"{', '.join(registry.names(kind))}", kind)
            names[kind] = WORLD_WEIGHTS[kind]
            if isinstance(opts, dict) and isinstance(opts.setdefault(kind, {}), dict):
                opts[kind]["weights"] = str(folder.resolve())
        secrets = {}
        if api_key is not None:
            from .backends.flux.options import SECRET_API_KEY

            secrets[SECRET_API_KEY] = api_key
        base = RunConfig(backend=backend, **names, options=opts if opts is not None else {},
                         backend_options=dict(backend_options or {}), progress=False)
        arguments = ("pretrained", *given, "options", "backend_options", "api_key")
        try:
            config = resolve_components(base.validate())  # method reflection: every kind resolved
        except ValueError as e:
            raise _as_argument_error(e, arguments) from None
        try:  # the backend's own checks: its shared settings (flux: folders, the endpoint, the key)
            config, plan = check_backend(config, secrets)
        except ValueError as e:
            raise _as_argument_error(e, arguments, "backend_options") from None
        try:
            built = build_components(config, secrets, plan=plan)
        except ValueError as e:
            raise _as_argument_error(e, arguments) from None
        return cls(config, built, secrets)

    # ------------------------------------------------------------------------------------------
    def __call__(self, prompt: str | Sequence[str] | None = None, *, budget: int = 8, method: str = "reflection",
                 seed: int = 0, chains: int | None = None, depth: int | None = None, pool: int | None = None,
                 backtrack: bool = False, early_stop: float | None = None, reallocate: str = "chains",
                 refine_prompts: bool = True, neighbors: int = 4, threshold: float = 0.95,
                 prompts: str | Path | None = None, limit: int | None = None, batch_size: int = 64,
                 output_dir: str | Path | None = None, resume: bool = False, progress: bool = False,
                 evaluate: bool = True) -> PipelineOutput:
        """Search each prompt with `budget` images and return what was selected, with the traces.

        `prompt`: a prompt or a list of prompts (the world backend reads Shapes-world prompts; see
        `reflectionflow world vocabulary`); or `prompts`: a prompts file or a named set
        (geneval-shapes), with `limit` prompts taken in turn from each category. `method`: noise,
        zero-order, prompt or reflection; `pool + chains x depth == budget` (filled in when not
        given). `evaluate`: the exact evaluator's verdict on every candidate of a world prompt.
        """
        from .engine import component_names
        from .runs import RunFolder

        if prompt is None and prompts is None:
            raise ArgumentError("give a prompt (a string or a list of strings) or prompts (a file or a named set)",
                                "prompt")
        if prompt is not None:
            if prompts is not None:
                raise ArgumentError("give prompt or prompts, not both", "prompts")
            items = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) for p in items):
                raise ArgumentError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}"[:300],
                                    "prompt")
            prompt = list(items)
        if not isinstance(resume, bool):
            raise ArgumentError(f"resume must be True or False, got {resume!r}", "resume")
        if resume and output_dir is None:
            raise ArgumentError("resume=True continues the run in output_dir; give output_dir", "output_dir")
        config = replace(self.config, method=method, budget=budget, seed=seed, chains=chains, depth=depth, pool=pool,
                         backtrack=backtrack, early_stop=early_stop, reallocate=reallocate,
                         refine_prompts=refine_prompts, neighbors=neighbors, threshold=threshold, limit=limit,
                         batch_size=batch_size, progress=progress)
        components = replace(self.components, names={})
        keep = output_dir is not None
        tmp = None if keep else tempfile.TemporaryDirectory(prefix="reflectionflow-")
        root = Path(output_dir) if keep else Path(tmp.name) / "run"
        try:
            try:
                if keep:
                    from .io import check_writable_dir

                    check_writable_dir(root, "output_dir")
                config = config.validate()
                components = replace(components, names=component_names(config))
                result = generate(config, root, prompt=prompt, prompts=None if prompts is None else str(prompts),
                                  resume=resume, components=components, progress=progress, report=keep,
                                  secrets=self._secrets)
            except ValueError as e:
                raise _as_argument_error(e, _CALL_ARGUMENTS) from None
            return _read_output(RunFolder(result.out), result, evaluate, root if keep else None)
        finally:
            if tmp is not None:
                tmp.cleanup()


def _read_output(folder, result, evaluate: bool, kept: Path | None) -> PipelineOutput:
    import numpy as np

    from .io import load_image
    from .world.spec import is_world_metadata

    prompts, images, selected, traces = [], [], [], []
    for i in sorted(result.selected):
        done = result.selected[i]
        meta = _metadata(folder, i)
        judge = None
        if evaluate and meta is not None and is_world_metadata(meta):
            from .world.evaluate import evaluate_image

            judge = lambda image, meta=meta: bool(evaluate_image(np.asarray(image), meta).correct)  # noqa: E731
        trace = []
        for rec in folder.load_trace(i):
            image = load_image(folder.image_path(i, rec["file"]), pil=True)
            trace.append(TraceEntry(
                id=rec["id"], order=rec["order"], kind=rec["kind"], chain=rec["chain"], round=rec["round"],
                seed=rec["seed"], prompt=rec["prompt"], parent=rec["parent"], reflection=rec["reflection"],
                score=rec["score"], yes=rec["yes"], correct=judge(image) if judge else None, nfe=rec["nfe"],
                errors=tuple(rec.get("errors") or ()), verdict=dict(rec.get("verdict") or {}), image=image))
        pick = next(t for t in trace if t.id == done["selected"])
        prompts.append(done["prompt"])
        images.append(pick.image)
        selected.append(pick)
        traces.append(trace)
    return PipelineOutput(prompts=prompts, images=images, selected=selected, traces=traces,
                          ledger=Ledger.from_dict(result.ledger), output_dir=kept)


def _metadata(folder, i: int) -> dict | None:
    import json

    path = folder.prompt_dir(i) / "metadata.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return json.loads(lines[0]) if lines else None
