"""`reflectionflow world sample|prompts|vocabulary`: the Shapes world's ground truth, prompt sets and vocabulary."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("world", help="the Shapes world: draw ground truth, list prompts, show the vocabulary")
    wsub = w.add_subparsers(dest="world_command", metavar="WHAT", required=True)
    s = wsub.add_parser("sample", help="draw ground-truth images in GenEval layout",
                        description="Draw the true scene of every prompt (N samples each, seeded) into a "
                        "GenEval-layout folder, with each scene's objects in scenes.jsonl.")
    s.add_argument("--prompts", default="geneval-shapes",
                   help="a prompts file (.jsonl GenEval lines; .txt, .csv, .tsv of world prompts), a folder of them, "
                   "or a named set: geneval-shapes (default), geneval-shapes-val")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n-samples", type=int, default=4, help="images per prompt (default 4)")
    s.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    s.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    s.set_defaults(func=cmd_sample)
    pr = wsub.add_parser("prompts", help="write a GenEval-format world prompt set",
                         description="Draw a prompt set with GenEval's per-category counts (or --per-category).")
    pr.add_argument("--out", required=True, help="output JSONL")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--per-category", type=int, default=None, help="prompts per category instead of GenEval's counts")
    pr.set_defaults(func=cmd_prompts)
    v = wsub.add_parser("vocabulary", help="print the templates, classes, colours and relations")
    v.set_defaults(func=cmd_vocabulary)


def cmd_sample(args) -> int:
    from tqdm import tqdm

    from ..io import atomic_write_text, prompt_dir, sample_name, save_png
    from ..world.data import resolve_prompts
    from ..world.render import draw

    if args.n_samples < 1:
        raise ValueError(f"--n-samples must be >= 1, got {args.n_samples}")
    metas = resolve_prompts(args.prompts)[: args.limit]
    for i, meta in enumerate(tqdm(metas, desc="world sample", unit="prompt")):
        d = prompt_dir(args.out, i)
        atomic_write_text(d / "metadata.jsonl", json.dumps(meta) + "\n")
        scenes = []
        for k in range(args.n_samples):
            scene, img = draw(meta, seed=args.seed * 1_000_003 + i * 1000 + k)
            save_png(d / "samples" / sample_name(k), img)
            scenes.append(json.dumps({"file": f"samples/{sample_name(k)}", "objects": [o.to_dict() for o in scene]}))
        atomic_write_text(d / "scenes.jsonl", "\n".join(scenes) + "\n")
    print(f"wrote {len(metas)} prompts x {args.n_samples} images to {args.out}")
    return 0


def cmd_prompts(args) -> int:
    from ..io import atomic_write_text
    from ..world.spec import TAGS, sample_prompts

    counts = None if args.per_category is None else {t: args.per_category for t in TAGS}
    metas = sample_prompts(counts, seed=args.seed)
    atomic_write_text(args.out, "".join(json.dumps(m) + "\n" for m in metas))
    print(f"wrote {len(metas)} prompts to {args.out}")
    return 0


def cmd_vocabulary(args) -> int:
    from ..world.spec import vocabulary_help

    print(vocabulary_help())
    return 0
