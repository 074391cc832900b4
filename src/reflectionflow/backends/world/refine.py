"""The rule prompt refiner and the refined-prompt language the world generator reads.

A refined prompt keeps the original prompt verbatim (the paper's refinement instruction: never
change the original description) and adds explicit sentences, in a fixed order, each stating
one aspect the generator tends to get wrong:

    a photo of a red circle and a green square, exactly one red circle and exactly one green
    square, no other objects, the circle is red and the square is green, the shapes are a circle
    and a square

aspect    sentence                                  written when the reflection says
count     exactly one red circle and exactly ...    add / remove
extra     no other objects                          remove
color     the circle is red and the square is ...   change
class     the shapes are a circle and a square      replace
relation  the cross is left of the ring             move

Without a reflection (the prompt axis alone) every aspect that applies to the prompt is stated.
Every word is in `world.commands.VOCABULARY`, so the world's text encoder reads it too.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...components import PromptRefiner, RefinedPrompt, RefineRequest
from ...world.commands import parse_reflection
from ...world.spec import NUMBERS, PLURALS, PromptError, article, parse_prompt

ASPECTS = ("count", "extra", "color", "class", "relation")
_FROM_COMMAND = {"add": ("count",), "remove": ("count", "extra"), "change": ("color",), "replace": ("class",),
                 "move": ("relation",), "keep": ()}
SEPARATOR = ", "


def _noun(cls: str, count: int) -> str:
    return cls if count == 1 else PLURALS[cls]


def aspect_sentences(meta: dict) -> dict[str, str]:
    """The sentence for each aspect that applies to this prompt's metadata."""
    include = meta["include"]
    out = {
        "count": " and ".join(
            f"exactly {NUMBERS[c['count']] if c['count'] > 1 else 'one'} "
            f"{(c['color'] + ' ') if c.get('color') else ''}{_noun(c['class'], c['count'])}" for c in include
        ),
        "extra": "no other objects",
    }
    colored = [c for c in include if c.get("color")]
    if colored:
        out["color"] = " and ".join(f"the {c['class']} is {c['color']}" for c in colored)
    if len(include) == 1 and include[0]["count"] > 1:
        out["class"] = f"each shape is {article(include[0]['class'])} {include[0]['class']}"
    elif len(include) == 1:
        out["class"] = f"the shape is {article(include[0]['class'])} {include[0]['class']}"
    else:
        out["class"] = "the shapes are " + " and ".join(f"{article(c['class'])} {c['class']}" for c in include)
    for c in include:
        if "position" in c:
            rel, idx = c["position"]
            out["relation"] = f"the {c['class']} is {rel} the {include[idx]['class']}"
    return out


def compose(original: str, meta: dict, aspects: set[str]) -> str:
    sentences = aspect_sentences(meta)
    parts = [original.strip()] + [sentences[a] for a in ASPECTS if a in aspects and a in sentences]
    return SEPARATOR.join(parts)


def parse_refined(text: str) -> tuple[dict, set[str]]:
    """(metadata of the original prompt, aspects stated) from a plain or refined world prompt.

    Sentences the language does not have are ignored, as a generator ignores words it does not
    follow; the original prompt (the text before the first comma) must parse.
    """
    head, *rest = text.split(SEPARATOR.strip())
    meta = parse_prompt(head)
    sentences = {s: a for a, s in aspect_sentences(meta).items()}
    aspects = {sentences[s.strip().lower()] for s in rest if s.strip().lower() in sentences}
    return meta, aspects


class RuleRefiner(PromptRefiner):
    """Restates a world prompt more explicitly, stressing what the reflection asks to fix."""

    def refine(self, requests: Sequence[RefineRequest]) -> list[RefinedPrompt]:
        out = []
        for r in requests:
            try:
                meta = parse_prompt(r.original_prompt)
                try:
                    _, have = parse_refined(r.current_prompt)
                except PromptError:
                    have = set()  # a current prompt in another language: restate from the original
            except PromptError as e:
                out.append(RefinedPrompt(text=r.current_prompt, error=f"world-rule refiner: {e}"))
                continue
            if r.reflection:
                commands, _ = parse_reflection(r.reflection)
                want = set(have) | {"count"}
                for c in commands:
                    want.update(_FROM_COMMAND[c.op])
            else:
                want = set(ASPECTS)
            out.append(RefinedPrompt(text=compose(meta["prompt"], meta, want)))
        return out
