"""Finding, checking and loading FLUX folders. Every check here reads JSON files only (or builds the
transformer on the meta device), so a bad path fails in milliseconds, before any weights load.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
PIPELINE_CLASSES = {"flux": ("FluxPipeline",), "kontext": ("FluxKontextPipeline",)}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class FluxPathError(ValueError):
    """A --flux-path / --kontext-path that is not a FLUX pipeline folder."""


@dataclass
class FluxFolder:
    """A checked FLUX pipeline folder."""

    path: Path
    pipeline_class: str  # FluxPipeline | FluxKontextPipeline
    transformer_config: dict
    vae_config: dict

    @property
    def guidance_distilled(self) -> bool:
        """FLUX.1-dev and Kontext embed the guidance scale; FLUX.1-schnell does not (and wants ~4 steps)."""
        return bool(self.transformer_config.get("guidance_embeds", False))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)

    @property
    def variant(self) -> str:
        if self.pipeline_class == "FluxKontextPipeline":
            return "kontext"
        return "dev" if self.guidance_distilled else "schnell"


def _read_json(path: Path, flag: str, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FluxPathError(f"{flag} {path.parent}: no {path.name} ({what})") from None
    except ValueError as e:
        raise FluxPathError(f"{flag} {path}: not valid JSON ({e})") from None


def _locate(path_or_id: str, flag: str) -> Path:
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise FluxPathError(f"{flag} {p}: is a file; expected a diffusers FLUX folder (with model_index.json)")
        return p
    if not _HUB_ID.match(path_or_id):
        raise FluxPathError(f"{flag} {path_or_id}: no such folder (and not a hub id like black-forest-labs/FLUX.1-dev)")
    # A hub id: only the small JSON files are fetched (or found in the local cache) here; the weights
    # download when the pipeline loads, after every other check has passed.
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_id, allow_patterns=["*.json", "*.txt", "*.model"]))
    except Exception as e:  # offline, gated, missing: the hub raises many kinds
        raise FluxPathError(f"{flag} {path_or_id}: not a local folder and the hub gave no copy "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def check_flux_folder(path_or_id: str, kind: str = "flux", flag: str = "--flux-path") -> FluxFolder:
    """The folder must be a diffusers pipeline of the right class with every part FLUX needs."""
    root = _locate(str(path_or_id), flag)
    index = _read_json(root / "model_index.json", flag, "not a diffusers pipeline folder")
    cls = index.get("_class_name")
    accepted = PIPELINE_CLASSES[kind]
    if cls not in accepted:
        raise FluxPathError(f"{flag} {root}: model_index.json names {cls!r}; expected {' or '.join(accepted)}")
    missing = [part for part in PIPELINE_PARTS if not (root / part).is_dir()]
    if missing:
        raise FluxPathError(f"{flag} {root}: missing part(s) {', '.join(missing)} of a FLUX pipeline")
    tcfg = _read_json(root / "transformer" / "config.json", flag, "the transformer's config")
    if tcfg.get("_class_name") != "FluxTransformer2DModel":
        raise FluxPathError(f"{flag} {root}: transformer is {tcfg.get('_class_name')!r}, not FluxTransformer2DModel")
    vcfg = _read_json(root / "vae" / "config.json", flag, "the VAE's config")
    return FluxFolder(path=root, pipeline_class=cls, transformer_config=tcfg, vae_config=vcfg)


def meta_transformer(folder: FluxFolder):
    """The FLUX transformer built from its config on the meta device: names and shapes, no memory."""
    import torch
    from diffusers import FluxTransformer2DModel

    cfg = {k: v for k, v in folder.transformer_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(cfg)


def resolve_device(device: str = "auto") -> str:
    """The device name to load on ("auto": cuda when there is one); one-line ValueError otherwise."""
    from ...runtime import resolve_device as resolve

    return str(resolve(device))


def resolve_dtype(dtype: str, device: str):
    """auto: bfloat16 on a GPU (what FLUX ships in), float32 on the CPU (bf16 matmuls are slow there)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


def load_pipeline(folder: FluxFolder, device: str, dtype, offload: bool = False, **shared):
    """The diffusers pipeline of the folder's class; `shared` passes already-loaded parts (e.g. the
    text encoders and VAE of FLUX.1-dev, which Kontext reuses unchanged)."""
    import diffusers

    cls = getattr(diffusers, folder.pipeline_class)
    pipe = cls.from_pretrained(str(folder.path), dtype=dtype, **shared)
    pipe.set_progress_bar_config(disable=True)
    if offload and device.startswith("cuda"):
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    return pipe
