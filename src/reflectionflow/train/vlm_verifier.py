"""`reflectionflow train verifier`: a Qwen2.5-VL reward model trained on preference pairs.

The model reads (image, prompt) in the chat format and a linear head turns the last token's hidden
state into a scalar reward (models/qwen_vl.RewardModel). A pair (image A, image B, prompt, which
is better or a tie) trains it through one of four losses on d = r_A - r_B:

    bt          Bradley-Terry: -log sigmoid(s d), s = +1 if A is better, -1 if B; ties are left out
    btt         Bradley-Terry with ties (Rao-Kupper, tau = log theta = tie_margin):
                P(A > B) = sigmoid(d - tau), P(B > A) = sigmoid(-d - tau), P(tie) = the rest
    margin      hinge: max(0, margin - s d); a tie: max(0, |d| - margin)
    regression  MSE of each reward to its target: the pair's score_a / score_b when given, else
                1 for the better image, 0 for the worse, 0.5 for both of a tie

Pairs come from GenRef shards (good_image is A, bad_image is B, A better) or a JSONL file, one
pair a line: {"prompt": ..., "image_a": PATH, "image_b": PATH, "label": "a" | "b" | "tie",
"score_a": optional, "score_b": optional} (or {"prompt", "chosen", "rejected"}); relative paths
start at the JSONL's folder. Pairs whose images are missing or do not decode are skipped and
counted (log.jsonl "skipped"). Validation every val_every steps: pairwise accuracy on held-out
pairs (ties left out) and the held-out loss. At the end the rewards of `norm_size` training
images give the mean and standard deviation the exported model normalises its scores with
(OUT/verifier: `--verifier reward --verifier-path OUT/verifier`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models import qwen_vl as Q
from .vlm_common import (
    Skip,
    VLMTrainConfig,
    apply_tuning,
    data_sources,
    load_image,
    merged,
    read_jsonl,
    reduce_sums,
    start_vlm_run,
    train_vlm_judge,
    weights_dtype,
)

LOSSES = ("bt", "btt", "margin", "regression")
LABELS = {"a": 1, "b": -1, "tie": 0}


@dataclass
class VerifierTrainConfig(VLMTrainConfig):
    out_dir: str = "runs/verifier"
    loss: str = "bt"
    tie_margin: float = 1.0  # btt: tau = log(theta) > 0
    margin: float = 1.0  # margin loss
    norm_size: int = 256  # training images whose rewards set the exported mean / std
    lr: float = 5e-5

    def validate(self) -> VerifierTrainConfig:
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r}; accepted: {', '.join(LOSSES)}")
        if self.tie_margin <= 0 or self.margin <= 0:
            raise ValueError(f"tie_margin and margin must be > 0, got {self.tie_margin}, {self.margin}")
        if self.norm_size < 2:
            raise ValueError(f"norm_size must be >= 2, got {self.norm_size}")
        super().validate()
        if self.data_format == "jsonl":
            pair_lines(self.data, "--data")  # every line checked now, before any weights load
            if self.val_data:
                pair_lines(self.val_data, "--val-data")
        return self


# ----------------------------------------------------------------------------------------------
# Data


def _check_pair(d: dict) -> str | None:
    if "chosen" in d or "rejected" in d:
        need = ("prompt", "chosen", "rejected")
    else:
        need = ("prompt", "image_a", "image_b", "label")
    missing = [k for k in need if k not in d]
    if missing:
        return f"missing {', '.join(missing)} (a pair line has prompt, image_a, image_b, label, or prompt, chosen, " \
               "rejected)"
    if "label" in d and str(d["label"]).lower() not in LABELS:
        return f"label {d['label']!r}; accepted: {', '.join(LABELS)}"
    for k in ("score_a", "score_b"):
        if k in d and not isinstance(d[k], (int, float)):
            return f"{k} must be a number, got {d[k]!r}"
    return None


def pair_lines(path: str, flag: str) -> list[dict]:
    items = read_jsonl(path, _check_pair, flag)
    for d in items:
        if "chosen" in d:
            d.update(image_a=d["chosen"], image_b=d["rejected"], label="a")
    return items


@dataclass
class Pair:
    prompt: str
    pixels: list[torch.Tensor]  # [(N_a, D), (N_b, D)]
    grids: list[torch.Tensor]  # [(1, 3), (1, 3)]
    texts: list[str]  # the chat text of A and of B, image tokens expanded
    label: int  # +1: A better, -1: B better, 0: tie
    targets: tuple[float, float]  # regression targets


class PairMaker:
    """Raw pair -> Pair (images preprocessed, texts built); Skip for unusable images or lengths."""

    def __init__(self, tokenizer, pix: Q.PixelConfig, max_length: int):
        self.tok, self.pix, self.max_length = tokenizer, pix, max_length

    def build(self, prompt: str, images: list, label: int, targets: tuple[float, float]) -> Pair:
        pixels, grids, texts = [], [], []
        for im in images:
            pv, grid = Q.preprocess_images([im], self.pix)
            text = Q.chat_text(Q.REWARD_USER.format(prompt=prompt), Q.image_tokens(grid, self.pix.merge_size)[0])
            if len(self.tok(text, add_special_tokens=False)["input_ids"]) > self.max_length:
                raise Skip("too_long")
            pixels.append(pv)
            grids.append(grid)
            texts.append(text)
        return Pair(prompt, pixels, grids, texts, label, targets)

    def from_jsonl(self, d: dict) -> Pair:
        a, b = load_image(d, "image_a"), load_image(d, "image_b")
        label = LABELS[str(d["label"]).lower()]
        default = {1: (1.0, 0.0), -1: (0.0, 1.0), 0: (0.5, 0.5)}[label]
        targets = (float(d.get("score_a", default[0])), float(d.get("score_b", default[1])))
        return self.build(d["prompt"], [a, b], label, targets)

    def from_genref(self, sample) -> Pair:
        return self.build(sample.prompt, [sample.good, sample.bad], 1, (1.0, 0.0))


def collate(pairs: list[Pair], tokenizer, model, image_token_id: int,
            device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """2B sequences (every A, then every B) -> model inputs, labels (B,), targets (B, 2)."""
    order = [(p, 0) for p in pairs] + [(p, 1) for p in pairs]
    inputs = Q.model_inputs(model, tokenizer, [p.texts[i] for p, i in order],
                            torch.cat([p.pixels[i] for p, i in order]), torch.cat([p.grids[i] for p, i in order]),
                            image_token_id)
    labels = torch.tensor([p.label for p in pairs], device=device)
    targets = torch.tensor([p.targets for p in pairs], dtype=torch.float32, device=device)
    return {k: v.to(device) for k, v in inputs.items()}, labels, targets


# ----------------------------------------------------------------------------------------------
# Losses


def pair_loss(ra: torch.Tensor, rb: torch.Tensor, label: torch.Tensor, kind: str, tie_margin: float = 1.0,
              margin: float = 1.0, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss over the pairs the loss uses; ra, rb (B,) raw rewards, label (B,) in {+1, -1, 0}."""
    d = ra - rb  # (B,)
    s = label.to(d.dtype)
    decided = label != 0
    used = torch.ones_like(decided)
    if kind == "bt":
        per, used = F.softplus(-s * d), decided
    elif kind == "btt":
        tau = tie_margin
        win = F.logsigmoid(s * d - tau)  # log P(the better one wins)
        hi, lo = F.logsigmoid(tau - d), F.logsigmoid(-tau - d)  # P(tie) = sigmoid(tau - d) - sigmoid(-tau - d)
        tie = hi + torch.log1p(-torch.exp(lo - hi).clamp(max=1 - 1e-7))
        per = -torch.where(decided, win, tie)
    elif kind == "margin":
        per = torch.where(decided, F.relu(margin - s * d), F.relu(d.abs() - margin))
    elif kind == "regression":
        if targets is None:
            raise ValueError("the regression loss needs targets")
        per = 0.5 * ((ra - targets[:, 0]) ** 2 + (rb - targets[:, 1]) ** 2)
    else:
        raise ValueError(f"loss {kind!r}; accepted: {', '.join(LOSSES)}")
    w = used.to(per.dtype)
    return (per * w).sum() / w.sum().clamp(min=1) + 0.0 * d.sum()  # 0 * d: a graph even if no pair is used


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class VerifierTrainResult:
    step: int
    minutes: float
    last_loss: float
    val_accuracy: float | None
    skipped: dict
    out: Path  # the exported model folder


def build_reward_model(cfg: VerifierTrainConfig, device: torch.device) -> Q.RewardModel:
    base = Q.load_qwen_vl(cfg.base, dtype=weights_dtype(cfg, device))
    model = Q.RewardModel.from_causal(base)
    model.backbone = apply_tuning(model.backbone, cfg)
    return model


@torch.no_grad()
def rewards(model: Q.RewardModel, tokenizer, pix: Q.PixelConfig, image_token_id: int, images: list,
            prompts: list[str], batch: int) -> torch.Tensor:
    """Raw rewards (n,) of single images (what the exported verifier computes)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        pv, grid = Q.preprocess_images(images[i : i + batch], pix)
        n_tok = Q.image_tokens(grid, pix.merge_size)
        texts = [Q.chat_text(Q.REWARD_USER.format(prompt=p), n) for p, n in zip(prompts[i : i + batch], n_tok)]
        inputs = Q.model_inputs(model, tokenizer, texts, pv, grid, image_token_id)
        with _autocast(device):
            out.append(model(**{k: v.to(device) for k, v in inputs.items()}).float().cpu())
    return torch.cat(out)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_verifier(cfg: VerifierTrainConfig) -> VerifierTrainResult:
    from transformers import AutoTokenizer

    cfg.validate()
    tok = AutoTokenizer.from_pretrained(cfg.base)
    pix = Q.PixelConfig.from_folder(cfg.base, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    image_token_id = Q.image_token_id(_config(cfg.base))
    maker = PairMaker(tok, pix, cfg.max_length)
    make_source, val_pairs, val_skipped = data_sources(cfg, maker, pair_lines)
    run, source = start_vlm_run(cfg, lambda dev: build_reward_model(cfg, dev), make_source)
    acc = run.procs

    def batch_loss(model, pairs: list[Pair]):
        inputs, labels, targets = collate(pairs, tok, model, image_token_id, acc.device)
        r = model(**inputs)  # (2B,)
        ra, rb = r[: len(pairs)], r[len(pairs) :]
        loss = pair_loss(ra, rb, labels, cfg.loss, cfg.tie_margin, cfg.margin, targets)
        decided = labels != 0
        right = ((ra - rb).sign() == labels.to(ra.dtype)) & decided
        acc_ = float(right.sum() / decided.sum()) if decided.any() else float("nan")
        return loss, {"train_accuracy": acc_, "reward_mean": float(r.detach().mean())}

    def validate(model) -> dict[str, float]:
        mine = val_pairs[acc.process_index :: acc.num_processes]
        right = decided = loss_sum = count = 0.0
        with torch.no_grad():
            for i in range(0, len(mine), cfg.batch_size):
                chunk = mine[i : i + cfg.batch_size]
                inputs, labels, targets = collate(chunk, tok, model, image_token_id, acc.device)
                with _autocast(acc.device):
                    r = model(**inputs).float()
                ra, rb = r[: len(chunk)], r[len(chunk) :]
                loss_sum += float(pair_loss(ra, rb, labels, cfg.loss, cfg.tie_margin, cfg.margin, targets)) * len(chunk)
                count += len(chunk)
                d = labels != 0
                right += float((((ra - rb).sign() == labels.to(ra.dtype)) & d).sum())
                decided += float(d.sum())
        right, decided, loss_sum, count = reduce_sums(acc, [right, decided, loss_sum, count])
        return {"val_accuracy": right / max(decided, 1), "val_loss": loss_sum / max(count, 1)}

    def export(model: Q.RewardModel) -> None:
        model.eval()
        src = make_source(0, 1)  # a fresh pass over the training data, in the same seeded order
        pairs = [src.next() for _ in range((cfg.norm_size + 1) // 2)]  # both images of each pair
        raw = torch.cat([_pair_rewards(model, pairs[i : i + cfg.batch_size], tok, image_token_id)
                         for i in range(0, len(pairs), cfg.batch_size)])
        model.mean.fill_(float(raw.mean()))
        model.std.fill_(float(raw.std().clamp(min=1e-6)))
        model.backbone = merged(model.backbone)
        dest = run.out / "verifier"
        model.save(dest, extra={"loss": cfg.loss, "base": str(Path(cfg.base).resolve()), "step": run.step,
                                "norm_images": int(raw.numel()), "user_template": Q.REWARD_USER})
        Q.copy_processing_files(cfg.base, dest)
        (dest / "preprocessor_config.json").write_text(json.dumps(pix.to_preprocessor_config(), indent=1) + "\n")

    res, skipped = train_vlm_judge(cfg, run, source, "verifier", batch_loss, validate if val_pairs else None, export)
    skipped = dict(skipped)
    for k, v in val_skipped.items():
        skipped[f"val_{k}"] = v
    return VerifierTrainResult(step=res.step, minutes=res.minutes, last_loss=res.last_loss,
                               val_accuracy=res.val.get("val_accuracy"), skipped=skipped, out=run.out / "verifier")


@torch.no_grad()
def _pair_rewards(model, pairs: list[Pair], tok, image_token_id: int) -> torch.Tensor:
    device = next(model.parameters()).device
    inputs, _, _ = collate(pairs, tok, model, image_token_id, device)
    with _autocast(device):
        return model(**inputs).float().cpu()


def _config(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)

