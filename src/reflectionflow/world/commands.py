"""The world's reflection language: ReflectionFlow-style edit commands, one per bullet.

    - Add one red circle.
    - Remove one triangle.
    - Change the blue square to green.
    - Move the cross to the left of the ring.
    - Replace the diamond with a square.
    - Keep the image unchanged.

Colours are optional wherever an object is named ("the cross", "the red cross"). The grammar is
small and closed so that a learned reflector's text can be parsed back into edits, and so the
world's text encoder has a fixed vocabulary (`VOCABULARY`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .captions import CAPTION_WORDS
from .spec import BASE_WORDS, CLASSES, COLOR_NAMES, NUMBERS, RELATIONS

OPS = ("add", "remove", "change", "move", "replace", "keep")
# "left of" is written "to the left of" in a move command.
_MOVE_PHRASE = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
_PHRASE_MOVE = {v: k for k, v in _MOVE_PHRASE.items()}

# Words of the refined-prompt language (rule refiner) and the corrector's text separator.
REFINE_WORDS = ("exactly", "the", "is", "are", "with", "no", "other", "objects", "nothing", "else",
                "grey", "background", "each", "one", "only", "shape", "shapes", "colored", "in", "on")
COMMAND_WORDS = ("add", "remove", "change", "move", "replace", "keep", "image", "unchanged", "to",
                 "the", "with", "one", "two", "three", "four", "reflexion")
VOCABULARY: tuple[str, ...] = tuple(sorted(BASE_WORDS | set(REFINE_WORDS) | set(COMMAND_WORDS) | set(CAPTION_WORDS)))


@dataclass(frozen=True)
class Command:
    op: str  # one of OPS
    cls: str | None = None
    color: str | None = None
    count: int = 1  # add / remove
    new_cls: str | None = None  # replace
    new_color: str | None = None  # change / replace
    relation: str | None = None  # move: the object ends up <relation> the target
    target_cls: str | None = None
    target_color: str | None = None

    def text(self) -> str:
        return format_command(self)


def _obj(color: str | None, cls: str) -> str:
    return f"{color} {cls}" if color else cls


def _art(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def format_command(c: Command) -> str:
    if c.op == "add" or c.op == "remove":
        noun = c.cls if c.count == 1 else {"cross": "crosses"}.get(c.cls, c.cls + "s")
        return f"- {c.op.capitalize()} {NUMBERS[c.count]} {_obj(c.color, noun)}."
    if c.op == "change":
        return f"- Change the {_obj(c.color, c.cls)} to {c.new_color}."
    if c.op == "move":
        return f"- Move the {_obj(c.color, c.cls)} {_MOVE_PHRASE[c.relation]} the {_obj(c.target_color, c.target_cls)}."
    if c.op == "replace":
        return f"- Replace the {_obj(c.color, c.cls)} with {_art(_obj(c.new_color, c.new_cls))}."
    if c.op == "keep":
        return "- Keep the image unchanged."
    raise ValueError(f"unknown command op {c.op!r}; accepted: {', '.join(OPS)}")


def format_reflection(commands: list[Command]) -> str:
    return "\n".join(format_command(c) for c in commands)


_C = "|".join(COLOR_NAMES)
_K = "|".join(CLASSES)
_KP = "|".join(sorted(set(CLASSES) | {"circles", "squares", "triangles", "diamonds", "crosses", "rings"}))
_N = "|".join(NUMBERS.values())
_MV = "|".join(re.escape(p) for p in _PHRASE_MOVE)
_OBJ = rf"(?:({_C}) )?({_K})"
_RULES = [
    ("add", re.compile(rf"^(add|remove) ({_N}) (?:({_C}) )?({_KP})$")),
    ("change", re.compile(rf"^change the {_OBJ} to ({_C})$")),
    ("move", re.compile(rf"^move the {_OBJ} ({_MV}) the {_OBJ}$")),
    ("replace", re.compile(rf"^replace the {_OBJ} with an? {_OBJ}$")),
    ("keep", re.compile(r"^keep the image unchanged$")),
]
_SINGULAR = {"crosses": "cross", "circles": "circle", "squares": "square", "triangles": "triangle",
             "diamonds": "diamond", "rings": "ring"}
_NUM = {v: k for k, v in NUMBERS.items()}


def parse_command(line: str) -> Command | None:
    """One bullet line -> Command, or None when it is not in the language."""
    s = " ".join(line.strip().lstrip("-*• ").rstrip(".").lower().split())
    for kind, pat in _RULES:
        m = pat.match(s)
        if not m:
            continue
        g = m.groups()
        if kind == "add":
            return Command(op=g[0], count=_NUM[g[1]], color=g[2], cls=_SINGULAR.get(g[3], g[3]))
        if kind == "change":
            return Command(op="change", color=g[0], cls=g[1], new_color=g[2])
        if kind == "move":
            return Command(op="move", color=g[0], cls=g[1], relation=_PHRASE_MOVE[g[2]],
                           target_color=g[3], target_cls=g[4])
        if kind == "replace":
            return Command(op="replace", color=g[0], cls=g[1], new_color=g[2], new_cls=g[3])
        return Command(op="keep")
    return None


def parse_reflection(text: str) -> tuple[list[Command], list[str]]:
    """Split a reflection into commands; returns (commands, lines that did not parse)."""
    commands, rejected = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        c = parse_command(line)
        if c is None:
            rejected.append(line.strip())
        else:
            commands.append(c)
    return commands, rejected


assert all(r in _MOVE_PHRASE for r in RELATIONS)
