"""The trained real-scale judges, run locally through transformers.

- `RewardVerifier` (`--verifier reward`): the reward model `reflectionflow train verifier` writes;
  score = (raw reward - mean) / std with the training images' statistics (the original's
  normalised `VQ` score), raw reward in `details`.
- `LocalReflector` (`--reflector local`): a Qwen2.5-VL folder (the merged model `reflectionflow
  train reflector` writes, or any Qwen2.5-VL-Instruct) asked for edit commands; the answer's
  "- <instruction>" lines are the reflection (docs/method.md, section 2).

Both folders are checked before any weights load; a folder of another architecture is a one-line
error. The message the reflector sees is the one it was trained on (`reflection_messages`), and
the same one the OpenAI-compatible path sends when the model is served by vLLM.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from ...components import Reflection, ReflectionRequest, Reflector, Verdict, Verifier
from . import prompts as P
from .local import _device_dtype

REFLECTOR_CONFIG = "reflector_config.json"
MESSAGE_STYLES = ("instruct", "reflection-generator")
_COMMAND = re.compile(r"^\s*[-*\u2022]\s+(\S.*?)\s*$")


def parse_commands(text: str) -> list[str]:
    """The reflection's commands: its lines of the form "- <instruction>" (other lines, such as an
    analysis before them, are not commands). Empty when nothing parses."""
    return ["- " + m.group(1) for m in map(_COMMAND.match, text.splitlines()) if m]


def format_instructions(instructions) -> str:
    """GenRef-CoT instructions (a string or a list of strings) as "- <instruction>" lines."""
    items = [instructions] if isinstance(instructions, str) else list(instructions)
    lines: list[str] = []
    for item in items:
        lines += P.parse_bullets(str(item)) if str(item).strip() else []
    return "\n".join(lines)


def reflection_messages(style: str, original: str, current: str | None = None, previous: str | None = None,
                        evaluation: str = "none") -> tuple[str, str]:
    """(system, user text) the reflector reads beside the image: the engine's reflection prompt
    (style instruct, as VLMReflector sends it) or the released reflection model's message."""
    if style == "reflection-generator":
        return "You are a helpful assistant.", P.REFLECTION_GENERATOR_TEXT.format(prompt=original)
    prev = "\n" + previous if previous else "none"
    return P.REFLECT_SYSTEM, P.REFLECT_USER.format(original=original, current=current or original, previous=prev,
                                                   evaluation=evaluation)


def generate_texts(model, tokenizer, pix, images: Sequence, messages: Sequence[tuple[str, str]],
                   max_new_tokens: int) -> list[str]:
    """Greedy answers of a Qwen2-VL-family model to (system, user) messages, one image each."""
    import torch

    from ...models import qwen_vl as Q

    device = next(model.parameters()).device
    pv, grid = Q.preprocess_images(list(images), pix)
    n_tok = Q.image_tokens(grid, pix.merge_size)
    texts = [Q.chat_text(user, n, system=system) for (system, user), n in zip(messages, n_tok)]
    inputs = Q.model_inputs(model, tokenizer, texts, pv, grid, Q.image_token_id(model.config), padding_side="left")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


class RewardVerifier(Verifier):
    """Scores from a reward-model folder; higher is better, 0 is the training images' mean."""

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto", batch_size: int = 8):
        import torch
        from transformers import AutoTokenizer

        from ...models import qwen_vl as Q

        Q.check_reward_folder(path, "--verifier-path")
        self.device, torch_dtype = _device_dtype(device, dtype)
        self.batch_size = batch_size
        self.model = Q.RewardModel.load(path, dtype=torch_dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.pix = Q.PixelConfig.from_folder(path)
        meta = json.loads((Path(path) / Q.REWARD_CONFIG).read_text())
        self.template = meta.get("user_template", Q.REWARD_USER)
        self._torch, self._Q = torch, Q

    def raw(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        Q = self._Q
        out: list[float] = []
        for i in range(0, len(images), self.batch_size):
            pv, grid = Q.preprocess_images(list(images[i : i + self.batch_size]), self.pix)
            n_tok = Q.image_tokens(grid, self.pix.merge_size)
            texts = [Q.chat_text(self.template.format(prompt=p), n)
                     for p, n in zip(prompts[i : i + self.batch_size], n_tok)]
            inputs = Q.model_inputs(self.model, self.tokenizer, texts, pv, grid, Q.image_token_id(self.model.config))
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.backbone.dtype)
            with self._torch.no_grad():
                out += self.model(**inputs).tolist()
        return out

    def score(self, images: Sequence, prompts: Sequence[str]) -> list[Verdict]:
        mean, std = float(self.model.mean), float(self.model.std)
        return [Verdict(score=(r - mean) / std, details={"raw": r}) for r in self.raw(images, prompts)]


class LocalReflector(Reflector):
    """Edit commands from a local Qwen2-VL-family model (greedy decoding, batched, left padded)."""

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto", batch_size: int = 4,
                 max_new_tokens: int | None = None, style: str | None = None):
        from transformers import AutoTokenizer

        from ...models import qwen_vl as Q

        Q.check_qwen_folder(path, "--reflector-path")
        meta_path = Path(path) / REFLECTOR_CONFIG
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.style = style or meta.get("message_style", "instruct")
        if self.style not in MESSAGE_STYLES:
            raise ValueError(f"reflector style {self.style!r}; accepted: {', '.join(MESSAGE_STYLES)}")
        self.max_new_tokens = max_new_tokens or meta.get("max_new_tokens", 256)
        self.device, torch_dtype = _device_dtype(device, dtype)
        self.batch_size = batch_size
        self.model = Q.load_qwen_vl(path, dtype=torch_dtype, flag="--reflector-path").to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.pix = Q.PixelConfig.from_folder(path)

    def reflect(self, requests: Sequence[ReflectionRequest]) -> list[Reflection]:
        out: list[Reflection] = []
        for i in range(0, len(requests), self.batch_size):
            chunk = requests[i : i + self.batch_size]
            messages = [reflection_messages(self.style, r.original_prompt, r.current_prompt, r.previous_reflection,
                                            P.evaluation_text(r.verdict)) for r in chunk]
            texts = generate_texts(self.model, self.tokenizer, self.pix, [r.image for r in chunk], messages,
                                   self.max_new_tokens)
            for text in texts:
                lines = parse_commands(text) or P.parse_bullets(text)
                out.append(Reflection(text="\n".join(lines), error=None if lines else "empty reflection"))
        return out
