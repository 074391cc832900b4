"""Constructor options of the world components: dataclasses, checked before anything is built."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ...components import ComponentError
from ...runtime import is_number


def build_options(cls, options: dict, who: str):
    """cls(**options) with errors that name the component, the bad key and the accepted ones."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ComponentError(f"{who}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(known)}")
    opt = cls(**options)
    for f in fields(cls):
        v = getattr(opt, f.name)
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if f.name in ("difficulty_spread", "prompt_help") and (not number or v < 0):
            raise ComponentError(f"{who}: option {f.name} must be a number >= 0, got {v!r}")
        if f.name.startswith("p_"):
            if not is_number(v, 0.0, 1.0):
                raise ComponentError(f"{who}: option {f.name} must be a probability in [0, 1], got {v!r}")
    return opt


@dataclass
class RenderGeneratorOptions:
    """Chance of each kind of flaw in a generated scene (world.flaws kinds). The defaults put
    one-sample accuracy on GenEval-Shapes near FLUX.1-dev's on GenEval (about 0.65, position
    the hardest category) and let best-of-N with the oracle verifier saturate near 0.92 at 8
    samples, because some prompts fail for almost every seed."""

    p_missing: float = 0.06
    p_extra: float = 0.1
    p_color: float = 0.1
    p_class: float = 0.05
    p_relation: float = 0.3
    # Prompts differ in difficulty, as for real generators (some fail for almost every seed):
    # each (prompt, flaw kind) shifts its chance by spread x N(0, 1) in logit space, drawn from
    # a hash of the prompt. 0 makes every prompt of a category alike.
    difficulty_spread: float = 3.0
    # A refined prompt that states an aspect explicitly lowers that flaw's chance by this much in
    # logit space (a modest stand-in for "explicit prompts help": the paper finds prompt
    # refinement worth +0.02 over noise search at 32 samples; the trained generator will have
    # its own answer).
    prompt_help: float = 0.5


@dataclass
class EditCorrectorOptions:
    p_fail: float = 0.25  # each command of the reflection is dropped with this chance
    p_new_flaw: float = 0.05  # a correction breaks something new with this chance
    # Some prompts are hard to edit as well as to draw: each (prompt, command kind) shifts p_fail
    # by spread x N(0, 1) in logit space (0: every prompt alike).
    difficulty_spread: float = 2.0


@dataclass
class NoOptions:
    pass
