"""The rule prompt refiner: a world prompt rewritten as the explicit description the generator follows.

A refined prompt keeps the original prompt verbatim (the paper's refinement instruction: never
change the original description) and adds the explicit caption language the world generator is
trained on (`world.captions`): every object with its colour where the prompt gives one, a
concrete layout, and extra sentences for what tends to go wrong:

    a photo of a cross left of a ring, a cross on the left and a ring on the right, the cross is
    left of the ring, exactly two objects, no other objects

    a photo of a red circle and a green square, a red circle at the top and a green square at the
    bottom, exactly two objects

The layout is drawn from a seed made of the request (original and current prompt, reflection,
and the previous image's bytes when there is one), so chains that refine the same prompt from
different images try different layouts, and a rerun gives the same text. A reflection steers what
is stressed, as the paper's GPT-4o refiner reads the reflection of the previous image:

aspect    sentence                       written when the reflection says
count     exactly N objects              add / remove (always without a reflection)
extra     no other objects               remove (always without a reflection)
relation  the cross is left of the ring  always for position prompts (a move draws a new layout)

"- Keep the image unchanged." leaves the current prompt as it is. Every word is in
`world.commands.VOCABULARY`, so the world's text encoders read it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import numpy as np

from ...components import PromptRefiner, RefinedPrompt, RefineRequest
from ...world.captions import NO_OTHERS, explicit_caption
from ...world.commands import parse_reflection
from ...world.spec import PromptError, parse_prompt

ASPECTS = ("count", "extra", "color", "class", "relation")
_FROM_COMMAND = {"add": ("count",), "remove": ("count", "extra"), "change": ("color",), "replace": ("class",),
                 "move": ("relation",), "keep": ()}
_STRESS = {"count", "extra"}  # the aspects that add a sentence of their own (the others are always stated)
SEPARATOR = ", "


def parse_refined(text: str) -> tuple[dict, set[str]]:
    """(metadata of the original prompt, aspects stated) from a plain or refined world prompt.

    The original prompt is the text before the first comma and must parse. Aspects: "count" and
    "class" when the objects are listed (or "exactly N objects" is said), "color" when the prompt or
    the list gives colours, "relation" for a relation sentence, "extra" for "no other objects".
    Sentences the language does not have are ignored, as a generator ignores words it does not follow.
    """
    head, *rest = text.split(SEPARATOR.strip())
    meta = parse_prompt(head)
    aspects: set[str] = set()
    for part in (s.strip().lower() for s in rest):
        if not part:
            continue
        if part == NO_OTHERS:
            aspects.add("extra")
        elif part.startswith("exactly ") and part.endswith(" objects"):
            aspects.add("count")
        elif " is " in part and part.startswith("the "):
            aspects.add("relation")
        elif part.startswith(("a ", "an ")):
            aspects.update(("count", "class"))
            if any(c.get("color") for c in meta["include"]):
                aspects.add("color")
    return meta, aspects


def _seed(r: RefineRequest) -> int:
    h = hashlib.blake2b(digest_size=8)
    for part in (r.original_prompt, r.current_prompt, r.reflection or ""):
        h.update(part.encode())
        h.update(b"\0")
    if r.image is not None:
        h.update(np.ascontiguousarray(np.asarray(r.image)).tobytes())
    return int.from_bytes(h.digest(), "big")


class RuleRefiner(PromptRefiner):
    """Rewrites a world prompt into an explicit description, stressing what the reflection asks to fix."""

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
                if commands and all(c.op == "keep" for c in commands):
                    out.append(RefinedPrompt(text=r.current_prompt))
                    continue
                want = set(have)
                for c in commands:
                    want.update(_FROM_COMMAND[c.op])
            else:
                want = set(ASPECTS)
            text = explicit_caption(meta, random.Random(_seed(r)), stress=sorted(want & _STRESS))
            out.append(RefinedPrompt(text=text))
        return out
