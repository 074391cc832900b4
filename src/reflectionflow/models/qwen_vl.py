"""Qwen2.5-VL pieces the real-scale judges are trained and served with.

- `PixelConfig` / `preprocess_images`: Qwen2.5-VL's image preprocessing written out (resize to
  multiples of 28 within [min_pixels, max_pixels], CLIP mean/std, patchify with temporal patch 2),
  so no image-processor class (and no torchvision) is needed; the numbers come from the model
  folder's preprocessor_config.json.
- `chat_text`: the Qwen chat format with one image placeholder expanded to the image's tokens.
- `RewardModel`: the VLM's decoder with a scalar head read at the last token (the image verifier).
- `check_qwen_folder`, `load_qwen_vl`: a model folder checked before any weights load.
- `tiny_qwen_vl` and `QWEN25_VL_7B`: a tiny random model folder (tokenizer included) for tests,
  and the 7B model's shape for benchmarks.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..io import read_model_config

# model_type -> the transformers class with the language-model head
FAMILIES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
DEFAULT_SYSTEM = "You are a helpful assistant."
REWARD_FILE = "reward_head.safetensors"
REWARD_CONFIG = "reward_config.json"
# What the reward model reads beside the image (training and scoring use the same text).
REWARD_USER = 'Prompt: "{prompt}"\nHow well does the image match the prompt?'


class QwenFolderError(ValueError):
    """A model folder that is not a usable Qwen2-VL / Qwen2.5-VL folder."""


# ----------------------------------------------------------------------------------------------
# Pixels


@dataclass(frozen=True)
class PixelConfig:
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_folder(cls, path: str | Path, **overrides) -> PixelConfig:
        d = json.loads((Path(path) / "preprocessor_config.json").read_text())
        size = d.get("size") or {}
        kw = dict(min_pixels=d.get("min_pixels", size.get("shortest_edge", cls.min_pixels)),
                  max_pixels=d.get("max_pixels", size.get("longest_edge", cls.max_pixels)),
                  patch_size=d.get("patch_size", 14), temporal_patch_size=d.get("temporal_patch_size", 2),
                  merge_size=d.get("merge_size", 2), image_mean=tuple(d.get("image_mean", CLIP_MEAN)),
                  image_std=tuple(d.get("image_std", CLIP_STD)))
        return cls(**(kw | {k: v for k, v in overrides.items() if v is not None}))

    def to_preprocessor_config(self) -> dict:
        """preprocessor_config.json as the Qwen2.5-VL releases write it."""
        d = asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d | {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
                    "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
                    "rescale_factor": 1 / 255, "resample": 3,
                    "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's rule: both sides multiples of `factor`, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as that allows."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be below 200, got {height}x{width}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def preprocess_images(images, cfg: PixelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ((H, W, 3) uint8 arrays or PIL images) -> pixel_values (N, 3*T*P*P) float32 and
    image_grid_thw (n, 3) int64, the layout Qwen2.5-VL's vision tower reads."""
    from PIL import Image

    p, t, m = cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    rows, grids = [], []
    for im in images:
        im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8))
        im = im.convert("RGB")
        h, w = smart_resize(im.height, im.width, p * m, cfg.min_pixels, cfg.max_pixels)
        x = np.asarray(im.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
        x = ((x - mean) / std).transpose(2, 0, 1)  # (3, h, w)
        x = np.repeat(x[None], t, axis=0)  # (T, 3, h, w): a still image is T identical frames
        gh, gw = h // p, w // p
        x = x.reshape(1, t, 3, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (1, gh/m, gw/m, m, m, 3, T, p, p): merge groups adjacent
        rows.append(x.reshape(gh * gw, 3 * t * p * p))
        grids.append((1, gh, gw))
    return torch.from_numpy(np.concatenate(rows)), torch.tensor(grids, dtype=torch.long)


def image_tokens(grid_thw: torch.Tensor, merge_size: int) -> list[int]:
    """Tokens each image takes in the text (patches merged merge_size x merge_size)."""
    return (grid_thw.prod(-1) // (merge_size * merge_size)).tolist()


def chat_text(user_text: str, n_image_tokens: int | None, system: str = DEFAULT_SYSTEM,
              answer: str | None = None) -> str:
    """Qwen's chat format for one user turn (the image first, as the engine's messages put it),
    ending at the assistant's turn; with `answer`, the answer and <|im_end|> follow."""
    image = "" if n_image_tokens is None else "<|vision_start|>" + "<|image_pad|>" * n_image_tokens + "<|vision_end|>"
    text = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{image}{user_text}<|im_end|>\n"
            "<|im_start|>assistant\n")
    return text if answer is None else text + answer + "<|im_end|>"


# The same format as a Jinja chat template, saved with exported models so that vLLM builds the
# prompts the model was trained on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def model_inputs(model: nn.Module, tokenizer, texts: list[str], pixel_values: torch.Tensor,
                 grid_thw: torch.Tensor, image_token_id: int, padding_side: str = "right") -> dict:
    """Tokenised batch with the vision inputs; `mm_token_type_ids` added for transformers versions
    whose Qwen2.5-VL forward takes it (it marks image tokens for the 3D rotary positions)."""
    tokenizer.padding_side = padding_side
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
              "pixel_values": pixel_values, "image_grid_thw": grid_thw}
    if _takes_token_types(model):
        inputs["mm_token_type_ids"] = (enc["input_ids"] == image_token_id).int()
    return inputs


def _takes_token_types(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for m in (base, getattr(base, "model", None), getattr(base, "backbone", None)):
        if m is not None and "mm_token_type_ids" in inspect.signature(m.forward).parameters:
            return True
    return False


# ----------------------------------------------------------------------------------------------
# Folders


def check_qwen_folder(path: str | Path, flag: str, need_weights: bool = True) -> dict:
    """config.json of an accepted family, a tokenizer and preprocessor_config.json; no weights read."""
    p, config = read_model_config(path, flag, QwenFolderError)
    if config.get("model_type") not in FAMILIES:
        raise QwenFolderError(f"{flag} {p}: model_type {config.get('model_type')!r} "
                              f"(architectures {config.get('architectures')}); accepted: {', '.join(FAMILIES)}")
    if not any((p / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        raise QwenFolderError(f"{flag} {p}: no tokenizer.json or tokenizer_config.json")
    if not (p / "preprocessor_config.json").is_file():
        raise QwenFolderError(f"{flag} {p}: no preprocessor_config.json (the image settings are needed)")
    if need_weights and not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise QwenFolderError(f"{flag} {p}: no weights (*.safetensors)")
    return config


def model_class(model_type: str):
    import transformers

    return getattr(transformers, FAMILIES[model_type])


def image_token_id(config) -> int:
    return int(getattr(config, "image_token_id", None) or config.text_config.image_token_id)


def load_qwen_vl(path: str | Path, dtype: torch.dtype = torch.float32, flag: str = "--base") -> nn.Module:
    """The model with its language-model head, from a checked folder."""
    config = check_qwen_folder(path, flag)
    return model_class(config["model_type"]).from_pretrained(str(path), dtype=dtype)


def copy_processing_files(src: str | Path, dst: str | Path) -> None:
    """Tokenizer, preprocessor and chat-template files, so an exported folder stands alone."""
    import shutil

    src, dst = Path(src), Path(dst)
    for f in src.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens",
                                               "preprocessor", "processor", "chat_template", "generation_config"))):
            shutil.copy2(f, dst / f.name)
    if not (dst / "chat_template.json").exists() and not (dst / "chat_template.jinja").exists():
        (dst / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}) + "\n")


# ----------------------------------------------------------------------------------------------
# The reward model


class RewardModel(nn.Module):
    """A Qwen2-VL-family decoder (no LM head) and a linear head on the last token's hidden state.

    `mean` / `std` are the raw rewards' statistics over training images (buffers, saved in
    reward_config.json): `normalised = (raw - mean) / std`, as the original's `VQ` score."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone  # Qwen2_5_VLModel (or a peft wrapper of it)
        self.head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden_size))
        nn.init.zeros_(self.head.bias)
        self.register_buffer("mean", torch.zeros(()), persistent=False)
        self.register_buffer("std", torch.ones(()), persistent=False)

    @classmethod
    def from_causal(cls, model: nn.Module) -> RewardModel:
        """From a model with an LM head (its `.model`, the decoder); the LM head is dropped."""
        cfg = model.config
        out = cls(model.model, cfg.text_config.hidden_size)
        out.config = cfg
        return out

    def forward(self, input_ids, attention_mask, **vision) -> torch.Tensor:
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **vision).last_hidden_state  # (B, L, D)
        last = attention_mask.long().sum(-1) - 1  # right padding: the last real token
        h = h[torch.arange(h.shape[0], device=h.device), last]  # (B, D)
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()  # (B,) raw rewards

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  str(path / REWARD_FILE))
        meta = {"format": "reflectionflow.reward/1", "mean": float(self.mean), "std": float(self.std),
                "hidden_size": self.head.in_features, **(extra or {})}
        (path / REWARD_CONFIG).write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32, flag: str = "--verifier-path") -> RewardModel:
        import transformers
        from safetensors.torch import load_file

        path = Path(path)
        check_reward_folder(path, flag)
        config = json.loads((path / "config.json").read_text())
        base_cls = getattr(transformers, FAMILIES[config["model_type"]].replace("ForConditionalGeneration", "Model"))
        backbone = base_cls.from_pretrained(str(path), dtype=dtype)
        meta = json.loads((path / REWARD_CONFIG).read_text())
        out = cls(backbone, meta["hidden_size"])
        out.config = backbone.config
        out.head.load_state_dict(load_file(str(path / REWARD_FILE)))
        out.mean.fill_(meta["mean"])
        out.std.fill_(meta["std"])
        return out


def check_reward_folder(path: str | Path, flag: str = "--verifier-path") -> dict:
    config = check_qwen_folder(path, flag)
    p = Path(path)
    for name in (REWARD_FILE, REWARD_CONFIG):
        if not (p / name).is_file():
            raise QwenFolderError(f"{flag} {p}: no {name} (not a reward model written by "
                                  "`reflectionflow train verifier`)")
    return config


# ----------------------------------------------------------------------------------------------
# Sizes: a tiny random model for tests, the 7B shape for benchmarks


def _tiny_tokenizer():
    """A byte-level tokenizer (every string encodes; 256 byte tokens) with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                  additional_special_tokens=list(SPECIAL_TOKENS[1:]))
    tok.add_special_tokens({"pad_token": "<|endoftext|>"})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(vocab_size: int, ids: dict[str, int], hidden: int = 64, layers: int = 2):
    from transformers import Qwen2_5_VLConfig

    head_dim = hidden // 4
    third = head_dim // 2 // 4  # mrope sections (t, h, w) must sum to head_dim / 2
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rope_theta=1e6,
                         rope_scaling={"type": "mrope", "mrope_section": [head_dim // 2 - 2 * third, third, third]},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[1], window_size=56, patch_size=14, temporal_patch_size=2,
                           spatial_merge_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)


def tiny_qwen_vl(path: str | Path, seed: int = 0, max_pixels: int = 56 * 56) -> Path:
    """Save a tiny random Qwen2.5-VL (tokenizer, preprocessor config, chat template) to `path`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _tiny_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(len(tok), ids))
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    pix = PixelConfig(min_pixels=28 * 28, max_pixels=max_pixels)
    (path / "preprocessor_config.json").write_text(json.dumps(pix.to_preprocessor_config(), indent=1) + "\n")
    (path / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}) + "\n")
    return path


# Qwen2.5-VL-7B-Instruct's shape (config.json of the release).
QWEN25_VL_7B = dict(
    text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rope_theta=1e6,
              rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14, temporal_patch_size=2,
                spatial_merge_size=2),
)


def config_7b(ids: dict[str, int]):
    """The 7B shape with the special-token ids of the tokenizer it is used with."""
    from transformers import Qwen2_5_VLConfig

    text = QWEN25_VL_7B["text"] | dict(bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                                       pad_token_id=ids["<|endoftext|>"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=QWEN25_VL_7B["vision"],
                            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                            tie_word_embeddings=False)


def tiny_tokenizer():
    return _tiny_tokenizer()
