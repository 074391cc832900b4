"""`reflectionflow train reflector`: supervised fine-tuning of a Qwen2.5-VL reflection generator.

Data: GenRef-CoT-style JSONL, one example a line: {"prompt": ..., "image": PATH, "instructions":
"..." or [...], "analysis": optional} (relative paths from the JSONL's folder), or GenRef shards
(the bad image and its reflection). The target is the instructions as "- <instruction>" lines,
the command style of docs/method.md, section 2 (with include_analysis, the analysis comes first and
the commands follow); the message is the engine's reflection prompt (message_style instruct, as
`--reflector vlm` sends it) or the released reflection model's (reflection-generator). Loss:
teacher-forced cross-entropy on the answer tokens only. LoRA adapters on the language model by
default (train/vlm_common.apply_tuning).

Validation every val_every steps: held-out loss (per answer token) and the share of greedy
reflections on held-out images that parse into commands (`val_generate` of them). At the end:
OUT/reflector-lora (the peft adapters) and OUT/reflector, the merged model with tokenizer,
preprocessor and chat template: `--reflector local --reflector-path OUT/reflector`, or
`vllm serve OUT/reflector` for the OpenAI-compatible path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backends.vlm.reward import (
    MESSAGE_STYLES,
    REFLECTOR_CONFIG,
    format_instructions,
    generate_texts,
    parse_commands,
    reflection_messages,
)
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


@dataclass
class ReflectorTrainConfig(VLMTrainConfig):
    out_dir: str = "runs/reflector"
    message_style: str = "instruct"
    include_analysis: bool = False
    val_generate: int = 16  # held-out images reflected greedily at each validation
    max_new_tokens: int = 256
    lr: float = 1e-4

    def validate(self) -> ReflectorTrainConfig:
        if self.message_style not in MESSAGE_STYLES:
            raise ValueError(f"message_style {self.message_style!r}; accepted: {', '.join(MESSAGE_STYLES)}")
        if self.val_generate < 0 or self.max_new_tokens < 1:
            raise ValueError("val_generate must be >= 0 and max_new_tokens >= 1")
        super().validate()
        if self.data_format == "jsonl":
            cot_lines(self.data, "--data")
            if self.val_data:
                cot_lines(self.val_data, "--val-data")
        return self


def _check_cot(d: dict) -> str | None:
    image = "image_path" if "image_path" in d and "image" not in d else "image"
    missing = [k for k in ("prompt", image, "instructions") if k not in d]
    if missing:
        return f"missing {', '.join(missing)} (a line has prompt, image, instructions and optionally analysis)"
    if not isinstance(d["instructions"], (str, list)):
        return f"instructions must be a string or a list of strings, got {type(d['instructions']).__name__}"
    return None


def cot_lines(path: str, flag: str) -> list[dict]:
    items = read_jsonl(path, _check_cot, flag)
    for d in items:
        d.setdefault("image", d.get("image_path"))
    return items


@dataclass
class Example:
    prompt: str
    image: object  # (H, W, 3) uint8, kept for generation at validation
    pixels: torch.Tensor  # (N, D)
    grid: torch.Tensor  # (1, 3)
    prompt_ids: list[int]
    answer_ids: list[int]  # the target and <|im_end|>
    target: str


class ExampleMaker:
    def __init__(self, tokenizer, pix: Q.PixelConfig, cfg: ReflectorTrainConfig):
        self.tok, self.pix, self.cfg = tokenizer, pix, cfg

    def build(self, prompt: str, image, target: str) -> Example:
        if not parse_commands(target):
            raise Skip("no_commands")
        pv, grid = Q.preprocess_images([image], self.pix)
        system, user = reflection_messages(self.cfg.message_style, prompt)
        text = Q.chat_text(user, Q.image_tokens(grid, self.pix.merge_size)[0], system=system)
        # Prompt and answer tokenised apart: the answer's first token never merges with the prompt's last.
        p_ids = self.tok(text, add_special_tokens=False)["input_ids"]
        a_ids = self.tok(target + "<|im_end|>", add_special_tokens=False)["input_ids"]
        if len(p_ids) + len(a_ids) > self.cfg.max_length:
            raise Skip("too_long")
        return Example(prompt, image, pv, grid, p_ids, a_ids, target)

    def target(self, instructions, analysis: str | None) -> str:
        commands = format_instructions(instructions)
        if self.cfg.include_analysis and analysis:
            return f"{analysis.strip()}\n\n{commands}"
        return commands

    def from_jsonl(self, d: dict) -> Example:
        return self.build(d["prompt"], load_image(d, "image"), self.target(d["instructions"], d.get("analysis")))

    def from_genref(self, sample) -> Example:
        return self.build(sample.prompt, sample.bad, self.target(sample.reflection, None))


def collate(examples: list[Example], model, tokenizer, image_token_id: int, device) -> tuple[dict, torch.Tensor]:
    """Right-padded prompt + answer ids; labels -100 except on the answer tokens."""
    pad = tokenizer.pad_token_id
    length = max(len(e.prompt_ids) + len(e.answer_ids) for e in examples)
    ids = torch.full((len(examples), length), pad, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        seq = e.prompt_ids + e.answer_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(e.prompt_ids) : len(seq)] = torch.tensor(e.answer_ids)
        mask[i, : len(seq)] = 1
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat([e.pixels for e in examples]),
              "image_grid_thw": torch.cat([e.grid for e in examples])}
    if Q._takes_token_types(model):
        inputs["mm_token_type_ids"] = (ids == image_token_id).int()
    return {k: v.to(device) for k, v in inputs.items()}, labels.to(device)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over answer tokens (position t predicts token t + 1) and their count."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]  # (B, L-1, V), (B, L-1)
    n = int((labels != -100).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss / max(n, 1), n


@dataclass
class ReflectorTrainResult:
    step: int
    minutes: float
    last_loss: float
    val_loss: float | None
    val_parse_share: float | None
    skipped: dict
    out: Path


def build_reflector_model(cfg: ReflectorTrainConfig, device: torch.device):
    return apply_tuning(Q.load_qwen_vl(cfg.base, dtype=weights_dtype(cfg, device)), cfg)


def train_reflector(cfg: ReflectorTrainConfig) -> ReflectorTrainResult:
    from transformers import AutoConfig, AutoTokenizer

    cfg.validate()
    tok = AutoTokenizer.from_pretrained(cfg.base)
    pix = Q.PixelConfig.from_folder(cfg.base, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    image_token_id = Q.image_token_id(AutoConfig.from_pretrained(cfg.base))
    maker = ExampleMaker(tok, pix, cfg)
    make_source, val_examples, val_skipped = data_sources(cfg, maker, cot_lines)
    run, source = start_vlm_run(cfg, lambda dev: build_reflector_model(cfg, dev), make_source)
    acc = run.procs

    def batch_loss(model, examples: list[Example]):
        inputs, labels = collate(examples, model, tok, image_token_id, acc.device)
        loss, n = answer_loss(model(**inputs).logits, labels)
        return loss, {"answer_tokens": float(n)}

    def validate(model) -> dict[str, float]:
        mine = val_examples[acc.process_index :: acc.num_processes]
        loss_sum = tokens = parsed = generated = 0.0
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=acc.device.type == "cuda")
        with torch.no_grad():
            for i in range(0, len(mine), cfg.batch_size):
                inputs, labels = collate(mine[i : i + cfg.batch_size], model, tok, image_token_id, acc.device)
                with amp:
                    loss, n = answer_loss(model(**inputs).logits, labels)
                loss_sum, tokens = loss_sum + float(loss) * n, tokens + n
            gen = mine[: max(0, -(-cfg.val_generate // acc.num_processes))]
            model.config.use_cache = True
            for i in range(0, len(gen), cfg.batch_size):
                chunk = gen[i : i + cfg.batch_size]
                with amp:
                    texts = generate_texts(model, tok, pix, [e.image for e in chunk],
                                           [reflection_messages(cfg.message_style, e.prompt) for e in chunk],
                                           cfg.max_new_tokens)
                parsed += sum(bool(parse_commands(t)) for t in texts)
                generated += len(texts)
            model.config.use_cache = False
        loss_sum, tokens, parsed, generated = reduce_sums(acc, [loss_sum, tokens, parsed, generated])
        out = {"val_loss": loss_sum / max(tokens, 1)}
        if generated:
            out["val_parse_share"] = parsed / generated
        return out

    def export(model) -> None:
        dest = run.out / "reflector"
        if hasattr(model, "merge_and_unload"):
            model.save_pretrained(run.out / "reflector-lora")
        plain = merged(model)
        plain.config.use_cache = True
        plain.save_pretrained(dest)
        Q.copy_processing_files(cfg.base, dest)
        (dest / "preprocessor_config.json").write_text(json.dumps(pix.to_preprocessor_config(), indent=1) + "\n")
        meta = {"format": "reflectionflow.reflector/1", "message_style": cfg.message_style,
                "max_new_tokens": cfg.max_new_tokens, "include_analysis": cfg.include_analysis,
                "base": str(Path(cfg.base).resolve()), "step": run.step}
        (dest / REFLECTOR_CONFIG).write_text(json.dumps(meta, indent=1) + "\n")

    res, skipped = train_vlm_judge(cfg, run, source, "reflector", batch_loss, validate if val_examples else None,
                                   export)
    skipped = dict(skipped) | {f"val_{k}": v for k, v in val_skipped.items()}
    return ReflectorTrainResult(step=res.step, minutes=res.minutes, last_loss=res.last_loss,
                                val_loss=res.val.get("val_loss"), val_parse_share=res.val.get("val_parse_share"),
                                skipped=skipped, out=run.out / "reflector")
