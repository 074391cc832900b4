"""`reflectionflow generate --backend flux` end to end at FLUX scale (random weights), seconds per prompt
from the run's own ledger, beside flux_budget.py's prediction for the same settings.

    # one H200, one 10-minute command: steps scaled from 30 to 8 to fit 4 prompts in it (the prediction
    # printed beside the measurement is for the same 8 steps; not run on a GPU yet: if it does not fit,
    # fewer --prompts, keeping the corrections of every prompt in a batch of --flux-batch-size)
    python benchmarks/flux_end_to_end.py --steps 8 --prompts 4 --json flux_e2e.json
    # the same with step caching (generator and corrector)
    python benchmarks/flux_end_to_end.py --steps 8 --prompts 4 --cache-threshold 0.1 --json flux_e2e_cache.json
    # any CPU, tiny configs, under a minute (tests/test_benchmarks_speed.py runs it)
    python benchmarks/flux_end_to_end.py --tiny

What runs, in order:
1. A FLUX.1-dev-shaped pipeline with random weights built on the device (`random_flux_pipeline`: the
   12B transformer, T5-XXL, CLIP-L and the FLUX VAE; bf16 on a GPU), and a folder of its configs
   and tokenizers (no weights) that `--flux-path` names: the command checks it as any FLUX folder,
   and `FluxModels.adopt` hands it the pipeline in memory instead of loading weights.
2. A random rank-32 corrector LoRA in the released layout, written to disk and named by
   `--lora-path` (the command reads, checks and loads it as it would the released one).
3. The judges over HTTP on this machine, in a process of their own: the world's oracle verifier and
   reflector and its rule refiner behind `reflectionflow serve`'s JudgeServer, each request held for
   a fixed latency (--latency, default 0.5 s) in --slots parallel slots (default 8): flux_budget.py's
   stub VLM. The prompts are therefore GenEval-Shapes ones (`--prompts geneval-shapes --limit N`).
4. The command itself, through the command line's entry point in this process: `reflectionflow
   generate --backend flux --method reflection --budget 64 --pool 32 --chains 2` (the paper's 32
   noise + 32 corrector images per prompt, 2 chains x 16 rounds), all prompts in one wave so that the
   corrections of every prompt share the transformer calls (--flux-batch-size, default 8).
5. Seconds per prompt from the run's ledger.json: the session's wall time over the prompts, and each
   stage's component seconds over the prompts (with the images, NFE, passes served from the step
   cache and VLM calls).
6. flux_budget.py's prediction for the same settings, from the same pieces flux_budget.py times (one
   transformer forward at --flux-batch-size, plain and with the condition; VAE decode and encode)
   timed here on the run's own transformer and VAE after the run: with the judges' calls one after
   another, and overlapped with generation. The engine runs a wave's prompts in lockstep, stage by
   stage, so its judge calls overlap generation less than the "overlapped" row assumes.
   flux_budget.py's formula has no step-cache term: with --cache-threshold the prediction is that of
   the uncached run, and the ledger's share of cached passes says how much the cache served. With
   random weights that share says nothing about the real FLUX.1-dev: how much a step changes is a
   property of the trained model.

Random weights make the images noise; the timings are what matter. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = "reflectionflow-world"


# ----------------------------------------------------------------------------------------------
# The judges' process


def serve_judges(latency: float, slots: int) -> int:
    """Serve the world's oracle judges on 127.0.0.1 with a fixed latency; print the URL, then serve
    until the parent stops this process."""
    from reflectionflow.serve import JudgeServer, JudgeService, world_judges

    class FixedLatency(JudgeService):
        """Each request holds one of `slots` places for `latency` seconds, then gets the judge's answer."""

        def __init__(self, judges):
            super().__init__(judges, model_name=MODEL)
            self._slots = threading.BoundedSemaphore(slots)

        def answer(self, body):
            with self._slots:
                time.sleep(latency)
            return super().answer(body)

    judges = world_judges(verifier="world-oracle", reflector="world-oracle", refiner="world-rule")
    server = JudgeServer(FixedLatency(judges), workers=max(64, 2 * slots), request_timeout=120.0)
    print(server.url, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def start_judges(latency: float, slots: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # this process's package
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve-judges", "--latency",
                             str(latency), "--slots", str(slots)], stdout=subprocess.PIPE, text=True, env=env)
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        proc.kill()
        raise RuntimeError("the judges' process did not start")
    return proc, url


# ----------------------------------------------------------------------------------------------
# The model on the device, its config folder and the corrector LoRA


def config_folder(pipe, root: Path) -> Path:
    """A diffusers folder of the pipeline's configs and tokenizers, without weights (what the checks read)."""
    root.mkdir(parents=True, exist_ok=True)
    pipe.save_config(str(root))  # model_index.json
    for name in ("transformer", "vae", "scheduler"):
        getattr(pipe, name).save_config(str(root / name))
    for name in ("text_encoder", "text_encoder_2"):
        getattr(pipe, name).config.save_pretrained(str(root / name))
    for name in ("tokenizer", "tokenizer_2"):
        getattr(pipe, name).save_pretrained(str(root / name))
    return root.resolve()


def random_lora(pipe, rank: int, folder: Path) -> Path:
    """A random condition-branch LoRA in the released key layout, saved as --lora-path reads it; the
    transformer is left without it (the run loads it from the file)."""
    import torch

    from reflectionflow.backends.flux.lora import add_lora, remove_lora, save_lora

    add_lora(pipe.transformer, rank=rank, alpha=float(rank))
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1e-3)  # a trained-looking adapter (B = 0 is not what a trained one holds)
    path = save_lora(folder, pipe.transformer, alpha=float(rank))
    remove_lora(pipe.transformer)
    return path.parent.resolve()


# ----------------------------------------------------------------------------------------------
# The command and the prediction


def generate_argv(args, flux: Path, lora: Path, url: str, out: Path) -> list[str]:
    argv = ["generate", "--backend", "flux", "--prompts", "geneval-shapes", "--limit", str(args.prompts),
            "--method", "reflection", "--budget", str(args.noise + args.corrections), "--pool", str(args.noise),
            "--chains", str(args.chains), "--depth", str(args.corrections // args.chains), "--seed", "0",
            "--flux-path", str(flux), "--lora-path", str(lora), "--height", str(args.height), "--width",
            str(args.height), "--steps", str(args.steps), "--condition-size", str(args.condition_size),
            "--max-sequence-length", str(args.text_len), "--flux-batch-size", str(args.flux_batch_size),
            "--device", args.device, "--vlm-url", url, "--vlm-model", MODEL, "--vlm-concurrency", str(args.slots),
            "--prompt-batch", str(args.prompts), "--batch-size", "4096", "--workers", str(args.workers),
            "--out", str(out), "--quiet", "--no-report"]
    if args.compile_blocks:
        argv.append("--compile-blocks")
    if args.cache_threshold:
        argv += ["--cache-threshold", str(args.cache_threshold)]
    return argv


def predict(pipe, args, repeats: int) -> dict:
    """flux_budget.py's per-prompt seconds for these settings, from its pieces timed on `pipe`."""
    sys.path.insert(0, str(HERE))
    import flux_budget as fb

    B, dev = args.flux_batch_size, args.device
    pixels = pipe.vae_scale_factor * 2  # pixels per token side (16 for FLUX's 8x VAE and 2x2 packing)
    fns = fb.forward_fns(pipe.transformer, fb.Inputs(pipe.transformer, B, args.height, args.condition_size,
                                                     args.text_len, dev, pixels=pixels))
    f_gen = fb.timed(fns["plain"], dev, 1, repeats) / B
    f_corr = fb.timed(fns["cond"], dev, 1, repeats) / B
    vae = fb.vae_times(pipe.vae, args.height, args.condition_size, min(B, 4), dev, 1, repeats,
                       factor=pipe.vae_scale_factor)
    rows = {}
    for name, overlap in (("sequential", False), ("overlapped", True)):
        rows[name] = fb.budget(f_gen, f_corr, 0.0, vae, args.steps, 1.0, False, overlap, args.latency, args.slots,
                               noise=args.noise, corrector=args.corrections)
    return {"forward_s_per_image": {"plain": f_gen, "with_condition": f_corr}, "vae_s_per_image": vae,
            "per_prompt": rows}


def measured(ledger: dict, prompts: int) -> dict:
    tot = ledger["totals"]
    stages = {s: {"wall_s_per_prompt": st["wall_s"] / prompts, "images": st["images"], "nfe": st["nfe"],
                  "cached": st.get("cached", 0), "calls": st["calls"]}
              for s, st in tot["by_stage"].items() if st["items"]}
    passes = tot["nfe"] + tot.get("cached", 0)
    return {"wall_s_per_prompt": ledger["session"]["wall_s"] / prompts,
            "components_s_per_prompt": tot["wall_s"] / prompts, "load_s": ledger["session"].get("load_s"),
            "images": tot["images"], "nfe": tot["nfe"], "cached": tot.get("cached", 0),
            "cached_share": tot.get("cached", 0) / max(passes, 1), "vlm_calls": tot["vlm_calls"],
            "failed": tot["failed"], "stages": stages}


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random FLUX on the CPU, 2 prompts x (4 + 4) images")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--prompts", type=int, default=None, help="GenEval-Shapes prompts, one wave (default 4; 2 --tiny)")
    ap.add_argument("--noise", type=int, default=None, help="noise images per prompt (default 32; 4 --tiny)")
    ap.add_argument("--corrections", type=int, default=None, help="corrector images per prompt (default 32; 4 --tiny)")
    ap.add_argument("--chains", type=int, default=2, help="reflection chains (rounds = corrections / chains)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps, generator and corrector (default 30; "
                    "2 --tiny)")
    ap.add_argument("--height", type=int, default=None, help="image side in pixels (default 1024; 32 --tiny)")
    ap.add_argument("--condition-size", type=int, default=None, help="corrector condition side (default 512; "
                    "16 --tiny)")
    ap.add_argument("--text-len", type=int, default=None, help="T5 tokens (default 512; 32 --tiny)")
    ap.add_argument("--flux-batch-size", type=int, default=8, help="images per transformer call")
    ap.add_argument("--workers", type=int, default=1, help="the engine's component calls in flight")
    ap.add_argument("--compile-blocks", action="store_true", help="regional torch.compile (compiles inside the run)")
    ap.add_argument("--cache-threshold", type=float, default=0.0,
                    help="step caching for the generator and the corrector (0: off)")
    ap.add_argument("--latency", type=float, default=None, help="judge seconds per request (default 0.5; 0.01 "
                    "--tiny)")
    ap.add_argument("--slots", type=int, default=8, help="judge requests served at once (and the client's "
                    "--vlm-concurrency)")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per prediction piece (default 2; 1 --tiny)")
    ap.add_argument("--no-predict", action="store_true", help="skip flux_budget.py's prediction")
    ap.add_argument("--out", default=None, help="keep the run folder here (default: a temporary folder)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--serve-judges", action="store_true", help=argparse.SUPPRESS)  # the judges' process
    args = ap.parse_args(argv)
    tiny = args.tiny
    for name, full, small in (("prompts", 4, 2), ("noise", 32, 4), ("corrections", 32, 4), ("steps", 30, 2),
                              ("height", 1024, 32), ("condition_size", 512, 16), ("text_len", 512, 32),
                              ("latency", 0.5, 0.01), ("repeats", 2, 1)):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    if args.serve_judges:
        return serve_judges(args.latency, args.slots)
    for name in ("prompts", "noise", "corrections", "chains", "steps", "flux_batch_size", "workers", "slots",
                 "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.corrections % args.chains:
        ap.error("--corrections must be a multiple of --chains")
    if args.cache_threshold < 0 or args.latency < 0:
        ap.error("--cache-threshold and --latency must be >= 0")

    import torch

    from reflectionflow.backends.flux.components import FluxModels
    from reflectionflow.backends.flux.random_init import random_flux_pipeline
    from reflectionflow.cli import main as cli

    args.device = args.device or ("cpu" if tiny else "cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    size = "tiny" if tiny else "dev"
    fig: dict = {"size": size, "device": args.device, "torch": torch.__version__,
                 "settings": {k: getattr(args, k) for k in ("prompts", "noise", "corrections", "chains", "steps",
                                                            "height", "condition_size", "text_len", "flux_batch_size",
                                                            "workers", "compile_blocks", "cache_threshold", "latency",
                                                            "slots", "lora_rank")}}
    if args.device.startswith("cuda"):
        fig["gpu"] = torch.cuda.get_device_name(args.device)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    pipe = random_flux_pipeline(size, device=args.device, dtype=dtype)
    fig["build_s"] = time.perf_counter() - start
    log(f"built the {size} FLUX pipeline (random weights) in {fig['build_s']:.1f} s")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="flux-e2e-"))
    root.mkdir(parents=True, exist_ok=True)
    judges, url = start_judges(args.latency, args.slots)
    try:
        flux = config_folder(pipe, root / "flux-config")
        lora = random_lora(pipe, args.lora_rank, root / "lora")
        kept = FluxModels.adopt(pipe, str(flux), device=args.device)  # noqa: F841 (kept while the run uses it)
        out = root / "run"
        command = generate_argv(args, flux, lora, url, out)
        fig["command"] = "reflectionflow " + " ".join(command)
        log(f"judges at {url}; running {fig['command']}")
        t0 = time.perf_counter()
        code = cli(command)
        fig["command_s"] = time.perf_counter() - t0
        if code != 0:
            print(f"the command exited {code}", file=sys.stderr)
            return code
        ledger = json.loads((out / "ledger.json").read_text())
        fig["measured"] = measured(ledger, args.prompts)
        log(f"run done in {fig['command_s']:.1f} s")
        if not args.no_predict:
            fig["predicted"] = predict(pipe, args, args.repeats)
            log("prediction pieces timed")
    finally:
        judges.terminate()
        judges.wait(timeout=30)
        if not args.out:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    if args.device.startswith("cuda"):
        fig["peak_memory_gb"] = torch.cuda.max_memory_allocated(args.device) / 2**30
    fig["wall_s"] = time.perf_counter() - start
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")
    report(fig, args)
    return 0


def report(fig: dict, args) -> None:
    m = fig["measured"]
    cache = f"step cache {args.cache_threshold:g}" if args.cache_threshold else "no step cache"
    print(f"\n# `reflectionflow generate --backend flux`, {args.prompts} prompts x ({args.noise} noise + "
          f"{args.corrections} corrector images), {fig['size']} FLUX (random weights) on "
          f"{fig.get('gpu', fig['device'])}, {args.height} px, {args.steps} steps, condition {args.condition_size} "
          f"px, T5 {args.text_len} tokens, {args.flux_batch_size} images per transformer call, "
          f"{'compiled blocks' if args.compile_blocks else 'eager'}, {cache}; judges over HTTP, {args.latency:g} s "
          f"per request, {args.slots} at once; whole benchmark {fig['wall_s']:.0f} s")
    print(f"ledger: {m['images']} images, NFE {m['nfe']}, {m['cached']} passes from the step cache "
          f"({100 * m['cached_share']:.1f}%), {m['vlm_calls']} VLM calls, {m['failed']} failed")
    print("| seconds per prompt | total | generate | correct | verify | reflect | refine |")
    print("|---|---|---|---|---|---|---|")
    st = m["stages"]
    cells = " | ".join(f"{st[s]['wall_s_per_prompt']:.1f}" if s in st else "-"
                       for s in ("generate", "correct", "verify", "reflect", "refine"))
    print(f"| measured: the run's wall time (ledger session) | {m['wall_s_per_prompt']:.1f} | - | - | - | - | - |")
    print(f"| measured: in components (ledger totals) | {m['components_s_per_prompt']:.1f} | {cells} |")
    for name, row in (fig.get("predicted") or {}).get("per_prompt", {}).items():
        print(f"| flux_budget.py, VLM {name} (transformer {row['transformer_s']:.1f} + VAE {row['vae_s']:.1f} "
              f"+ VLM {row['vlm_s']:.1f}) | {row['total_s']:.1f} | - | - | - | - | - |")


if __name__ == "__main__":
    raise SystemExit(main())
