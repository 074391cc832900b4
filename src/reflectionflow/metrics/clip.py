"""CLIP-based metrics through transformers: CLIPScore, and PickScore (a reward model).

CLIPScore (Hessel et al. 2021, as torchmetrics computes it): 100 x max(cos(image, prompt), 0).
PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on human preferences; score =
exp(logit_scale) x cos(image, prompt), the reward its authors rank images by.

Models come from a local folder (a hub snapshot or anything `save_pretrained` wrote) or a hub id;
the folder's config is checked (a hub id's JSON files fetched) before any weights load.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import ImageScore, Metric, MetricError, MetricOptions, PromptItem

CLIP_DEFAULT = "openai/clip-vit-large-patch14"  # torchmetrics' CLIPScore default
PICKSCORE_DEFAULT = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_DEFAULT = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # what PickScore's authors load it with
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def locate(path_or_id: str, flag: str) -> Path:
    """A local folder, or a hub id's small JSON files (fetched or found in the cache); no weights."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise MetricError(f"{flag} {p}: is a file; expected a transformers model folder")
        return p
    if not _HUB_ID.match(path_or_id):
        raise MetricError(f"{flag} {path_or_id}: no such folder (and not a hub id like {CLIP_DEFAULT})")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_id, allow_patterns=["*.json", "*.txt"]))
    except Exception as e:  # offline, gated, missing: the hub raises many kinds
        raise MetricError(f"{flag} {path_or_id}: not a local folder and the hub gave no copy "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def check_clip(path_or_id: str, flag: str, processor: str | None = None, processor_flag: str = "") -> None:
    folder = locate(path_or_id, flag)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MetricError(f"{flag} {path_or_id}: no config.json (not a transformers model folder)") from None
    except ValueError as e:
        raise MetricError(f"{flag} {path_or_id}/config.json: not valid JSON ({e})") from None
    if config.get("model_type") != "clip":
        raise MetricError(f"{flag} {path_or_id}: model_type {config.get('model_type')!r}; expected clip")
    where, what = (locate(processor, processor_flag), f"{processor_flag} {processor}") if processor else (
        folder, f"{flag} {path_or_id}")
    if not any((where / n).is_file() for n in PROCESSOR_FILES):
        raise MetricError(f"{what}: no {' or '.join(PROCESSOR_FILES)} (the image processor is needed)")


class CLIPScorer:
    """Cosine similarities of (image, prompt) pairs from a transformers CLIPModel."""

    def __init__(self, path: str, processor: str | None = None, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 32):
        import torch
        from transformers import AutoProcessor, CLIPModel

        from ..backends.flux.loading import resolve_device, resolve_dtype

        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.processor = AutoProcessor.from_pretrained(processor or path)
        self.model = CLIPModel.from_pretrained(path, dtype=resolve_dtype(dtype, self.device)).to(self.device).eval()
        self.logit_scale = float(self.model.logit_scale.detach().exp())
        self._torch = torch

    def cosines(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        from PIL import Image

        torch = self._torch
        out: list[float] = []
        for i in range(0, len(images), self.batch_size):
            pil = [Image.fromarray(np.asarray(im, dtype=np.uint8)).convert("RGB")
                   for im in images[i : i + self.batch_size]]
            inputs = self.processor(text=list(prompts[i : i + self.batch_size]), images=pil, return_tensors="pt",
                                    padding=True, truncation=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.no_grad():
                o = self.model(**inputs)  # image_embeds / text_embeds come out L2-normalised
            out += (o.image_embeds.float() * o.text_embeds.float()).sum(-1).tolist()  # (B,) pairwise
        return out


class CLIPScore(Metric):
    name = "clipscore"
    description = "CLIPScore: 100 x max(cos(image, prompt), 0) from a transformers CLIP (--clip-path)"
    verifier_name = "clip"  # the engine's CLIPScore verifier

    @classmethod
    def check(cls, options: MetricOptions, root: Path, items: list[PromptItem]) -> None:
        check_clip(options.clip_path or CLIP_DEFAULT, "--clip-path")

    def __init__(self, options: MetricOptions):
        super().__init__(options)
        self.path = options.clip_path or CLIP_DEFAULT
        self.scorer = CLIPScorer(self.path, device=options.device, dtype=options.dtype,
                                 batch_size=options.batch_size)

    def info(self) -> dict:
        return {"model": self.path}

    def score(self, images, prompts) -> list[ImageScore]:
        return [ImageScore(score=100.0 * max(c, 0.0), details={"cosine": round(c, 6)})
                for c in self.scorer.cosines(images, prompts)]


class PickScore(Metric):
    name = "pickscore"
    description = "PickScore reward model: exp(logit_scale) x cos(image, prompt) (--pickscore-path)"

    @classmethod
    def check(cls, options: MetricOptions, root: Path, items: list[PromptItem]) -> None:
        check_clip(options.pickscore_path or PICKSCORE_DEFAULT, "--pickscore-path", cls._processor(options),
                   "--pickscore-processor")

    @staticmethod
    def _processor(options: MetricOptions) -> str | None:
        if options.pickscore_processor:
            return options.pickscore_processor
        # PickScore_v1 on the hub ships no processor; a local folder usually has one saved beside it.
        path = options.pickscore_path or PICKSCORE_DEFAULT
        local = Path(path).expanduser()
        if local.is_dir() and any((local / n).is_file() for n in PROCESSOR_FILES):
            return None
        return PICKSCORE_PROCESSOR_DEFAULT

    def __init__(self, options: MetricOptions):
        super().__init__(options)
        self.path = options.pickscore_path or PICKSCORE_DEFAULT
        self.processor = self._processor(options)
        self.scorer = CLIPScorer(self.path, processor=self.processor, device=options.device, dtype=options.dtype,
                                 batch_size=options.batch_size)

    def info(self) -> dict:
        return {"model": self.path, "processor": self.processor or self.path, "logit_scale": self.scorer.logit_scale}

    def score(self, images, prompts) -> list[ImageScore]:
        s = self.scorer.logit_scale
        return [ImageScore(score=s * c, details={"cosine": round(c, 6)}) for c in self.scorer.cosines(images, prompts)]
