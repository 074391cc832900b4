"""Step time and peak memory of the real-scale judge trainers at Qwen2.5-VL-7B size.

    python benchmarks/vlm_train_gpu.py            # one H100 80GB: 7B shape, random weights, bf16, ~3-5 min
    python benchmarks/vlm_train_gpu.py --tiny     # any CPU: the tiny test model, seconds

What runs: Qwen2.5-VL-7B's shape (text: hidden 3584, 28 layers, 28 heads, 4 KV heads,
intermediate 18944, vocabulary 152064; vision: 32 blocks of width 1280, out 3584) built on the
device with random weights in bf16, then the recipe the trainers use, through their own code
(train/vlm_common.apply_tuning, the trainers' collate and losses): LoRA rank 64 on every
linear layer of the language model, the vision tower frozen, gradient checkpointing, AdamW on
the trainable weights (the reward head in fp32), bf16 autocast. For each trainer and batch 1, 2
and 4 (pairs for the verifier: 2 images each; examples for the reflector), 512x512 images
(504x504 after the 28-pixel rounding: 324 image tokens each), one warm-up step and `--steps`
timed steps; an out-of-memory batch is reported as OOM and the next one still runs.

Full fine-tuning is not measured: 8.3B parameters x 16 bytes (bf16 weights and gradients, fp32
AdamW moments and master weights) is about 133 GB, above one 80 GB GPU without sharding.
Text is tokenised bytewise (the tiny tokenizer; the random model does not care), so text
sequences are about 4x longer than with Qwen's tokenizer: the step times are upper bounds.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np


def build(tiny: bool, device: str):
    import torch

    from reflectionflow.models import qwen_vl as Q

    tok = Q.tiny_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in Q.SPECIAL_TOKENS}
    cfg = Q.tiny_config(len(tok), ids) if tiny else Q.config_7b(ids)
    from transformers import Qwen2_5_VLForConditionalGeneration

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval(), tok


def images(n: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def measure(step, batches, steps: int, device: str) -> list[dict]:
    import torch

    rows = []
    for b in batches:
        row = {"batch": b}
        try:
            if device != "cpu":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            step(b)  # warm-up
            if device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(b)
            if device != "cpu":
                torch.cuda.synchronize()
            row["s_per_step"] = (time.perf_counter() - t0) / steps
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30 if device != "cpu" else float("nan")
        except torch.OutOfMemoryError:
            row["error"] = "OOM"
        gc.collect()
        rows.append(row)
    return rows


def run_verifier(args, device: str) -> tuple[list[dict], int]:
    import torch

    from reflectionflow.models import qwen_vl as Q
    from reflectionflow.train.vlm_common import apply_tuning
    from reflectionflow.train.vlm_verifier import PairMaker, VerifierTrainConfig, collate, pair_loss

    base, tok = build(args.tiny, device)
    cfg = VerifierTrainConfig(lora_rank=args.rank, lora_alpha=args.rank, grad_checkpointing=True)
    model = Q.RewardModel.from_causal(base)
    model.backbone = apply_tuning(model.backbone, cfg)
    model.head.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    pix = Q.PixelConfig(min_pixels=28 * 28, max_pixels=args.size * args.size)
    maker = PairMaker(tok, pix, max_length=10_000)
    pool = [maker.build("a photo of a red apple to the left of a green cup", ims, 1, (1.0, 0.0))
            for ims in zip(images(4, args.size, 0), images(4, args.size, 1))]
    image_token_id = Q.image_token_id(base.config)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device != "cpu")

    def step(b: int) -> None:
        inputs, labels, targets = collate(pool[:b], tok, model, image_token_id, device)
        with amp:
            r = model(**inputs)
        loss = pair_loss(r[:b], r[b:], labels, "bt")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    n_train = sum(p.numel() for p in params)
    rows = measure(step, args.batches, args.steps, device)
    return rows, n_train


def run_reflector(args, device: str) -> tuple[list[dict], int]:
    import torch

    from reflectionflow.models import qwen_vl as Q
    from reflectionflow.train.vlm_common import apply_tuning
    from reflectionflow.train.vlm_reflector import ExampleMaker, ReflectorTrainConfig, answer_loss, collate

    base, tok = build(args.tiny, device)
    cfg = ReflectorTrainConfig(lora_rank=args.rank, lora_alpha=args.rank, grad_checkpointing=True, max_length=10_000)
    image_token_id = Q.image_token_id(base.config)
    model = apply_tuning(base, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    pix = Q.PixelConfig(min_pixels=28 * 28, max_pixels=args.size * args.size)
    maker = ExampleMaker(tok, pix, cfg)
    target = "- Add one red apple to the left of the cup.\n- Change the cup's color to green."
    pool = [maker.build("a photo of a red apple to the left of a green cup", im, target)
            for im in images(4, args.size, 2)]
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device != "cpu")

    def step(b: int) -> None:
        inputs, labels = collate(pool[:b], model, tok, image_token_id, device)
        with amp:
            logits = model(**inputs).logits
        loss, _ = answer_loss(logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    n_train = sum(p.numel() for p in params)
    rows = measure(step, args.batches, args.steps, device)
    return rows, n_train


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny test shape on the CPU")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 512; 56 with --tiny)")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=3, help="timed steps per batch size")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank")
    args = p.parse_args()
    import torch

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for the CPU check")
    args.size = args.size or (56 if args.tiny else 512)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    table = []
    for name, fn in (("verifier", run_verifier), ("reflector", run_reflector)):
        t = time.perf_counter()
        rows, n_train = fn(args, device)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"{name}: {n_train / 1e6:.1f}M trainable parameters, built and measured in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        table += [(name, n_train, r) for r in rows]
    shape = "tiny" if args.tiny else "Qwen2.5-VL-7B shape"
    print(f"\n{shape}, random weights, {'fp32 CPU' if args.tiny else 'bf16 ' + torch.cuda.get_device_name()}, "
          f"LoRA r={args.rank} on the language model, vision frozen, gradient checkpointing, AdamW, "
          f"{args.size}x{args.size} images; total {time.perf_counter() - t0:.0f} s")
    print(f"{'trainer':<10} {'batch':>5} {'s/step':>8} {'peak GB':>8}  note")
    for name, _, r in table:
        unit = "pairs (2 images each)" if name == "verifier" else "examples"
        if "error" in r:
            print(f"{name:<10} {r['batch']:>5} {'-':>8} {'-':>8}  {r['error']}")
        else:
            print(f"{name:<10} {r['batch']:>5} {r['s_per_step']:>8.3f} {r['peak_gb']:>8.1f}  {unit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
