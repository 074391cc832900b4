"""`reflectionflow genref harvest`: on-policy data for the world's verifier, reflector and corrector.

The judges and the corrector must learn from what the search really produces, not only from
renders with planted flaws. A harvest runs the real search (`reflectionflow generate`: noise,
prompt and reflection, with the components it is given) on training prompts, then labels every
candidate it made with the exact evaluator (verdict, graded score, reasons) and the oracle
reflector (the edit commands that would fix it), and, for a failed candidate, the minimal edit that
fixes it (train/corrector_pool.py: only what the commands change is repainted).

Rounds (DAgger): round k harvests with the components trained on rounds < k, so each model sees
the mistakes the others actually make; the trainers take every round's folder (`--harvest` once
per round).

Training prompts never meet the benchmarks' scenes: prompts of GenEval-Shapes and of its
validation set are excluded where a category's prompt space allows (position and attribute
binding), and every image's seed derives from the harvest's run seed (never 0, the benchmarks'),
so a prompt shared with a benchmark gets other scenes.

Folder (each step is skipped on `--resume` once its output exists, and each search resumes
where it stopped, so a killed harvest loses nothing):
    OUT/harvest.json          settings (what --resume compares)
    OUT/prompts.jsonl         the training prompts (GenEval metadata lines)
    OUT/search/<method>/      the run folders of `reflectionflow generate`, one per method
    OUT/search/<method>.log   its output
    OUT/pool/                 every candidate, labelled, in the corrector pool's format
                              (images.npy, targets.npy, val_images.npy, pool.json): what
                              `train world-verifier|world-reflector|world-corrector --harvest` read
    OUT/verifier_pairs.jsonl  one line per candidate: image index, prompt, label, score, reasons, kind
    OUT/genref/               GenRef shards: failed candidates and their minimal edits (subset rule),
                              lower- and higher-scored candidates of one prompt (subset general)
    OUT/summary.json          candidates, failures and fixable ones per kind, and the time taken
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..runtime import is_int

FORMAT = "reflectionflow-world-harvest/1"
HARVEST_METHODS = ("noise", "prompt", "reflection")
# Where the search spends its effort and fails: two objects, counting, position; every category
# is present, since the verifier must judge them all.
HARVEST_TAG_WEIGHTS = {"single_object": 0.08, "two_object": 0.22, "counting": 0.20, "colors": 0.10,
                       "position": 0.22, "color_attr": 0.18}
COMPONENT_KINDS = ("generator", "verifier", "reflector", "refiner", "corrector")
# Candidate kinds as the verifier's report names them (engine kinds in brackets).
KIND_NAMES = {"noise": "noise", "neighbour": "noise", "prompt": "refined", "correct": "corrected",
              "resample": "refined"}  # a resample is a fresh sample of the chain's (refined) prompt


class HarvestError(ValueError):
    """Bad harvest settings, or a search that failed."""


@dataclass
class HarvestConfig:
    out: str
    round: int = 1  # recorded with every candidate; the trainers report per round
    prompts: int = 1200  # training prompts
    prompt_seed: int = 1  # draws the training prompts
    seed: int = 1001  # the searches' run seed (every image's seed derives from it; never 0)
    methods: tuple[str, ...] = HARVEST_METHODS
    budget: int = 8  # images per prompt and method
    components: dict = field(default_factory=dict)  # kind -> registry name (the backend's default if absent)
    run_config: str | None = None  # a `generate --config` file (component options: weights folders)
    tag_weights: dict = field(default_factory=lambda: dict(HARVEST_TAG_WEIGHTS))
    val_prompts: int = 553  # validation prompts sampled for the corrector's validation (0: none)
    val_samples: int = 2
    processes: int = 3  # searches run at once
    batch_size: int = 1024
    prompt_batch: int = 512
    label_workers: int = 0  # 0: all cores but one
    shard_size: int = 1000
    resume: bool = False
    progress: bool = True

    def settings(self) -> dict:
        """What decides the harvest's content (--resume must match it)."""
        d = asdict(self)
        for k in ("out", "processes", "batch_size", "prompt_batch", "label_workers", "resume", "progress"):
            d.pop(k)
        d["methods"] = list(self.methods)
        if self.run_config:
            d["run_config_sha256"] = hashlib.sha256(Path(self.run_config).read_bytes()).hexdigest()
        return d

    def validate(self) -> HarvestConfig:
        from ..world import spec

        bad = [m for m in self.methods if m not in HARVEST_METHODS]
        if bad or not self.methods:
            raise HarvestError(f"methods {', '.join(bad) or '(none)'}; accepted: {', '.join(HARVEST_METHODS)}")
        for name, lo in (("round", 1), ("prompts", 1), ("budget", 2), ("processes", 1), ("batch_size", 1),
                         ("prompt_batch", 1), ("val_samples", 1), ("shard_size", 1)):
            v = getattr(self, name)
            if not is_int(v, lo):
                raise HarvestError(f"{name} must be an integer >= {lo}, got {v!r}")
        for name in ("val_prompts", "label_workers", "prompt_seed"):
            v = getattr(self, name)
            if not is_int(v, 0):
                raise HarvestError(f"{name} must be an integer >= 0, got {v!r}")
        if not is_int(self.seed, 1):
            raise HarvestError(f"seed must be an integer >= 1 (0 is the benchmarks' run seed), got {self.seed!r}")
        unknown = sorted(set(self.components) - set(COMPONENT_KINDS))
        if unknown:
            raise HarvestError(f"components: unknown kind(s) {', '.join(unknown)}; "
                               f"accepted: {', '.join(COMPONENT_KINDS)}")
        from ..components import ComponentError, check_name

        for kind, name in self.components.items():
            try:
                check_name(kind, name)
            except ComponentError as e:
                raise HarvestError(f"--{kind}: {e}") from None
        bad = sorted(set(self.tag_weights) - set(spec.TAGS))
        if bad or any(w < 0 for w in self.tag_weights.values()) or sum(self.tag_weights.values()) <= 0:
            raise HarvestError(f"tag_weights: categories of {', '.join(spec.TAGS)} with weights >= 0 and a "
                               f"positive sum, got {self.tag_weights}")
        if self.run_config and not Path(self.run_config).is_file():
            raise HarvestError(f"--config {self.run_config}: no such file")
        return self


# ----------------------------------------------------------------------------------------------
# Prompts


def training_prompts(n: int, seed: int, tag_weights: dict) -> list[dict]:
    """`n` prompts split over the categories by weight, GenEval-Shapes and its validation prompts
    drawn last (so only where a category has no other prompts)."""
    from ..world import spec
    from ..world.data import load_prompt_file

    total = sum(tag_weights.get(t, 0.0) for t in spec.TAGS)
    raw = {t: n * tag_weights.get(t, 0.0) / total for t in spec.TAGS}
    counts = {t: int(v) for t, v in raw.items()}
    for t in sorted(spec.TAGS, key=lambda t: raw[t] - counts[t], reverse=True)[: n - sum(counts.values())]:
        counts[t] += 1  # largest remainders: the counts sum to n
    avoid = load_prompt_file("geneval_shapes.jsonl") + load_prompt_file("geneval_shapes_val.jsonl")
    return spec.sample_prompts(counts, seed=seed, avoid=avoid)


# ----------------------------------------------------------------------------------------------
# The searches


def search_command(cfg: HarvestConfig, method: str, folder: Path) -> list[str]:
    cmd = [sys.executable, "-m", "reflectionflow", "generate", "--prompts", str(Path(cfg.out) / "prompts.jsonl"),
           "--method", method, "--budget", str(cfg.budget), "--seed", str(cfg.seed), "--out", str(folder),
           "--batch-size", str(cfg.batch_size), "--prompt-batch", str(cfg.prompt_batch), "--quiet", "--no-report"]
    for kind in COMPONENT_KINDS:
        if cfg.components.get(kind):
            cmd += [f"--{kind}", cfg.components[kind]]
    if cfg.run_config:
        cmd += ["--config", cfg.run_config]
    if (folder / "config.json").is_file():
        cmd.append("--resume")
    return cmd


def run_searches(cfg: HarvestConfig) -> dict[str, float]:
    """Every method's search, `processes` at once; returns seconds per method."""
    root = Path(cfg.out) / "search"
    root.mkdir(parents=True, exist_ok=True)
    todo = list(cfg.methods)
    running: list[tuple[str, subprocess.Popen, float, object]] = []
    seconds: dict[str, float] = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        _run(cfg, root, todo, running, seconds, env)
    finally:  # interrupted or failed: no search keeps running behind the user's back
        for _, proc, _, log in running:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            log.close()
    return seconds


def _run(cfg: HarvestConfig, root: Path, todo: list, running: list, seconds: dict, env: dict) -> None:
    while todo or running:
        while todo and len(running) < cfg.processes:
            m = todo.pop(0)
            log = open(root / f"{m}.log", "a")
            proc = subprocess.Popen(search_command(cfg, m, root / m), stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((m, proc, time.perf_counter(), log))
        time.sleep(0.5)
        for item in list(running):
            m, proc, t0, log = item
            if proc.poll() is None:
                continue
            log.close()
            running.remove(item)
            if proc.returncode != 0:
                tail = (root / f"{m}.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
                raise HarvestError(f"the {m} search failed (exit {proc.returncode}): {tail[0]} "
                                   f"(whole log: {root / f'{m}.log'}; --resume continues it)")
            seconds[m] = round(time.perf_counter() - t0, 1)
            if cfg.progress:
                print(f"harvest: the {m} search is done ({seconds[m]} s; {len(todo) + len(running)} to go)",
                      file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Labelling


def read_candidates(cfg: HarvestConfig) -> tuple[list[dict], np.ndarray]:
    """Every candidate of every search, in a fixed order (method, prompt, generation order):
    (rows, images (N, 64, 64, 3) uint8)."""
    from ..io import load_png
    from ..runs import RunFolder

    rows, images = [], []
    metas = [json.loads(line) for line in (Path(cfg.out) / "prompts.jsonl").read_text().splitlines() if line]
    for method in cfg.methods:
        folder = RunFolder(Path(cfg.out) / "search" / method)
        for i, meta in enumerate(metas):
            index = {}
            for rec in folder.load_trace(i):  # complete records whose image is on disk
                index[rec["id"]] = len(rows)
                images.append(load_png(folder.image_path(i, rec["file"])))
                rows.append({
                    "prompt": meta["prompt"], "tag": meta["tag"], "seed": int(rec["seed"]),
                    "kind": KIND_NAMES.get(rec["kind"], rec["kind"]), "method": method, "round": cfg.round,
                    "id": rec["id"], "group": f"{method}/{i}", "parent": index.get(rec["parent"], -1),
                    "prompt_used": rec["prompt"], "used_reflection": rec["reflection"],
                    "verifier_score": rec["score"],
                })
    return rows, (np.stack(images) if images else np.zeros((0, 64, 64, 3), np.uint8))


def validation_samples(cfg: HarvestConfig) -> tuple[list[dict], np.ndarray]:
    """The run's generator on the validation prompts (seed = position in the list): the corrector's
    validation failures and passes, as its own pool has them."""
    from ..components import GenerationRequest, build
    from ..engine.backends import get_backend
    from ..world.data import load_prompt_file, spread

    if not cfg.val_prompts:
        return [], np.zeros((0, 64, 64, 3), np.uint8)
    name = cfg.components.get("generator") or get_backend("world").defaults()["generator"]
    options = {}
    if cfg.run_config:
        from ..config import load_config_file

        options = (load_config_file(cfg.run_config).get("options") or {}).get("generator", {})
    gen = build("generator", name, **options)
    metas = [m for m in spread(load_prompt_file("geneval_shapes_val.jsonl"), cfg.val_prompts)
             for _ in range(cfg.val_samples)]
    out = []
    for i in range(0, len(metas), cfg.batch_size):
        chunk = metas[i : i + cfg.batch_size]
        out += gen.generate([GenerationRequest(prompt=m["prompt"], seed=i + k) for k, m in enumerate(chunk)])
    rows = [{"prompt": m["prompt"], "tag": m["tag"], "seed": s} for s, m in enumerate(metas)]
    return rows, np.stack([np.asarray(r.image) for r in out])


def label_harvest(cfg: HarvestConfig, rows: list[dict], images: np.ndarray, val_rows: list[dict],
                  val_images: np.ndarray) -> dict:
    """Label everything and write OUT/pool (pool.json last), OUT/verifier_pairs.jsonl, OUT/genref."""
    from ..world import spec
    from .labels import POOL_FORMAT, default_workers, label_images

    workers = cfg.label_workers or default_workers()
    metas = [spec.parse_prompt(r["prompt"]) for r in rows]
    labels = label_images(images, metas, [r["seed"] for r in rows], workers)
    val_labels = label_images(val_images, [spec.parse_prompt(r["prompt"]) for r in val_rows],
                              [r["seed"] for r in val_rows], workers, with_target=False)
    targets = []
    for r, lab in zip(rows, labels):
        r.update(correct=lab.correct, score=round(lab.score, 4), reflection=lab.reflection, reason=lab.reason,
                 target=len(targets) if lab.target is not None else -1)
        if lab.target is not None:
            targets.append(lab.target)
    for r, lab in zip(val_rows, val_labels):
        r.update(correct=lab.correct, reflection=lab.reflection)
    folder = Path(cfg.out) / "pool"
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", images)
    np.save(folder / "targets.npy", np.stack(targets) if targets else np.zeros((0, 64, 64, 3), np.uint8))
    np.save(folder / "val_images.npy", val_images)
    summary = summarize(rows)
    summary.update(val_samples=len(val_rows), val_failed=sum(not r["correct"] for r in val_rows))
    settings = {**cfg.settings(), "harvest": True, "per_prompt": None}
    doc = {"format": POOL_FORMAT, "settings": settings, "summary": summary, "samples": rows, "val": val_rows}
    tmp = folder / "pool.json.tmp"
    tmp.write_text(json.dumps(doc))
    tmp.replace(folder / "pool.json")
    with open(Path(cfg.out) / "verifier_pairs.jsonl.tmp", "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"image": i, "prompt": r["prompt"], "label": r["correct"], "score": r["score"],
                                "reason": r["reason"], "kind": r["kind"], "method": r["method"],
                                "round": r["round"]}) + "\n")
    (Path(cfg.out) / "verifier_pairs.jsonl.tmp").replace(Path(cfg.out) / "verifier_pairs.jsonl")
    return summary


def summarize(rows: Sequence[dict]) -> dict:
    out: dict = {"samples": len(rows), "failed": sum(not r["correct"] for r in rows),
                 "fixable": sum(r["target"] >= 0 for r in rows), "kinds": {}}
    out["passed"] = out["samples"] - out["failed"]
    for kind in sorted({r["kind"] for r in rows}):
        rs = [r for r in rows if r["kind"] == kind]
        out["kinds"][kind] = {"samples": len(rs), "failed": sum(not r["correct"] for r in rs),
                              "fixable": sum(r["target"] >= 0 for r in rs)}
    return out


def write_genref(cfg: HarvestConfig, rows: list[dict], images: np.ndarray, targets: np.ndarray) -> dict:
    """GenRef triplets: (failed candidate, its minimal edit, oracle reflection) as subset rule, and
    (lower-scored candidate, a correct one of the same prompt and search) as subset general."""
    from .writer import GenRefWriter

    out = Path(cfg.out) / "genref"
    counts = {"rule": 0, "general": 0}
    best: dict[str, int] = {}
    for i, r in enumerate(rows):
        if r["correct"] and r["group"] not in best:
            best[r["group"]] = i
    with GenRefWriter(out, prefix="harvest", max_samples_per_shard=cfg.shard_size) as w:
        for i, r in enumerate(rows):
            if r["target"] >= 0:
                w.write(prompt=r["prompt"], reflection=r["reflection"], subset="rule", good=targets[r["target"]],
                        bad=images[i], key=f"r{cfg.round}/{i:07d}")
                counts["rule"] += 1
            j = best.get(r["group"])
            if not r["correct"] and j is not None:
                w.write(prompt=r["prompt"], reflection=r["reflection"], subset="general", good=images[j],
                        bad=images[i], key=f"g{cfg.round}/{i:07d}")
                counts["general"] += 1
    return counts


# ----------------------------------------------------------------------------------------------
# The whole harvest


def harvest(cfg: HarvestConfig) -> dict:
    cfg.validate()
    out = Path(cfg.out)
    settings = cfg.settings()
    marker = out / "harvest.json"
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("settings") != settings:
            differ = sorted(k for k in set(saved.get("settings", {})) | set(settings)
                            if saved.get("settings", {}).get(k) != settings.get(k))
            raise HarvestError(f"{out} holds a harvest with other settings ({', '.join(differ)}); "
                               "pick another --out")
        if not cfg.resume:
            raise HarvestError(f"{out} already holds a harvest; pass --resume to continue or reuse it")
    elif out.exists() and any(out.iterdir()):
        raise HarvestError(f"{out} is not empty and holds no harvest; pick an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    from ..io import atomic_write_json, atomic_write_text

    atomic_write_json(marker, {"format": FORMAT, "settings": settings})
    t0 = time.perf_counter()
    if not (out / "prompts.jsonl").is_file():
        metas = training_prompts(cfg.prompts, cfg.prompt_seed, cfg.tag_weights)
        atomic_write_text(out / "prompts.jsonl", "".join(json.dumps(m) + "\n" for m in metas))
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    if cfg.progress:
        print(f"harvest: searching {cfg.prompts} prompts with {', '.join(cfg.methods)} at budget {cfg.budget} "
              f"({cfg.processes} at once; logs in {out / 'search'})", file=sys.stderr, flush=True)
    seconds = run_searches(cfg)
    t1 = time.perf_counter()
    rows, images = read_candidates(cfg)
    val_rows, val_images = validation_samples(cfg)
    t2 = time.perf_counter()
    if cfg.progress:
        print(f"harvest: labelling {len(rows)} candidates and {len(val_rows)} validation samples",
              file=sys.stderr, flush=True)
    summary = label_harvest(cfg, rows, images, val_rows, val_images)
    targets = np.load(out / "pool" / "targets.npy", mmap_mode="r")
    summary["genref"] = write_genref(cfg, rows, images, targets)
    summary["seconds"] = {"search": round(t1 - t0, 1), "per_method": seconds, "read_and_validation": round(t2 - t1, 1),
                          "label_and_write": round(time.perf_counter() - t2, 1)}
    atomic_write_json(out / "summary.json", summary)
    return summary
