"""`reflectionflow evaluate DIR`: score a run folder with the exact GenEval-Shapes evaluator or any metric
(metrics/): the metric flags, the one reading of the environment (a VLM metric's API key), the output."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..flags import DTYPES, add_batch_size, add_bootstrap, add_device, add_dtype
from ..metrics.base import MetricError, MetricOptions
from . import one_line_errors

METRIC_HELP = """\
metrics (--metric NAME, repeatable; default geneval-shapes when every prompt is a Shapes-world one):
  geneval-shapes  the exact GenEval-Shapes evaluator; writes DIR/results.jsonl and DIR/scores.json
  clipscore       CLIPScore, 100 x max(cos, 0), from --clip-path (folder or hub id; default
                  openai/clip-vit-large-patch14)
  pickscore       PickScore reward model from --pickscore-path (default yuvalkirstain/PickScore_v1)
  fid             FID of DIR's samples against --reference DIR, Inception-v3 weights from
                  --inception-path (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)
  any verifier    vlm-yesno (P(yes), VQAScore-style) and vlm-score (0-10 judge) with --vlm-url and
                  --vlm-model; local-yesno with --local-verifier-path; world-oracle; others with
                  --verifier-option KEY=VALUE
Each metric but geneval-shapes writes DIR/metrics/<name>/results.jsonl and summary.json. A metric
that is the run's own verifier (config.json) is flagged same_as_run_verifier: not independent.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a run folder: the exact GenEval-Shapes evaluator, CLIPScore, PickScore, FID, any verifier",
        description="Score DIR/<NNNNN>/samples/*.png. By default (Shapes-world prompts) apply GenEval's rules\n"
        "with the world detector: print overall and per-category accuracy; write DIR/results.jsonl and\n"
        "DIR/scores.json. With --metric NAME, any other metric; it writes DIR/metrics/<NAME>/.",
        epilog=METRIC_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    one_line_errors(p, "evaluate")
    p.add_argument("dir", help="a GenEval-layout folder (DIR/<NNNNN>/metadata.jsonl, DIR/<NNNNN>/samples/*.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary (scores.json / summary.json) as JSON")
    add_metric_arguments(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    import os

    from ..metrics import evaluate_runs

    options = options_from_args(args, os.environ)
    results = evaluate_runs(Path(args.dir), args.metric, options, progress=not args.quiet)
    print_results(results, args.json)
    return 0


def add_metric_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metric", action="append", default=None, metavar="NAME",
                   help="a metric (repeatable); see below. Default: geneval-shapes for Shapes-world prompts")
    m = p.add_argument_group("metric settings")
    m.add_argument("--clip-path", metavar="DIR|HUB_ID", help="clipscore: transformers CLIP folder or hub id")
    m.add_argument("--pickscore-path", metavar="DIR|HUB_ID", help="pickscore: the PickScore model")
    m.add_argument("--pickscore-processor", metavar="DIR|HUB_ID",
                   help="pickscore: its processor, when the model folder has none")
    m.add_argument("--reference", metavar="DIR", help="fid: reference images (PNG / JPG, or a GenEval-layout folder)")
    m.add_argument("--inception-path", metavar="FILE", help="fid: Inception-v3 FID weights (.pth or .safetensors)")
    add_bootstrap(m, "fid: resamples of the run's images for the 95 %% interval; 0: none")
    m.add_argument("--local-verifier-path", metavar="DIR", help="local-yesno: a transformers VLM folder")
    m.add_argument("--vlm-url", metavar="URL", help="vlm-yesno / vlm-score: OpenAI-compatible endpoint")
    m.add_argument("--vlm-model", metavar="NAME", help="vlm-yesno / vlm-score: the served model")
    m.add_argument("--vlm-api-key-env", metavar="VAR", default=None,
                   help="vlm-*: environment variable holding the API key (default OPENAI_API_KEY)")
    m.add_argument("--vlm-concurrency", type=int, default=None, metavar="N", help="vlm-*: requests in flight")
    m.add_argument("--verifier-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the verifier used as a metric (repeatable)")
    add_device(m)
    add_dtype(m)
    add_batch_size(m, 16, "images per model call")


def _value(text: str):
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def options_from_args(args, environ) -> MetricOptions:
    """The one place the environment is read: the VLM API key, from the variable the user names."""
    from ..backends.vlm.options import DEFAULT_KEY_ENV

    if args.batch_size < 1:
        raise MetricError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.dtype not in DTYPES:
        raise MetricError(f"--dtype {args.dtype!r}; accepted: {', '.join(DTYPES)}")
    if args.bootstrap < 0:
        raise MetricError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    extra = {}
    for item in args.verifier_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MetricError(f"--verifier-option {item!r}: expected KEY=VALUE")
        extra[key.strip()] = _value(value)
    vlm: dict = {}
    if args.vlm_url or args.vlm_model:
        env = args.vlm_api_key_env or DEFAULT_KEY_ENV
        vlm = {"url": args.vlm_url, "model": args.vlm_model, "api_key": environ.get(env) or None,
               "api_key_env": env, "api_key_env_explicit": args.vlm_api_key_env is not None,
               "concurrency": args.vlm_concurrency}
    return MetricOptions(clip_path=args.clip_path, pickscore_path=args.pickscore_path,
                         pickscore_processor=args.pickscore_processor, local_verifier_path=args.local_verifier_path,
                         vlm=vlm, verifier_options=extra, reference=args.reference,
                         inception_path=args.inception_path, device=args.device, dtype=args.dtype,
                         batch_size=args.batch_size, bootstrap=args.bootstrap)


def format_result(result) -> str:
    """A few lines for the terminal: the headline number, categories, flags, files."""
    from ..world.evaluate import format_summary

    s = result.summary
    if result.name == "geneval-shapes":
        lines = [format_summary(s)]
        if s.get("unreadable"):
            lines.append(f"  {s['unreadable']} unreadable image(s) counted as incorrect; see results.jsonl")
    elif s.get("kind") == "set":
        ci = f" [{s['ci95'][0]:.4g}, {s['ci95'][1]:.4g}]" if s.get("ci95") else ""
        lines = [f"{result.name}  {s['value']:.4g}{ci}  ({s['n_images']} images vs {s['n_reference']} reference; "
                 f"{s['feature_dim']}-d features)"]
    else:
        mean = "n/a" if s.get("mean") is None else f"{s['mean']:.4f}"
        yes = f", yes {s['yes_rate']:.3f}" if s.get("yes_rate") is not None else ""
        failed = f", {s['failed']} failed (see results.jsonl)" if s.get("failed") else ""
        lines = [f"{result.name}  mean {mean}{yes}  ({s['n_images']} images, {s['n_prompts']} prompts{failed})"]
        for c, v in (s.get("categories") or {}).items():
            lines.append(f"  {c:24s} {v:.4f}")
    if s.get("same_as_run_verifier"):
        lines.append(f"  note: {s['independence']}")
    lines.append(f"wrote {result.files[0]} and {result.files[1]}")
    return "\n".join(lines)


def print_results(results, as_json: bool) -> None:
    import json

    if as_json:
        out = {r.name: r.summary for r in results}
        print(json.dumps(out if len(results) > 1 else results[0].summary, indent=2))
        return
    for r in results:
        print(format_result(r))

