"""Oracle verifier and oracle reflector: the exact evaluator and the detector, used as judges.

These are the paper's "oracle verifier" upper bound: the verifier's verdict IS the GenEval-Shapes
evaluator's (recorded as such in config.json and ledger.json), with a graded score (fraction of
include/exclude clauses satisfied) so that ranking among wrong images is meaningful. They read the
requirements from the prompt text (spec.parse_prompt); the engine never hands them the category.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...components import Reflection, ReflectionRequest, Reflector, Verdict, Verifier
from ...world.commands import Command, format_reflection
from ...world.detect import Detection, detect
from ...world.evaluate import evaluate_detections
from ...world.render import relations
from .refine import parse_refined


class _Prompts:
    """Parsed prompt requirements, cached per text (per instance: no global state)."""

    def __init__(self):
        self._cache: dict[str, dict] = {}

    def meta(self, text: str) -> dict:
        if text not in self._cache:
            self._cache[text] = parse_refined(text)[0]
        return self._cache[text]


class OracleVerifier(Verifier):
    """The exact GenEval-Shapes verdict: yes = correct, score = fraction of clauses satisfied."""

    def __init__(self):
        self._prompts = _Prompts()

    def score(self, images: Sequence, prompts: Sequence[str]) -> list[Verdict]:
        out = []
        for image, prompt in zip(images, prompts):
            v = evaluate_detections(detect(image), self._prompts.meta(prompt))
            out.append(Verdict(score=v.score, yes=v.correct, details={"reason": v.reason}))
        return out


class OracleReflector(Reflector):
    """ReflectionFlow-style edit commands from the detector's objects versus the prompt's needs."""

    def __init__(self):
        self._prompts = _Prompts()

    def reflect(self, requests: Sequence[ReflectionRequest]) -> list[Reflection]:
        out = []
        for r in requests:
            meta = self._prompts.meta(r.original_prompt)
            out.append(Reflection(text=format_reflection(reflect_commands(detect(r.image), meta))))
        return out


def reflect_commands(dets: Sequence[Detection], meta: dict) -> list[Command]:
    """What to edit so the detections satisfy the metadata, most critical first.

    1. Missing objects: recolour an object of the right class (change), else turn an object of a
       class the prompt does not ask for into it (replace), else add it.
    2. Extra objects of a class the prompt asks for (they break counts, and GenEval checks the
       colour and position of the most confident ones, which may be the extras).
    3. Relations that do not hold (after the fixes above, which may move objects around).
    4. Objects of classes the prompt does not mention (GenEval ignores them, a reader would not).
    Nothing wrong: "Keep the image unchanged."
    """
    include = meta["include"]
    wanted = {c["class"] for c in include}
    free = list(dets)  # detections not yet claimed by a clause, most confident first
    claimed: list[list[Detection]] = []
    deficits: list[tuple[int, int]] = []  # (clause index, how many missing)
    for i, c in enumerate(include):
        ok = [d for d in free if d.cls == c["class"] and (c.get("color") in (None, d.color))][: c["count"]]
        for d in ok:
            free.remove(d)
        claimed.append(ok)
        if len(ok) < c["count"]:
            deficits.append((i, c["count"] - len(ok)))

    fixes: list[Command] = []
    changed: set[int] = set()  # clauses whose objects were added or replaced (positions unknown)
    for i, missing in deficits:
        c = include[i]
        for _ in range(missing):
            recolour = next((d for d in free if d.cls == c["class"]), None) if c.get("color") else None
            if recolour is not None:
                free.remove(recolour)
                claimed[i].append(recolour)
                fixes.append(Command("change", cls=recolour.cls, color=recolour.color, new_color=c["color"]))
                continue
            other = next((d for d in free if d.cls not in wanted), None)
            if other is not None:
                free.remove(other)
                claimed[i].append(other)  # keeps its box: the replacement sits where it was
                fixes.append(Command("replace", cls=other.cls, color=other.color, new_cls=c["class"],
                                     new_color=c.get("color")))
                continue
            fixes.append(Command("add", cls=c["class"], color=c.get("color"), count=1))
            changed.add(i)
    fixes = _merge_adds(fixes)

    extras = [Command("remove", cls=d.cls, color=d.color, count=1) for d in free if d.cls in wanted]
    moves = []
    for i, c in enumerate(include):
        if "position" not in c:
            continue
        rel, t = c["position"]
        if i in changed or t in changed or not claimed[i] or not claimed[t]:
            holds = False
        else:
            holds = all(rel in relations(a.box, b.box)["rels"] for a in claimed[i] for b in claimed[t])
        if not holds:
            moves.append(Command("move", cls=c["class"], relation=rel, target_cls=include[t]["class"]))
    strays = [Command("remove", cls=d.cls, color=d.color, count=1) for d in free if d.cls not in wanted]
    commands = fixes + extras + moves + strays
    return commands or [Command("keep")]


def _merge_adds(commands: list[Command]) -> list[Command]:
    """'Add one red circle' twice -> 'Add two red circles' (the reflection reads as a person's)."""
    out: list[Command] = []
    for c in commands:
        prev = out[-1] if out else None
        if (c.op == "add" and prev is not None and prev.op == "add" and prev.cls == c.cls
                and prev.color == c.color and prev.count < 4):
            out[-1] = Command("add", cls=c.cls, color=c.color, count=prev.count + 1)
        else:
            out.append(c)
    return out
