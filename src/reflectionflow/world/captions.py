"""Explicit captions: what a scene shows, in the words the world generator is trained on.

A GenEval prompt leaves most of a scene open ("a photo of a cross left of a ring" names neither
colours nor where the two shapes sit). The world generator is trained on the template prompts
and, beside them, on *explicit descriptions* derived from the rendered scene itself: every object
with its colour, where it sits (left / right / top / bottom / centre, "on the left side"), its size,
the relative placement of pairs, the exact count. The rule refiner
(`backends.world.refine.RuleRefiner`) writes the same language from a prompt alone, choosing a
concrete layout, so a refined prompt is text the generator has seen, not foreign words.

Grammar (docs/captions.md has examples). A caption is one of

    template                    the GenEval prompt, verbatim
    explicit                    "a photo of " MENTIONS [EXTRAS]
    combined                    TEMPLATE ", " MENTIONS [EXTRAS]

    MENTIONS := MENTION | MENTION " and " MENTION | MENTION ", " ... " and " MENTION
    MENTION  := ARTICLE [SIZE] [COLOR] CLASS [WHERE]          "a small red circle on the left"
    SIZE     := "small" (side <= 13 px) | "large" (side >= 17 px)
    WHERE    := the object's cell of a 3 x 3 grid over the image, in one of two phrasings:
                "at the top left" | "in the top left corner", "on the left" | "on the left side",
                "in the centre" | "in the middle", "at the bottom" ...
    EXTRAS   := (", " EXTRA)*, in this order:
                "the red circle is left of the square"     (GenEval's rule on the boxes; left of,
                                                            right of, above, below)
                "exactly three objects"                    (two or more objects)
                "no other objects"

Every part but the classes is optional and dropped at random in training, so the generator
learns to follow any subset; what is stated is always true of the image. Mentions come in a
random order in training and in the prompt's order from the refiner.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from .render import Obj, relations
from .spec import COUNTS, IMAGE_SIZE, NUMBERS, article

ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
# Two phrasings of each cell of the 3 x 3 grid: (row, column) -> (style 0, style 1).
WHERE: dict[tuple[str, str], tuple[str, str]] = {
    ("top", "left"): ("at the top left", "in the top left corner"),
    ("top", "centre"): ("at the top", "at the top side"),
    ("top", "right"): ("at the top right", "in the top right corner"),
    ("middle", "left"): ("on the left", "on the left side"),
    ("middle", "centre"): ("in the centre", "in the middle"),
    ("middle", "right"): ("on the right", "on the right side"),
    ("bottom", "left"): ("at the bottom left", "in the bottom left corner"),
    ("bottom", "centre"): ("at the bottom", "at the bottom side"),
    ("bottom", "right"): ("at the bottom right", "in the bottom right corner"),
}
SMALL_MAX, LARGE_MIN = 13, 17
MAX_WORDS = 72  # captions are cut to this many words (the generator's encoder reads 80)

# Words this language adds to the world's prompts (world.commands.VOCABULARY includes them).
CAPTION_WORDS: tuple[str, ...] = ("at", "top", "bottom", "centre", "middle", "side", "corner", "small", "large",
                                  "exactly", "objects", "no", "other", "the", "is", "on", "in", "one")


@dataclass(frozen=True)
class Mention:
    """One object as a caption names it; None leaves that attribute unsaid."""

    cls: str
    color: str | None = None
    size: str | None = None  # "small" | "large"
    where: tuple[str, str] | None = None  # (row, column) cell

    def text(self, style: int = 0) -> str:
        words = [w for w in (self.size, self.color, self.cls) if w]
        phrase = " ".join(words)
        out = f"{article(phrase)} {phrase}"
        return out + (" " + WHERE[self.where][style] if self.where else "")

    def name(self) -> str:
        """'the red circle' / 'the circle', as a relation sentence refers to it."""
        return "the " + (f"{self.color} {self.cls}" if self.color else self.cls)


def cell(o: Obj) -> tuple[str, str]:
    """The (row, column) of the 3 x 3 grid that holds the centre of the object's box."""
    cx, cy = o.x + o.size / 2, o.y + o.size / 2
    third = IMAGE_SIZE / 3
    return ROWS[min(int(cy // third), 2)], COLUMNS[min(int(cx // third), 2)]


def size_word(o: Obj) -> str | None:
    return "small" if o.size <= SMALL_MAX else "large" if o.size >= LARGE_MIN else None


def join(parts: Sequence[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def relation_sentence(a: Mention, rel: str, b: Mention) -> str:
    return f"{a.name()} is {rel} {b.name()}"


def count_sentence(n: int) -> str:
    return f"exactly {NUMBERS[n]} objects"


NO_OTHERS = "no other objects"


def compose(mentions: Sequence[Mention], head: str | None = None, extras: Sequence[str] = (),
            style: int = 0) -> str:
    """A caption: `head` (a template prompt) + ", " + mentions, or "a photo of " + mentions; then extras."""
    body = join([m.text(style) for m in mentions])
    text = f"{head}, {body}" if head else f"a photo of {body}"
    return ", ".join([text, *extras])


def _word_count(text: str) -> int:
    return len(text.replace(",", " ").split())


# ----------------------------------------------------------------------------------------------
# Training captions: from a rendered scene


@dataclass(frozen=True)
class CaptionMix:
    """How often each part of a training caption is written, and how noisy its template part is.

    The explicit part of a caption (mentions and extras) is always true of the image. The template
    part plays the role of a web image's alt text, which is what a FLUX-scale model mostly learns
    from: alt texts name the objects reliably but often get relations, attribute bindings and
    counts wrong, and that is why such models are weak on GenEval's position and attribute-binding
    prompts while detailed (re-)captions fix much of it. The three noise rates reproduce that: a
    scene is drawn, at that chance, from a corrupted version of its prompt (`scene_metadata`)
    while its caption keeps the prompt's words; its explicit mentions then describe the scene as
    drawn. Zero noise gives the clean data of the earlier recipes."""

    template: float = 0.3  # the GenEval prompt alone
    combined: float = 0.35  # the prompt, then the explicit mentions (the rule refiner's form)
    color: float = 0.75  # colours stated (for every object; otherwise for none, or each at 1/2)
    where: float = 0.75  # positions stated (likewise)
    size: float = 0.2  # size words for the objects that have one
    relation: float = 0.35  # one or two relation sentences
    count: float = 0.25  # "exactly N objects"
    no_others: float = 0.25  # "no other objects"
    relation_noise: float = 0.0  # position prompts: the scene ignores the prompt's relation
    binding_noise: float = 0.0  # colour-attribute prompts: the scene swaps the two objects' colours
    count_noise: float = 0.0  # counting prompts: the scene holds one object more or fewer (2 to 4)


def _which(rng: random.Random, p: float, n: int) -> list[bool]:
    """All (p), none, or each at 1/2: a caption states an attribute for every object or for few."""
    r = rng.random()
    if r < p:
        return [True] * n
    if r < p + (1 - p) / 2:
        return [False] * n
    return [rng.random() < 0.5 for _ in range(n)]


def scene_metadata(meta: dict, rng: random.Random, mix: CaptionMix = CaptionMix()) -> dict:
    """The metadata a training scene for `meta` is drawn from: `meta` itself, or at the mix's noise
    rates a corrupted copy (relation dropped, colours swapped, count off by one). The caption is
    still written from `meta` (`scene_caption(meta, scene, ...)`), so its template part is then
    wrong about the image while its explicit part describes the image as drawn. Draws from `rng`
    only for a category whose noise rate is above zero."""
    tag = meta.get("tag")
    include = meta["include"]
    if tag == "position" and mix.relation_noise > 0 and rng.random() < mix.relation_noise:
        return {**meta, "include": [{k: v for k, v in c.items() if k != "position"} for c in include]}
    if tag == "color_attr" and mix.binding_noise > 0 and rng.random() < mix.binding_noise and len(include) == 2:
        a, b = include
        return {**meta, "include": [{**a, "color": b["color"]}, {**b, "color": a["color"]}]}
    if tag == "counting" and mix.count_noise > 0 and rng.random() < mix.count_noise:
        n = include[0]["count"]
        options = [k for k in (n - 1, n + 1) if COUNTS[0] <= k <= COUNTS[-1]]
        k = options[int(rng.random() * len(options))]
        return {**meta, "include": [{**include[0], "count": k}], "exclude": [{"class": include[0]["class"],
                                                                            "count": k + 1}]}
    return meta


def scene_caption(meta: dict, scene: Sequence[Obj], rng: random.Random, mix: CaptionMix = CaptionMix()) -> str:
    """A random caption of a rendered scene of this prompt (template, explicit or combined)."""
    r = rng.random()
    if r < mix.template or not scene:
        return meta["prompt"]
    head = meta["prompt"] if r < mix.template + mix.combined else None
    n = len(scene)
    colors, wheres, sizes = _which(rng, mix.color, n), _which(rng, mix.where, n), rng.random() < mix.size
    mentions = [Mention(o.cls, o.color if colors[i] else None, size_word(o) if sizes else None,
                        cell(o) if wheres[i] else None) for i, o in enumerate(scene)]
    order = list(range(n))
    rng.shuffle(order)
    extras: list[str] = []
    if n >= 2 and rng.random() < mix.relation:
        extras += _relations(scene, mentions, rng, 1 + int(rng.random() < 0.3))
    if n >= 2 and rng.random() < mix.count:
        extras.append(count_sentence(n))
    if rng.random() < mix.no_others:
        extras.append(NO_OTHERS)
    style = int(rng.random() < 0.5)
    text = compose([mentions[i] for i in order], head, extras, style)
    while _word_count(text) > MAX_WORDS and extras:
        extras.pop(0)
        text = compose([mentions[i] for i in order], head, extras, style)
    return text


def _relations(scene: Sequence[Obj], mentions: Sequence[Mention], rng: random.Random, k: int) -> list[str]:
    """Up to k true relation sentences between objects the caption tells apart."""
    out, used = [], set()
    pairs = [(i, j) for i in range(len(scene)) for j in range(len(scene)) if i != j]
    rng.shuffle(pairs)
    for i, j in pairs:
        a, b = mentions[i], mentions[j]
        if frozenset((i, j)) in used:
            continue  # "B is right of A" after "A is left of B" says nothing new
        if a.name() == b.name() or sum(m.name() == a.name() for m in mentions) > 1 \
                or sum(m.name() == b.name() for m in mentions) > 1:
            continue  # "the circle is left of the circle" says nothing
        rels = sorted(relations(scene[i].box, scene[j].box)["rels"])
        if not rels:
            continue
        out.append(relation_sentence(a, rels[int(rng.random() * len(rels))], b))
        used.add(frozenset((i, j)))
        if len(out) == k:
            break
    return out


# ----------------------------------------------------------------------------------------------
# The refiner's side: a concrete layout for a prompt's objects

# Layouts (cells in mention order) by object count; position prompts use RELATION_LAYOUTS.
LAYOUTS: dict[int, tuple[tuple[tuple[str, str], ...], ...]] = {
    1: ((("middle", "centre"),), (("middle", "left"),), (("middle", "right"),), (("top", "centre"),),
        (("bottom", "centre"),)),
    2: ((("middle", "left"), ("middle", "right")), (("middle", "right"), ("middle", "left")),
        (("top", "centre"), ("bottom", "centre")), (("bottom", "centre"), ("top", "centre"))),
    3: ((("middle", "left"), ("middle", "centre"), ("middle", "right")),
        (("top", "left"), ("top", "right"), ("bottom", "centre")),
        (("top", "centre"), ("bottom", "left"), ("bottom", "right"))),
    4: ((("top", "left"), ("top", "right"), ("bottom", "left"), ("bottom", "right")),),
}
# "A <relation> B": cells for (A, B) with the relation holding along one axis.
RELATION_LAYOUTS: dict[str, tuple[tuple[tuple[str, str], tuple[str, str]], ...]] = {
    "left of": ((("middle", "left"), ("middle", "right")), (("top", "left"), ("top", "right")),
                (("bottom", "left"), ("bottom", "right"))),
    "right of": ((("middle", "right"), ("middle", "left")), (("top", "right"), ("top", "left")),
                 (("bottom", "right"), ("bottom", "left"))),
    "above": ((("top", "centre"), ("bottom", "centre")), (("top", "left"), ("bottom", "left")),
              (("top", "right"), ("bottom", "right"))),
    "below": ((("bottom", "centre"), ("top", "centre")), (("bottom", "left"), ("top", "left")),
              (("bottom", "right"), ("top", "right"))),
}


def prompt_mentions(meta: dict) -> tuple[list[Mention], tuple[int, str, int] | None]:
    """The prompt's objects in the order its text names them (colours where it gives them), and
    its relation as (index of A, relation, index of B) for "A <relation> B" prompts."""
    include = meta["include"]
    positioned = [i for i, c in enumerate(include) if "position" in c]
    if positioned:  # GenEval lists the target first; the text names the positioned object first
        i = positioned[0]
        rel, j = include[i]["position"]
        order = [i] + [k for k in range(len(include)) if k != i]
        mentions = [Mention(include[k]["class"], include[k].get("color")) for k in order]
        return mentions, (0, rel, order.index(j))
    mentions = []
    for c in include:
        mentions += [Mention(c["class"], c.get("color"))] * c["count"]
    return mentions, None


def explicit_caption(meta: dict, rng: random.Random, stress: Sequence[str] = (), style: int | None = None) -> str:
    """The combined caption a refiner writes for a prompt: the prompt, its objects with a concrete
    layout drawn by `rng`, and the extras named in `stress` ("relation", "count", "extra")."""
    mentions, rel = prompt_mentions(meta)
    if rel is not None:
        options = RELATION_LAYOUTS[rel[1]]
    else:
        options = LAYOUTS.get(len(mentions), ((None,) * len(mentions),))
    layout = options[int(rng.random() * len(options))]
    mentions = [Mention(m.cls, m.color, None, w) for m, w in zip(mentions, layout)]
    extras = []
    if rel is not None:
        extras.append(relation_sentence(mentions[rel[0]], rel[1], mentions[rel[2]]))
    if "count" in stress and len(mentions) >= 2:
        extras.append(count_sentence(len(mentions)))
    if "extra" in stress:
        extras.append(NO_OTHERS)
    style = int(rng.random() < 0.5) if style is None else style
    return compose(mentions, meta["prompt"], extras, style)
