"""The Shapes world, version 1: vocabulary, GenEval-format prompts, sampler and parser.

The world is a fixed contract (see the README's "Shapes world" section): 64x64 RGB images on a
uniform grey background, six classes, GenEval's ten colours, and GenEval's six prompt templates
and metadata keys. Code outside this project draws images to this spec, so nothing here may
change without a new world version.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

WORLD_VERSION = 1
IMAGE_SIZE = 64
BACKGROUND = (153, 153, 153)
MIN_SIZE, MAX_SIZE = 12, 18
MIN_GAP = 2  # pixels between any two objects
BORDER = 2  # pixels between any object and the image border

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
    "ring": "rings",
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
    "pink": (250, 130, 190),
    "brown": (125, 75, 35),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBERS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
COUNTS: tuple[int, ...] = (2, 3, 4)

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_COUNTS: dict[str, int] = {
    "single_object": 80,
    "two_object": 99,
    "counting": 80,
    "colors": 94,
    "position": 100,
    "color_attr": 100,
}
TEMPLATES: dict[str, str] = {
    "single_object": "a photo of a/an {class}",
    "two_object": "a photo of a/an {class} and a/an {class}",
    "counting": "a photo of {two|three|four} {classes}",
    "colors": "a photo of a/an {color} {class}",
    "position": "a photo of a/an {class} {left of|right of|above|below} a/an {class}",
    "color_attr": "a photo of a/an {color} {class} and a/an {color} {class}",
}

# Every word a world prompt may contain (the refined-prompt language adds a few, see refine.py).
BASE_WORDS: frozenset[str] = frozenset(
    ["a", "an", "photo", "of", "and", "left", "right", "above", "below"]
    + list(CLASSES)
    + list(PLURALS.values())
    + list(COLOR_NAMES)
    + [NUMBERS[n] for n in COUNTS]
)


class PromptError(ValueError):
    """A prompt or metadata line that does not belong to the Shapes world."""


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(color: str | None, cls: str) -> str:
    """'a red circle', 'an orange ring', 'a square'."""
    phrase = f"{color} {cls}" if color else cls
    return f"{article(phrase)} {phrase}"


# ----------------------------------------------------------------------------------------------
# Metadata: GenEval's JSON lines. Plain dicts on disk; validated here.


def make_metadata(tag: str, **kw) -> dict:
    """Build the GenEval metadata line for one prompt of the given category."""
    if tag == "single_object":
        (a,) = kw["classes"]
        return {"tag": tag, "include": [{"class": a, "count": 1}], "prompt": f"a photo of {_np(None, a)}"}
    if tag == "two_object":
        a, b = kw["classes"]
        return {
            "tag": tag,
            "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            "prompt": f"a photo of {_np(None, a)} and {_np(None, b)}",
        }
    if tag == "counting":
        (a,) = kw["classes"]
        n = kw["count"]
        return {
            "tag": tag,
            "include": [{"class": a, "count": n}],
            "exclude": [{"class": a, "count": n + 1}],
            "prompt": f"a photo of {NUMBERS[n]} {PLURALS[a]}",
        }
    if tag == "colors":
        (a,) = kw["classes"]
        (c,) = kw["colors"]
        return {"tag": tag, "include": [{"class": a, "count": 1, "color": c}], "prompt": f"a photo of {_np(c, a)}"}
    if tag == "position":
        # GenEval's layout: the target (second noun) first, the positioned object second.
        a, b = kw["classes"]
        rel = kw["relation"]
        return {
            "tag": tag,
            "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
            "prompt": f"a photo of {_np(None, a)} {rel} {_np(None, b)}",
        }
    if tag == "color_attr":
        a, b = kw["classes"]
        ca, cb = kw["colors"]
        return {
            "tag": tag,
            "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
            "prompt": f"a photo of {_np(ca, a)} and {_np(cb, b)}",
        }
    raise PromptError(f"unknown tag {tag!r}; accepted: {', '.join(TAGS)}")


def validate_metadata(meta: dict, where: str = "metadata") -> dict:
    """Check a GenEval line against the world's vocabulary; return it unchanged or raise PromptError."""
    if not isinstance(meta, dict):
        raise PromptError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    for key in ("include", "prompt"):
        if key not in meta:
            raise PromptError(f"{where}: missing key {key!r} (GenEval lines have tag, include, exclude, prompt)")
    if not isinstance(meta["include"], list) or not meta["include"]:
        raise PromptError(f"{where}: 'include' must be a non-empty list")
    tag = meta.get("tag")
    if tag is not None and tag not in TAGS:
        raise PromptError(f"{where}: unknown tag {tag!r}; accepted: {', '.join(TAGS)}")
    for i, req in enumerate(meta["include"] + meta.get("exclude", [])):
        if not isinstance(req, dict):
            raise PromptError(f"{where}: clause {i} is not an object")
        cls = req.get("class")
        if cls not in CLASSES:
            raise PromptError(f"{where}: unknown class {cls!r}; the Shapes world has {', '.join(CLASSES)}")
        if not isinstance(req.get("count"), int) or req["count"] < 1:
            raise PromptError(f"{where}: clause for {cls!r} needs an integer count >= 1")
        if "color" in req and req["color"] not in COLORS:
            raise PromptError(f"{where}: unknown color {req['color']!r}; accepted: {', '.join(COLOR_NAMES)}")
        if "position" in req:
            pos = req["position"]
            if not (isinstance(pos, list) and len(pos) == 2 and pos[0] in RELATIONS and isinstance(pos[1], int)):
                raise PromptError(
                    f"{where}: position must be [relation, index] with relation in {', '.join(RELATIONS)}"
                )
            if not 0 <= pos[1] < i:
                raise PromptError(f"{where}: position index {pos[1]} must point to an earlier include clause")
    return meta


def is_world_metadata(meta: dict) -> bool:
    try:
        validate_metadata(meta)
    except PromptError:
        return False
    return True


def load_metadata_file(path, what: str = "prompts file") -> list[dict]:
    """Read GenEval JSON lines; errors name the file and line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PromptError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not out:
        raise PromptError(f"{path}: the {what} is empty")
    return out


# ----------------------------------------------------------------------------------------------
# Parser: prompt text -> metadata.

_CLS = "|".join(CLASSES)
_PL = "|".join(PLURALS.values())
_COL = "|".join(COLOR_NAMES)
_REL = "|".join(RELATIONS)
_NUM = "|".join(NUMBERS[n] for n in COUNTS)
_A = r"(?:a|an)"
_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("color_attr", re.compile(rf"^a photo of {_A} ({_COL}) ({_CLS}) and {_A} ({_COL}) ({_CLS})$")),
    ("position", re.compile(rf"^a photo of {_A} ({_CLS}) ({_REL}) {_A} ({_CLS})$")),
    ("two_object", re.compile(rf"^a photo of {_A} ({_CLS}) and {_A} ({_CLS})$")),
    ("colors", re.compile(rf"^a photo of {_A} ({_COL}) ({_CLS})$")),
    ("counting", re.compile(rf"^a photo of ({_NUM}) ({_PL})$")),
    ("single_object", re.compile(rf"^a photo of {_A} ({_CLS})$")),
]
_WORD_TO_NUM = {v: k for k, v in NUMBERS.items()}
_PLURAL_TO_CLS = {v: k for k, v in PLURALS.items()}


def normalize_prompt(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def unknown_words(text: str, extra: Iterable[str] = ()) -> list[str]:
    allowed = BASE_WORDS | set(extra)
    words = re.findall(r"[a-z]+", text.lower())
    return sorted({w for w in words if w not in allowed})


def vocabulary_help() -> str:
    lines = ["templates:"]
    lines += [f"  {tag:13s} {tpl}" for tag, tpl in TEMPLATES.items()]
    lines.append(f"classes: {', '.join(CLASSES)}")
    lines.append(f"colors: {', '.join(COLOR_NAMES)}")
    lines.append(f"relations: {', '.join(RELATIONS)}; counts: {', '.join(NUMBERS[n] for n in COUNTS)}")
    return "\n".join(lines)


def parse_prompt(text: str) -> dict:
    """Turn a world prompt back into its GenEval metadata line.

    Raises PromptError that names unknown words and lists the templates and vocabulary.
    """
    if not isinstance(text, str) or not text.strip():
        raise PromptError("empty prompt; " + vocabulary_help().replace("\n", "; "))
    p = normalize_prompt(text)
    for tag, pat in _PATTERNS:
        m = pat.match(p)
        if not m:
            continue
        g = m.groups()
        if tag == "color_attr":
            if g[1] == g[3]:
                break
            meta = make_metadata(tag, classes=(g[1], g[3]), colors=(g[0], g[2]))
        elif tag == "position":
            if g[0] == g[2]:
                break
            meta = make_metadata(tag, classes=(g[0], g[2]), relation=g[1])
        elif tag == "two_object":
            if g[0] == g[1]:
                break
            meta = make_metadata(tag, classes=(g[0], g[1]))
        elif tag == "colors":
            meta = make_metadata(tag, classes=(g[1],), colors=(g[0],))
        elif tag == "counting":
            meta = make_metadata(tag, classes=(_PLURAL_TO_CLS[g[1]],), count=_WORD_TO_NUM[g[0]])
        else:
            meta = make_metadata(tag, classes=(g[0],))
        meta["prompt"] = text.strip()
        return meta
    bad = unknown_words(p)
    head = f"prompt {text.strip()!r} fits no Shapes-world template"
    if bad:
        head += f"; unknown words: {', '.join(bad)}"
    raise PromptError(head + "\n" + vocabulary_help())


# ----------------------------------------------------------------------------------------------
# Sampler: GenEval-format prompt sets.


def _all_combinations(tag: str) -> list[dict]:
    """Every distinct prompt of one category (the sampler draws from these, balanced)."""
    if tag == "single_object":
        return [make_metadata(tag, classes=(a,)) for a in CLASSES]
    if tag == "two_object":
        return [make_metadata(tag, classes=p) for p in itertools.permutations(CLASSES, 2)]
    if tag == "counting":
        return [make_metadata(tag, classes=(a,), count=n) for a in CLASSES for n in COUNTS]
    if tag == "colors":
        return [make_metadata(tag, classes=(a,), colors=(c,)) for a in CLASSES for c in COLOR_NAMES]
    if tag == "position":
        return [
            make_metadata(tag, classes=p, relation=r) for p in itertools.permutations(CLASSES, 2) for r in RELATIONS
        ]
    if tag == "color_attr":
        return [
            make_metadata(tag, classes=p, colors=c)
            for p in itertools.permutations(CLASSES, 2)
            for c in itertools.permutations(COLOR_NAMES, 2)
        ]
    raise PromptError(f"unknown tag {tag!r}; accepted: {', '.join(TAGS)}")


def sample_prompts(
    counts: dict[str, int] | None = None, seed: int = 0, avoid: Sequence[dict] = ()
) -> list[dict]:
    """Draw a GenEval-format prompt set, category by category in GenEval's order.

    Within a category the draw cycles through shuffled permutations of every distinct prompt, so
    repeats happen only once the category's prompt space is exhausted. Prompts in `avoid` are
    drawn last (used to keep the validation set disjoint from the benchmark where space allows).
    """
    counts = dict(GENEVAL_COUNTS if counts is None else counts)
    rng = random.Random(seed)
    avoid_texts = {m["prompt"] for m in avoid}
    out: list[dict] = []
    for tag in TAGS:
        n = counts.get(tag, 0)
        pool = _all_combinations(tag)
        fresh = [m for m in pool if m["prompt"] not in avoid_texts]
        used = [m for m in pool if m["prompt"] in avoid_texts]
        picked: list[dict] = []
        while len(picked) < n:
            rng.shuffle(fresh)
            rng.shuffle(used)
            picked.extend(fresh + used)
        out.extend(picked[:n])
    return [json.loads(json.dumps(m)) for m in out]


@dataclass(frozen=True)
class Requirement:
    """One object the scene must hold, flattened from a GenEval include clause."""

    cls: str
    color: str | None


def scene_requirements(meta: dict) -> list[Requirement]:
    """The objects a legal scene for this metadata holds (counting: exactly N)."""
    reqs = []
    for clause in meta["include"]:
        reqs += [Requirement(clause["class"], clause.get("color"))] * clause["count"]
    return reqs
