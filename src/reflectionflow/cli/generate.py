"""`reflectionflow generate` (search and write a run folder) and `reflectionflow report DIR`.

The one place a run's settings are read from flags, a --config file and the environment (the flux
backend's API key, the launcher's RANK / WORLD_SIZE), and passed to the library as arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from ..flags import add_batch_size, add_config
from . import one_line_errors

GENERATE_HELP = """\
Spend a budget of images per prompt along the noise, prompt or reflection axis and write a
GenEval-layout run folder (OUT/<NNNNN>/samples/0000.png is the verifier's pick) with every
candidate in OUT/<NNNNN>/trace.jsonl, the ledger, the resolved config and report.html.

Defaults: the world backend, the reflection method, a budget of 8 (about 20 s per prompt on a
2-core CPU, start-up included). The world backend's default generator and corrector are the
project's trained MMDiT models (world-mmdit: weights/world-generator, weights/world-corrector;
faster correctors: world-mmdit-kv with cached condition keys/values, world-mmdit-partial from the
previous image half noised, world-mmdit-kv-partial both). The verifier and reflector are the learned
ones (world-learned); world-oracle names the exact GenEval-Shapes evaluator and the detector, whose
accuracies are the paper's oracle-verifier upper bound; the refiner is world-rule. The
renderer-backed stand-ins world-render (generator) and world-edit (corrector) run in milliseconds.

methods: noise (best-of-N over seeds), zero-order (neighbours of the best noise, Flux-TTS),
prompt (N chains x M rounds of prompt refinement), reflection (ReflectionFlow: pool, then
N chains x M rounds of reflect -> refine -> correct). Budget: pool + chains x depth = budget.

--backend flux: any prompt text (or --prompts geneval), FLUX.1 from --flux-path, the reflection
corrector's --lora-path, and VLM judges at --vlm-url (GPT-4o, a vLLM server, `reflectionflow
serve`). The API key is read from the variable --vlm-api-key-env names (default OPENAI_API_KEY),
on every run and every --resume; it is never written anywhere. Folders, LoRA keys, the endpoint
and its key are all checked before any weights load. See docs/backends.md.

Several processes, GPUs or nodes: start the same command under `accelerate launch --multi_gpu
--num_processes N -m reflectionflow generate ...` (accelerate comes with the [flux] extra) or
torchrun (with torch). The processes share the prompts
and one run folder; rank 0 writes the ledger and report.html for the whole run; --resume works
with any number of processes. See docs/scale-out.md.
"""


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="search along noise / prompt / reflection axes and write a run folder",
                       description=GENERATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    one_line_errors(g, "generate")
    g.add_argument("prompt", nargs="?", default=None,
                   help="one prompt (world: a GenEval-Shapes template; flux: any text)")
    g.add_argument("--prompts", default=None, metavar="FILE|DIR|SET",
                   help="GenEval metadata .jsonl, .txt (one prompt per line), .csv / .tsv with a prompt column "
                   "and an optional category column (DrawBench, PartiPrompts), a folder of such files, or a named "
                   "set: geneval-shapes, geneval-shapes-val; flux also geneval (GenEval's own 553 prompts). "
                   "world: free text must fit a Shapes-world template")
    add_config(g)
    g.add_argument("--out", default=None, metavar="DIR",
                   help="run folder (default runs/<method>-b<budget>-s<seed>-<prompt hash>, with -2, -3, ... "
                   "when that exists)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out; regenerates nothing on disk")
    s = g.add_argument_group("search")
    s.add_argument("--method", default=None, help="noise | zero-order | prompt | reflection (default reflection)")
    s.add_argument("--budget", type=int, default=None, help="images per prompt, every kind counted (default 8)")
    s.add_argument("--chains", type=int, default=None, help="prompt / reflection: parallel chains N")
    s.add_argument("--depth", type=int, default=None, help="prompt / reflection: rounds per chain M")
    s.add_argument("--pool", type=int, default=None, help="reflection: initial noise pool P (P + N x M = budget)")
    s.add_argument("--seed", type=int, default=None, help="run seed; every image's seed derives from it (default 0)")
    s.add_argument("--backtrack", action="store_true", default=None,
                   help="reflection: correct each chain's best image so far, not its latest")
    s.add_argument("--early-stop", type=float, default=None, metavar="SCORE",
                   help="prompt / reflection: stop a chain once the verifier says yes with this score")
    s.add_argument("--reallocate", default=None, metavar="WHERE",
                   help="with --early-stop, where saved images go: none | chains (default) | prompts")
    s.add_argument("--on-keep", default=None, metavar="WHAT",
                   help="reflection: when the reflector asks for no change, correct (default: the corrector "
                   "runs anyway) | resample (a fresh noise sample of the chain's prompt instead)")
    s.add_argument("--no-refine", dest="refine_prompts", action="store_false", default=None,
                   help="reflection: keep the original prompt (no prompt refinement)")
    s.add_argument("--neighbors", type=int, default=None, help="zero-order: neighbours per round (default 4)")
    s.add_argument("--threshold", type=float, default=None, help="zero-order: cosine to the pivot (default 0.95)")
    add_component_arguments(g)
    x = g.add_argument_group("execution")
    x.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only N prompts, taken in turn from each category (the mix kept)")
    add_batch_size(x, None, shown=64)
    x.add_argument("--prompt-batch", type=int, default=None, help="prompts searched together (default 64)")
    x.add_argument("--workers", type=int, default=None, help="component calls in flight at once (default 1)")
    x.add_argument("--quiet", action="store_true", help="no progress bar")
    x.add_argument("--no-report", action="store_true", help="skip report.html (rebuild it with `report DIR`)")
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("report", help="rebuild report.html and the ledger totals of a run folder",
                       description="Rebuild OUT/ledger.json from the traces and OUT/report.html (the trace "
                       "viewer: every prompt's chains as a tree of thumbnails, the selection marked).")
    one_line_errors(r, "report")
    r.add_argument("dir", help="a run folder written by `reflectionflow generate`")
    r.add_argument("--no-evaluate", action="store_true", help="no evaluator column in the best-of-k table")
    r.set_defaults(func=cmd_report)


def add_component_arguments(g: argparse.ArgumentParser, verifier: bool = True) -> None:
    """--backend, the components by name and every backend's own flags (`generate`, `sweep`)."""
    from ..flags import names
    c = g.add_argument_group("components")
    from ..engine.backends import BACKENDS

    c.add_argument("--backend", default=None, help=f"{' | '.join(BACKENDS)} (default world)")
    defaults = {name: backend.defaults() for name, backend in BACKENDS.items()}
    for kind in ("generator", "verifier", "reflector", "refiner", "corrector"):
        if kind != "verifier" or verifier:
            default = "; ".join(f"{d[kind]} on {b}" for b, d in defaults.items() if d.get(kind))
            c.add_argument(f"--{kind}", default=None, metavar="NAME",
                           help=f"{kind}: {names(kind)} (default {default})")
    owned: dict[str, list[tuple[str, str]]] = {}  # backend -> its flags' (dest, option string)
    for backend in BACKENDS.values():
        if backend.add_arguments is not None:
            before = len(g._actions)
            backend.add_arguments(g)
            owned[backend.name] = [(a.dest, a.option_strings[0]) for a in g._actions[before:] if a.option_strings]
    g.set_defaults(backend_flags=owned)


_FLAG_FIELDS = ("method", "budget", "chains", "depth", "pool", "seed", "backtrack", "early_stop", "reallocate",
                "on_keep", "refine_prompts", "neighbors", "threshold", "backend", "generator", "verifier", "reflector",
                "refiner", "corrector", "limit", "batch_size", "prompt_batch", "workers")


def build_config(args):
    """(RunConfig from --config FILE and the flags, the backend's secrets). The secrets (an API key,
    read from the environment here, on every run and every resume) are no part of the config, so
    nothing that writes a config can write them."""
    from ..config import ConfigError, from_dict, load_config_file
    from ..engine.backends import get_backend

    data = load_config_file(args.config) if args.config else {}
    for name in _FLAG_FIELDS:
        v = getattr(args, name, None)
        if v is not None:
            data[name] = v
    data["progress"] = not args.quiet
    backend = get_backend(data.get("backend", "world"))
    for other, flags in (getattr(args, "backend_flags", None) or {}).items():
        given = [flag for dest, flag in flags if getattr(args, dest, None) is not None]
        if other != backend.name and given:
            raise ConfigError(f"{', '.join(given)}: flag{'s' if len(given) > 1 else ''} of --backend {other}, "
                              f"but the backend is {backend.name!r}; add --backend {other}")
    if backend.options_from_args is not None:
        options = {k: dict(v) for k, v in (data.get("options") or {}).items()}
        for kind, opts in backend.options_from_args(args, os.environ).items():
            options.setdefault(kind, {}).update(opts)  # flags override the config file
        data["options"] = options
    secrets: dict[str, str] = {}
    if backend.settings_from_args is not None:
        base = data.get("backend_options") or {}
        if not isinstance(base, dict):
            raise ConfigError(f"{args.config}: backend_options must be a mapping, got {type(base).__name__}")
        data["backend_options"], secrets = backend.settings_from_args(args, os.environ, base)
    return from_dict(data, where=args.config or "flags"), secrets


@contextmanager
def launched():
    """This process's place in a launch (accelerate launch / torchrun: the launcher's variables say
    which), connected to its peers and bound to its GPU; a single process outside any launcher."""
    from ..engine.distributed import DistContext, launch_note

    note = launch_note(os.environ)
    if note:
        print(f"reflectionflow: warning: {note}", file=sys.stderr)
    with DistContext.from_environ(os.environ).connected() as dist:
        dist.bind_device()
        yield dist


def default_out(config, source: str, resume: bool) -> str:
    """runs/<method>-b<budget>-s<seed>-<8 hex digits of the prompt or prompts file>. A new run never
    lands in a folder that exists: it takes the first free -2, -3, ... (--resume takes the plain name)."""
    import hashlib

    digest = hashlib.blake2b(source.strip().encode(), digest_size=4).hexdigest()
    base = f"runs/{config.method}-b{config.budget}-s{config.seed}-{digest}"
    if resume or not os.path.exists(base):
        return base
    k = 2
    while os.path.exists(f"{base}-{k}"):
        k += 1
    return f"{base}-{k}"


def cmd_generate(args) -> int:
    from ..engine.distributed import DistributedError
    from ..pipeline import generate

    config, secrets = build_config(args)
    out = args.out or default_out(config, args.prompt or args.prompts or "", args.resume)
    # One of several processes (accelerate launch / torchrun): the launcher's variables say which.
    try:
        # `generate` checks everything (config, prompts, the backend's folders and endpoint, the run
        # folder) before it builds a component: bad input never costs a model load.
        with launched() as dist:
            result = generate(config, out, prompt=args.prompt, prompts=args.prompts, resume=args.resume,
                              progress=config.progress, report=not args.no_report, secrets=secrets, dist=dist)
    except DistributedError as e:
        print(f"reflectionflow: error: {e}", file=sys.stderr)
        return 1
    if not dist.is_main:
        return 0  # rank 0 reports the whole run
    led = result.ledger
    tot = led["totals"]
    scores = [d.get("score") for d in result.selected.values() if d.get("score") is not None]
    yes = [bool(d.get("yes")) for d in result.selected.values() if d.get("yes") is not None]
    failed = f" ({tot['failed']} requests failed; see the trace)" if tot.get("failed") else ""
    cached = f" (+{tot['cached']} passes from the step cache)" if tot.get("cached") else ""
    print(f"{led['prompts_done']}/{led['prompts']} prompts, {tot['images']} images "
          f"({led['budget_per_prompt']} per prompt), NFE {tot['nfe']}{cached}, VLM calls {tot['vlm_calls']}{failed}, "
          f"{tot['wall_s']:.1f} s in components")
    if scores:
        msg = f"selection: mean verifier score {sum(scores) / len(scores):.3f}"
        if yes:
            msg += f", verifier yes {sum(yes)}/{len(yes)}"
        print(msg + f" (verifier {led['verifier']})")
    if len(result.selected) == 1:
        (i, d), = result.selected.items()
        print(f"selected: {Path(out) / f'{i:05d}' / d['file']} -> {Path(out) / f'{i:05d}' / 'samples' / '0000.png'}")
    if result.processes > 1:
        print(f"{result.processes} processes searched it; ledger.json covers them all")
    wrote = f"wrote {out}/ (ledger.json, config.json{'' if args.no_report else ', report.html'})"
    free = free_text_prompts(Path(out), result.selected)
    if free:
        print(f"{wrote}; {free} of {len(result.selected)} prompts have no Shapes-world GenEval metadata, so the "
              f"exact GenEval-Shapes evaluator is skipped; score it with: reflectionflow evaluate {out} --metric "
              f"clipscore (or pickscore, fid, vlm-yesno, ...)")
    else:
        print(f"{wrote}; score it with: reflectionflow evaluate {out}")
    verify = tot.get("by_stage", {}).get("verify", {})
    if verify.get("items") and verify.get("failed", 0) >= verify["items"]:
        # Every image is unjudged: the selection is each prompt's first image, not a choice.
        print(f"reflectionflow: error: every verifier request failed ({verify['failed']} of {verify['items']}); "
              f"the selections are unjudged (each prompt's first image); the trace's verdict_error says why",
              file=sys.stderr)
        return EXIT_NO_JUDGE
    return 0


# A run that finished but whose every verifier request failed (an endpoint down or refusing the key
# for the whole run): its folder is complete, but no selection was judged. 2 is bad input, 1 a
# failed launch of several processes, 130 an interrupt.
EXIT_NO_JUDGE = 3


def free_text_prompts(out: Path, indices) -> int:
    """How many of the run's prompts the exact evaluator cannot judge (free text, other classes)."""
    import json

    from ..world.spec import is_world_metadata

    n = 0
    for i in indices:
        path = out / f"{i:05d}" / "metadata.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        n += not (lines and is_world_metadata(json.loads(lines[0])))
    return n


def cmd_report(args) -> int:
    from ..engine.runner import write_ledger
    from ..report import write_report
    from ..runs import RunFolder, RunFolderError

    folder = RunFolder(Path(args.dir))
    if not folder.root.is_dir():
        raise RunFolderError(f"{folder.root}: no such run folder")
    config = folder.read_config()
    if config is None:
        raise RunFolderError(f"{folder.root}: no config.json; not a run folder of `reflectionflow generate`")
    cfg = config.get("config", {})
    old = folder.ledger_path
    session = {}
    if old.is_file():
        import json

        try:
            session = json.loads(old.read_text(encoding="utf-8")).get("session", {})
        except (json.JSONDecodeError, UnicodeDecodeError):
            session = {}
    led = write_ledger(folder, folder.prompt_indices(), cfg.get("budget", 0), config.get("components", {}), session)
    path = write_report(folder.root, evaluate=not args.no_evaluate)
    print(f"{led['prompts_done']}/{led['prompts']} prompts, {led['totals']['images']} images; "
          f"wrote {folder.ledger_path} and {path}", file=sys.stdout)
    return 0
