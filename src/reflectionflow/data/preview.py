"""Look inside GenRef shards: counts per subset, what could not be read and why, a preview grid."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .genref import SUBSETS, GenRefSample, ReadStats, iter_genref
from .shards import resolve_shards


@dataclass
class InspectReport:
    shards: list[str]
    stats: ReadStats
    examples: dict[str, list[GenRefSample]] = field(default_factory=dict)  # first few per subset

    def to_dict(self) -> dict:
        s = self.stats
        return {
            "shards": len(self.shards),
            "read": s.read,
            "samples": s.samples,
            "subsets": dict(s.served),
            "corrupt": {
                "count": s.corrupt_samples + s.corrupt_shards,
                "samples": s.corrupt_samples,
                "shards": s.corrupt_shards,
                "reasons": dict(sorted(s.corrupt.items())),
                "items": [dict(item) for item in s.corrupt_items],
                "items_left_out": max(0, s.corrupt_samples + s.corrupt_shards - len(s.corrupt_items)),
            },
        }


def inspect_shards(shards: str | Sequence[str], examples_per_subset: int = 0, progress: bool = False) -> InspectReport:
    """Read every sample once (images decoded, so a bad JPEG is found) and count."""
    from tqdm import tqdm

    names = resolve_shards(shards)
    report = InspectReport(names, ReadStats(max_items=1000), {s: [] for s in SUBSETS})
    samples = iter_genref(names, image="pil", stats=report.stats)
    for sample in tqdm(samples, desc="genref inspect", unit="sample", disable=None if progress else True):
        kept = report.examples[sample.subset]
        if len(kept) < examples_per_subset:
            kept.append(sample)
    return report


def format_report(report: InspectReport) -> str:
    d = report.to_dict()
    damaged = f" ({d['corrupt']['shards']} damaged)" if d["corrupt"]["shards"] else ""
    lines = [f"shards   {d['shards']}{damaged}", f"samples  {d['samples']} readable of {d['read']} read"]
    lines += [f"  {name:<9} {n}" for name, n in d["subsets"].items()]
    lines.append(f"corrupt  {d['corrupt']['count']}")
    for reason, n in d["corrupt"]["reasons"].items():
        first = next((i for i in d["corrupt"]["items"] if i["reason"] == reason), None)
        where = f"  e.g. {os.path.basename(first['shard'])} {first['key']} {first['detail']}".rstrip() if first else ""
        lines.append(f"  {reason:<18} {n}{where}")
    return "\n".join(lines)


def _wrap(text: str, font, width: float) -> list[str]:
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def preview_grid(examples: Mapping[str, Sequence[GenRefSample]], thumb: int = 160, text_width: int = 380):
    """One row per sample: bad image | good image | subset, key, prompt and reflection."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        font = ImageFont.load_default()
    rows = [s for subset in SUBSETS for s in examples.get(subset, [])]
    pad, header, line_h = 8, 22, 16
    width = 3 * pad + 2 * thumb + text_width + pad
    height = header + max(1, len(rows)) * (thumb + pad) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    x_bad, x_good, x_text = pad, 2 * pad + thumb, 3 * pad + 2 * thumb
    for x, title in ((x_bad, "bad (condition)"), (x_good, "good (target)"), (x_text, "subset / prompt / reflection")):
        draw.text((x, 3), title, fill=(0, 0, 0), font=font)
    if not rows:
        draw.text((x_bad, header + pad), "no readable sample to preview", fill=(160, 0, 0), font=font)
    max_lines = thumb // line_h
    for r, sample in enumerate(rows):
        y = header + r * (thumb + pad)
        for x, image in ((x_bad, sample.bad), (x_good, sample.good)):
            image = image if isinstance(image, Image.Image) else Image.fromarray(image)
            # Scaled up or down to the cell, aspect kept; nearest keeps small images' pixels honest.
            small = ImageOps.contain(image, (thumb, thumb), Image.NEAREST if image.width < thumb else Image.BICUBIC)
            grid.paste(small, (x + (thumb - small.width) // 2, y + (thumb - small.height) // 2))
        text = f"[{sample.subset}] {sample.key}\nprompt: {sample.prompt}\nreflection: {sample.reflection}"
        lines = _wrap(text, font, text_width - 2 * pad)
        if len(lines) > max_lines:
            lines = lines[: max_lines - 1] + [lines[max_lines - 1].rstrip() + " ..."]
        for i, line in enumerate(lines):
            draw.text((x_text, y + i * line_h), line, fill=(0, 0, 0) if i else (0, 70, 160), font=font)
    return grid


def save_preview(path: str | os.PathLike, examples: Mapping[str, Sequence[GenRefSample]]) -> int:
    """Write the preview grid as PNG; returns the number of pairs shown."""
    import io

    from ..io import atomic_write_bytes

    grid = preview_grid(examples)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return sum(len(v) for v in examples.values())
