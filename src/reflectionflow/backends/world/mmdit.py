"""The world's trained models behind the engine's interfaces: the MMDiT generator and its corrector.

`MMDiTGenerator` samples a trained generator (weights/world-generator, the generator v2.1, by default;
`world-mmdit-v1` names weights/world-generator-v1, the stronger generator v1): one batch per
`batch_size` requests, each request's initial noise drawn from its seed (or taken from
`request.noise`, which zero-order search perturbs), 20 Euler steps with CFG 3 by default.

`MMDiTCorrector` is the same generator plus a LoRA trained by `reflectionflow train
world-corrector` (OminiControl layout, docs/method.md, section 3): the previous image enters as
condition tokens beside the target grid and the text is `prompt + " [Reflexion]: " + reflection`.
With `cond_attention="causal_kv"` (weights/world-corrector-kv) the condition tokens' keys and
values are computed once per image and reused at every step (`MMDiT.encode_condition`).
With `strength` < 1 a correction starts from the previous image noised to the Euler grid's time at
step (1 - strength) x steps and runs only the remaining steps: fewer model calls per correction, a
different algorithm (docs/speed.md). The default is the start the corrector was trained for: 1 (pure
noise) for most, 0.5 for weights/world-corrector-partial and -kv-partial.

On disk a corrector is a folder with `lora.safetensors` (fp16 adapter weights only, its config
in the metadata) and `corrector.json` (LoRA settings, condition attention, the base generator's
sha256, the training config). A LoRA only makes sense on the generator it was trained on, so the
hash is checked when it loads.

Importing this module registers the components and costs no torch import (the world backend's
commands start in well under a second); torch and the model load when a component is built.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...components import (
    ComponentError,
    CorrectionRequest,
    Corrector,
    GenerationRequest,
    GenerationResult,
    Generator,
    register,
)
from ...runtime import is_int, is_number
from ...shipped import WEIGHTS_DIR  # the package's weights/, found through importlib.resources

if TYPE_CHECKING:
    import torch

    from ...models.lora import LoRAConfig
    from ...models.mmdit import MMDiT, MMDiTConfig
    from ...models.text import Tokenizer

DEFAULT_GENERATOR = WEIGHTS_DIR / "world-generator"  # v2.1: alt-text templates + exact explicit captions
GENERATOR_V1 = WEIGHTS_DIR / "world-generator-v1"  # v1: template prompts only (small); the correctors' base
SHIPPED_GENERATORS = (DEFAULT_GENERATOR, GENERATOR_V1)
DEFAULT_CORRECTOR = WEIGHTS_DIR / "world-corrector"
DEFAULT_CORRECTOR_KV = WEIGHTS_DIR / "world-corrector-kv"
# Trained to start from the previous image half noised (train --partial-share 1 --partial-strengths 0.5):
# they run at that strength, half the steps, unless the option `strength` says otherwise.
DEFAULT_CORRECTOR_PARTIAL = WEIGHTS_DIR / "world-corrector-partial"
DEFAULT_CORRECTOR_KV_PARTIAL = WEIGHTS_DIR / "world-corrector-kv-partial"
CORRECTOR_FORMAT = "reflectionflow-world-corrector/1"
REFLEXION = " [Reflexion]: "  # the original's separator between the prompt and the reflection
TRAIN_GENERATOR_HINT = "the shipped ones are in weights/world-generator and weights/world-generator-v1; train " \
                       "others with " \
                       "`reflectionflow train world-generator --out RUN` (weights in RUN/ema)"
TRAIN_CORRECTOR_HINT = "train them with `reflectionflow train world-corrector --out RUN` (weights in " \
                       "RUN/corrector); weights/MODEL_CARD.md has the exact commands of the shipped ones"


# ----------------------------------------------------------------------------------------------
# Shared pieces (the trainer uses them too, so training and inference read the same text and noise)


def seed_noise(seed: int, config: MMDiTConfig) -> torch.Tensor:
    """(C, H, W) float32 initial noise for a seed, drawn on the CPU so that a seed gives the same
    image on any device (the same draw as train.world.generate_images)."""
    import torch

    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(config.channels, config.image_size, config.image_size, generator=g)


def corrector_text(prompt: str, reflection: str, tokenizer: Tokenizer | None = None) -> str:
    """`prompt [Reflexion]: reflection`, shortened to what the text encoder reads.

    The world's encoder reads `max_text_len` words (32 for the shipped model) and would cut the
    reflection's last commands mid-sentence. So, when the text is too long: first the refined
    prompt's extra sentences go (after the first comma: they restate the original prompt, which
    stays), then the reflection's last bullets (the reflector writes the most critical first).
    """
    text = f"{prompt.strip()}{REFLEXION}{reflection.strip()}"
    if tokenizer is None or len(tokenizer.split(text)) <= tokenizer.max_len:
        return text
    prompt = prompt.split(",")[0].strip()
    lines = [ln for ln in reflection.strip().splitlines() if ln.strip()]
    while True:
        text = f"{prompt}{REFLEXION}" + "\n".join(lines)
        if len(lines) <= 1 or len(tokenizer.split(text)) <= tokenizer.max_len:
            return text
        lines.pop()


def file_sha256(path: str | Path) -> str:
    """The file's sha256, computed once per (path, size, mtime): a corrector's load checks its base."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_generator(folder: str | Path, cond_attention: str | None = None,
                   device: str | torch.device = "cpu") -> MMDiT:
    """The generator's MMDiT (fp32, eval mode), optionally with another condition attention
    (it changes how condition tokens attend, not any weight)."""
    from ...models.mmdit import MMDiT

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no generator weights; {TRAIN_GENERATOR_HINT}")
    model = MMDiT.from_pretrained(folder, device=device)
    if cond_attention is not None and cond_attention != model.config.cond_attention:
        model.config = replace(model.config, cond_attention=cond_attention).validate()
    return model


def save_corrector(folder: str | Path, model: MMDiT, lora: LoRAConfig, generator: str | Path,
                   info: dict | None = None) -> None:
    """Write `lora.safetensors` (fp16 adapters) and `corrector.json`, each atomically."""
    import torch
    from safetensors.torch import save_file

    from ...models.lora import lora_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "format": CORRECTOR_FORMAT,
        "lora": {**asdict(lora), "targets": list(lora.targets)},
        "cond_attention": model.config.cond_attention,
        "generator": {"path": str(generator), "sha256": file_sha256(Path(generator) / "model.safetensors")},
        "text": "{prompt}" + REFLEXION + "{reflection}",
        **(info or {}),
    }
    text = json.dumps(config, indent=1)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in lora_state_dict(model).items()}
    save_file(state, str(folder / "lora.safetensors.tmp"), metadata={"config": text, "format": CORRECTOR_FORMAT})
    (folder / "lora.safetensors.tmp").replace(folder / "lora.safetensors")
    (folder / "corrector.json.tmp").write_text(text + "\n")
    (folder / "corrector.json.tmp").replace(folder / "corrector.json")


def read_corrector_config(folder: str | Path) -> dict:
    folder = Path(folder)
    for name in ("lora.safetensors", "corrector.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: no corrector weights (a corrector folder holds "
                                    f"lora.safetensors and corrector.json); {TRAIN_CORRECTOR_HINT}")
    config = json.loads((folder / "corrector.json").read_text())
    if config.get("format") != CORRECTOR_FORMAT:
        raise ValueError(f"{folder / 'corrector.json'}: format {config.get('format')!r}, expected {CORRECTOR_FORMAT!r}")
    return config


def trained_on(config: dict) -> Path:
    """The generator a corrector was trained on: the folder its corrector.json names, or a shipped
    generator, whichever has its sha256; else the default generator (whose hash check then names
    the mismatch)."""
    want = config.get("generator", {}).get("sha256")
    recorded = config.get("generator", {}).get("path")
    for folder in ([Path(recorded)] if recorded else []) + list(SHIPPED_GENERATORS):
        path = folder / "model.safetensors"
        if want and path.is_file() and file_sha256(path) == want:
            return folder
    return DEFAULT_GENERATOR


def load_corrector(folder: str | Path, generator: str | Path | None = None,
                   device: str | torch.device = "cpu") -> tuple[MMDiT, dict]:
    """(generator + trained LoRA, corrector.json) from a corrector folder; `generator` defaults to
    the shipped generator the LoRA was trained on, and must be that generator (same sha256)."""
    from safetensors.torch import load_file

    from ...models.lora import LoRAConfig, apply_lora, lora_state_dict

    config = read_corrector_config(folder)
    gen = Path(generator) if generator is not None else trained_on(config)
    model = load_generator(gen, config["cond_attention"])
    want = config["generator"]["sha256"]
    have = file_sha256(gen / "model.safetensors")
    if have != want:
        raise ValueError(f"{folder}: this LoRA was trained on the generator {config['generator']['path']} "
                         f"(sha256 {want[:12]}...), but {gen} has sha256 {have[:12]}...; pass the generator it "
                         "was trained on")
    apply_lora(model, LoRAConfig(**{**config["lora"], "targets": tuple(config["lora"]["targets"])}))
    state = load_file(str(Path(folder) / "lora.safetensors"))
    expected = set(lora_state_dict(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{folder}/lora.safetensors does not fit its corrector.json: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return model.to(device).eval(), config


# ----------------------------------------------------------------------------------------------
# Options


@dataclass
class SamplerOptions:
    steps: int = 20  # Euler steps
    guidance: float = 3.0  # CFG scale (1 = no guidance, half the NFE)
    shift: float = 1.0  # SD3 time shift of the Euler grid
    batch_size: int = 256  # requests per model call
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = True  # bf16 autocast on CUDA (CPU runs fp32)
    # > 0: step caching (models/step_cache.py): an image's step skips every block but the first when
    # the first block's residual changed by at most this share since its last computed step. 0: off.
    cache_threshold: float = 0.0

    def check(self, who: str) -> None:
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if not is_int(v, 1):
                raise ComponentError(f"{who}: option {name} must be an integer >= 1, got {v!r}")
        if not is_number(self.cache_threshold, 0.0):
            from ...models.step_cache import THRESHOLD_HELP

            raise ComponentError(f"{who}: option cache_threshold must be {THRESHOLD_HELP}, got "
                                 f"{self.cache_threshold!r}")
        for name in ("guidance", "shift"):
            v = getattr(self, name)
            if not is_number(v, above=0):
                raise ComponentError(f"{who}: option {name} must be a number > 0, got {v!r}")
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            raise ComponentError(f"{who}: option device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda") and not _cuda_available():
            raise ComponentError(f"{who}: device {self.device!r} asked for, but CUDA is not available")


@dataclass
class MMDiTGeneratorOptions(SamplerOptions):
    weights: str = str(DEFAULT_GENERATOR)  # a folder with model.safetensors (+ config.json)


@dataclass
class MMDiTCorrectorOptions(SamplerOptions):
    weights: str = str(DEFAULT_CORRECTOR)  # a corrector folder (lora.safetensors + corrector.json)
    generator: str | None = None  # the base generator folder; None: the shipped one it was trained on
    batch_size: int = 128
    cache_cond: bool = True  # causal_kv: condition keys/values once per image, not once per step
    # < 1: start from the previous image partly noised, run that share of the steps. None: the
    # strength the corrector was trained for (trained_strength), 1 for one trained from pure noise.
    strength: float | None = None

    def check(self, who: str) -> None:
        super().check(who)
        v = self.strength
        if v is not None and not is_number(v, maximum=1.0, above=0.0):
            raise ComponentError(f"{who}: option strength must be a number in (0, 1], got {v!r}")


def trained_strength(config: dict) -> float:
    """The start a corrector was trained for (its corrector.json): the one partial strength when every
    sample started from the noised previous image (`--partial-share 1`), else 1 (pure noise)."""
    train = config.get("train_config") or {}
    strengths = train.get("partial_strengths") or []
    return float(strengths[0]) if train.get("partial_share") == 1 and len(strengths) == 1 else 1.0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _options(cls, options: dict, who: str):
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ComponentError(f"{who}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(known)}")
    opt = cls(**options)
    opt.check(who)
    return opt


class _Sampler:
    """A loaded MMDiT with its flow wrapper; batches requests into model calls."""

    def __init__(self, model: MMDiT, opt: SamplerOptions):
        import torch

        from ...models.flow import RectifiedFlow
        from ...runtime import resolve_device

        self.opt = opt
        self.device = resolve_device(opt.device)
        self.model = model.to(self.device).eval()
        self.flow = RectifiedFlow(model, model.tokenizer([""])[0].to(self.device), text_dropout=0.0)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=opt.bf16 and self.device.type == "cuda")

    def noise(self, seed: int, given: np.ndarray | None, who: str) -> torch.Tensor:
        import torch

        c = self.model.config
        if given is None:
            return seed_noise(seed, c)
        shape = (c.channels, c.image_size, c.image_size)
        arr = np.asarray(given, dtype=np.float32)
        if arr.shape != shape:
            raise ValueError(f"{who}: noise must have shape {shape}, got {arr.shape}")
        return torch.from_numpy(arr.copy())

    def sample(self, noise: torch.Tensor, texts: list[str], cond: torch.Tensor | None = None,
               cache_cond: bool = True, strength: float = 1.0) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """(B, H, W, 3) uint8 images and per image (full passes, passes served from the step cache).
        `strength` < 1 starts from `cond` (the previous image, model space) noised to the grid's time
        at step (1 - strength) x steps."""
        import torch

        from ...runtime import to_uint8

        text = self.model.tokenizer(texts).to(self.device)
        # One layout whatever the caller passed (plain NCHW): the sampler's own elementwise steps
        # (CFG, Euler, the partial start) then see the same strides in every batch.
        noise = noise.to(self.device).contiguous()
        cond = None if cond is None else cond.to(self.device).contiguous()
        with torch.no_grad(), self.autocast:
            res = self.flow.sample(noise, text, cond=cond, steps=self.opt.steps,
                                   cfg=float(self.opt.guidance), shift=float(self.opt.shift), cache_cond=cache_cond,
                                   strength=strength, cache_threshold=float(self.opt.cache_threshold))
        cached = res.cached or [0] * noise.shape[0]
        return to_uint8(res.images).numpy(), [(res.nfe - c, c) for c in cached]


def _chunks(items: Sequence, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


# ----------------------------------------------------------------------------------------------
# The components


class MMDiTGenerator(Generator):
    """A trained world generator (weights/world-generator, the generator v2.1, by default)."""

    who = "generator world-mmdit"

    def __init__(self, **options):
        self.opt: MMDiTGeneratorOptions = _options(MMDiTGeneratorOptions, options, self.who)
        self.sampler = _Sampler(load_generator(self.opt.weights), self.opt)
        self.model = self.sampler.model

    def noise_like(self, seed: int) -> np.ndarray:
        return seed_noise(seed, self.model.config).numpy()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        import torch

        out: list[GenerationResult] = []
        for chunk in _chunks(list(requests), self.opt.batch_size):
            noise = torch.stack([self.sampler.noise(r.seed, r.noise, self.who) for r in chunk])  # (B, C, H, W)
            images, passes = self.sampler.sample(noise, [r.prompt for r in chunk])
            out += [GenerationResult(image=img, nfe=nfe, noise=z.numpy(), cached=cached)
                    for img, z, (nfe, cached) in zip(images, noise, passes)]
        return out


class MMDiTCorrector(Corrector):
    """The world generator + a reflection-tuned LoRA: edits an image as the reflection says."""

    who = "corrector world-mmdit"

    def __init__(self, **options):
        self.opt: MMDiTCorrectorOptions = _options(MMDiTCorrectorOptions, options, self.who)
        model, self.config = load_corrector(self.opt.weights, self.opt.generator)
        if self.opt.strength is None:
            self.opt.strength = trained_strength(self.config)
        self.sampler = _Sampler(model, self.opt)
        self.model = self.sampler.model

    @property
    def cond_attention(self) -> str:
        return self.model.config.cond_attention

    def noise_like(self, seed: int) -> np.ndarray:
        return seed_noise(seed, self.model.config).numpy()

    def _condition(self, image, i: int) -> torch.Tensor:
        import torch

        s = self.model.config.image_size
        arr = np.asarray(image)
        if arr.shape != (s, s, 3) or arr.dtype != np.uint8:
            raise ValueError(f"{self.who}: request {i}: the image must be ({s}, {s}, 3) uint8, "
                             f"got {arr.dtype} {arr.shape}")
        return torch.from_numpy(np.array(arr, copy=True))  # a writable copy: torch refuses read-only arrays

    def correct(self, requests: Sequence[CorrectionRequest]) -> list[GenerationResult]:
        import torch

        from ...runtime import to_model_space

        out: list[GenerationResult] = []
        tok = self.model.tokenizer
        requests = list(requests)
        for start in range(0, len(requests), self.opt.batch_size):
            chunk = requests[start : start + self.opt.batch_size]
            cond = to_model_space(torch.stack([self._condition(r.image, start + i) for i, r in enumerate(chunk)]))
            noise = torch.stack([seed_noise(r.seed, self.model.config) for r in chunk])  # (B, C, H, W)
            texts = [corrector_text(r.prompt, r.reflection or "", tok) for r in chunk]
            images, passes = self.sampler.sample(noise, texts, cond, cache_cond=self.opt.cache_cond,
                                                 strength=float(self.opt.strength))
            out += [GenerationResult(image=img, nfe=nfe, noise=z.numpy(), cached=cached)
                    for img, z, (nfe, cached) in zip(images, noise, passes)]
        return out


def _shipped(cls, weights: Path):
    """The registry factory of a generator or corrector shipped in weights/ (options may still name others)."""
    def factory(**options):
        return cls(**{"weights": str(weights), **options})
    return factory


register("generator", "world-mmdit", "the world generator v2.1: alt-text template prompts + exact explicit captions, "
         "a FLUX-like profile (weights/world-generator)")(MMDiTGenerator)


register("generator", "world-mmdit-v1", "the stronger world generator v1: template prompts only, 0.90 on "
         "GenEval-Shapes (weights/world-generator-v1)")(_shipped(MMDiTGenerator, GENERATOR_V1))
register("corrector", "world-mmdit",
         "the world generator + reflection LoRA, OminiControl layout (weights/world-corrector)")(MMDiTCorrector)
register("corrector", "world-mmdit-kv",
         "the corrector whose condition tokens attend only to themselves, K/V cached "
         "(weights/world-corrector-kv)")(_shipped(MMDiTCorrector, DEFAULT_CORRECTOR_KV))
register("corrector", "world-mmdit-partial",
         "the corrector trained to start from the previous image half noised: half the steps "
         "(weights/world-corrector-partial, strength 0.5)")(_shipped(MMDiTCorrector, DEFAULT_CORRECTOR_PARTIAL))
register("corrector", "world-mmdit-kv-partial",
         "cached condition K/V and a start from the previous image half noised: the fastest "
         "(weights/world-corrector-kv-partial, strength 0.5)")(_shipped(MMDiTCorrector, DEFAULT_CORRECTOR_KV_PARTIAL))
