"""Local verifiers through transformers: a VLM asked yes/no, and CLIPScore.

Both load from a local folder (a hub snapshot or anything `save_pretrained` wrote) and check it
before loading weights. No network, no API key, no cost in VLM calls (calls = 0: the ledger counts
their time under the verify stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...components import Verdict, Verifier
from ...io import read_model_config
from . import prompts as P


class LocalModelError(ValueError):
    """A --local-verifier-path / --clip-path that is not a usable transformers folder."""


def check_model_folder(path: str | Path, flag: str, accepted: tuple[str, ...] = ()) -> dict:
    """The folder must hold config.json (of an accepted model_type, if given) and processor files."""
    p, config = read_model_config(path, flag, LocalModelError)
    if accepted and config.get("model_type") not in accepted:
        raise LocalModelError(f"{flag} {p}: model_type {config.get('model_type')!r}; expected {' or '.join(accepted)}")
    names = ("preprocessor_config.json", "processor_config.json")
    if not any((p / n).is_file() for n in names):
        raise LocalModelError(f"{flag} {p}: no {' or '.join(names)} (the image processor is needed)")
    return config


def _device_dtype(device: str, dtype: str):
    from ..flux.loading import resolve_device, resolve_dtype

    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


def _pil(images: Sequence):
    from PIL import Image

    return [Image.fromarray(np.asarray(im, dtype=np.uint8)).convert("RGB") for im in images]


def _token_ids(tokenizer, words: tuple[str, ...]) -> list[int]:
    """Ids of the words that are single tokens (with and without a leading space)."""
    ids = set()
    for w in words:
        for variant in (w, " " + w):
            enc = tokenizer.encode(variant, add_special_tokens=False)
            if len(enc) == 1:
                ids.add(enc[0])
    return sorted(ids)


class LocalYesNoVerifier(Verifier):
    """A chat VLM (Qwen2.5-VL, LLaVA, ...: AutoModelForImageTextToText) asked whether the image matches.

    score = P(yes) / (P(yes) + P(no)) from the next-token distribution after the question; yes =
    P(yes) > P(no). Ranking puts yes first, then by score: the NVILA verifier's ranking
    (docs/method.md, section 5).
    """

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto", batch_size: int = 8):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        check_model_folder(path, "--local-verifier-path")
        self.device, torch_dtype = _device_dtype(device, dtype)
        self.batch_size = batch_size
        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"  # the last position is the answer's for every row
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype).to(self.device).eval()
        tok = self.processor.tokenizer
        self.yes_ids = _token_ids(tok, ("Yes", "yes", "YES"))
        self.no_ids = _token_ids(tok, ("No", "no", "NO"))
        if not self.yes_ids or not self.no_ids:
            raise LocalModelError(f"--local-verifier-path {path}: the tokenizer has no single token for yes / no")
        self._torch = torch

    def _texts(self, prompts: Sequence[str]) -> list[str]:
        out = []
        for p in prompts:
            msgs = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": P.YESNO_USER.format(prompt=p)}]}]
            out.append(self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
        return out

    def score(self, images: Sequence, prompts: Sequence[str]) -> list[Verdict]:
        torch = self._torch
        out: list[Verdict] = []
        for i in range(0, len(images), self.batch_size):
            ims, ps = _pil(images[i : i + self.batch_size]), list(prompts[i : i + self.batch_size])
            inputs = self.processor(text=self._texts(ps), images=ims, return_tensors="pt", padding=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.no_grad():
                logits = self.model(**inputs).logits[:, -1, :].float()  # (B, vocab)
            logp = torch.log_softmax(logits, dim=-1)
            p_yes = torch.logsumexp(logp[:, self.yes_ids], dim=-1).exp()
            p_no = torch.logsumexp(logp[:, self.no_ids], dim=-1).exp()
            for y, n in zip(p_yes.tolist(), p_no.tolist()):
                out.append(Verdict(score=y / (y + n), yes=y > n, details={"p_yes": y, "p_no": n}))
        return out


class CLIPScoreVerifier(Verifier):
    """CLIPScore: 100 x max(cos(image, text), 0), as torchmetrics computes it (Hessel et al. 2021)."""

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto", batch_size: int = 32):
        import torch
        from transformers import AutoProcessor, CLIPModel

        check_model_folder(path, "--clip-path", accepted=("clip",))
        self.device, torch_dtype = _device_dtype(device, dtype)
        self.batch_size = batch_size
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = CLIPModel.from_pretrained(path, dtype=torch_dtype).to(self.device).eval()
        self._torch = torch

    def score(self, images: Sequence, prompts: Sequence[str]) -> list[Verdict]:
        torch = self._torch
        out: list[Verdict] = []
        for i in range(0, len(images), self.batch_size):
            inputs = self.processor(text=list(prompts[i : i + self.batch_size]),
                                    images=_pil(images[i : i + self.batch_size]),
                                    return_tensors="pt", padding=True, truncation=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.no_grad():
                o = self.model(**inputs)  # image_embeds / text_embeds come out L2-normalised
            cos = (o.image_embeds.float() * o.text_embeds.float()).sum(-1)  # (B,) pairwise, not all-pairs
            out += [Verdict(score=100.0 * max(c, 0.0), details={"cosine": c}) for c in cos.tolist()]
        return out
