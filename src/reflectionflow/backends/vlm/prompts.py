"""What the VLM judges are asked, in the project's own words (docs/method.md, sections 2 and 5).

Every user message names the prompt on a line `Prompt: "..."` (and the refiner and reflector the
current prompt on `Current prompt: "..."`), and each task opens with its own first line, so that
`reflectionflow serve` (and any other server) can tell the tasks apart and read their fields back
(`parse_fields`). The evaluation of the image never names a benchmark category: the verifier is kept
apart from the metric (docs/method.md, section 5).
"""

from __future__ import annotations

import json
import re

from ...components import Verdict
from ...runtime import is_number

TASK_YESNO = "Task: answer yes or no."
TASK_SCORE = "Task: score the image against the prompt."
TASK_REFLECT = "Task: write edit commands for the image."
TASK_REFINE = "Task: rewrite the prompt."
# The released reflection generator (a fine-tuned Qwen2.5-VL) was trained on this exact message.
REFLECTION_GENERATOR_TEXT = ("Generate reflections to improve the input image according to the prompt. "
                             'The prompt is: "{prompt}"')

YESNO_SYSTEM = "You judge whether images match their descriptions. You answer with a single word."
YESNO_USER = TASK_YESNO + """
Prompt: "{prompt}"
Does the image match the prompt in every respect: the objects, how many, their colors and where they are?
Answer with exactly one word: Yes or No."""

SCORE_SYSTEM = ("You are a strict visual judge. You compare an image with the prompt it was generated from "
                "and grade how faithfully it follows the prompt.")
SCORE_USER = TASK_SCORE + """
Prompt: "{prompt}"
Grade the image from 0 (not at all) to 10 (perfectly) on:
- objects: every object the prompt asks for is present, and nothing contradicts it;
- attributes: counts, colors and other attributes are as stated;
- relations: positions and spatial relations are as stated (10 if the prompt states none);
- overall: how completely the image satisfies the prompt as a whole.
Reply with only a JSON object with the integer fields objects, attributes, relations, overall and a
one-sentence string field explanation."""

SCORE_FIELDS = ("objects", "attributes", "relations", "overall")
SCORE_SCHEMA = {
    "type": "object",
    # No minimum / maximum: OpenAI's strict structured outputs refuse schemas with them; the range is
    # in the instruction and checked by parse_score.
    "properties": {**{k: {"type": "integer"} for k in SCORE_FIELDS},
                   "explanation": {"type": "string"}},
    "required": [*SCORE_FIELDS, "explanation"],
    "additionalProperties": False,
}
SCORE_RESPONSE_FORMAT = {"type": "json_schema",
                         "json_schema": {"name": "image_score", "strict": True, "schema": SCORE_SCHEMA}}
SCORE_REASK = ("Your reply could not be used: {problem}. Reply again with only the JSON object, with integer "
               "fields objects, attributes, relations, overall between 0 and 10 and a string field explanation.")

REFLECT_SYSTEM = ("You are an expert image editor. You look at an image generated from a prompt and write the "
                  "edits that would make it match the prompt exactly.")
REFLECT_USER = TASK_REFLECT + """
Prompt: "{original}"
Current prompt: "{current}"
Previous edit commands: {previous}
Evaluation of the image: {evaluation}
List the changes that would make the image match the prompt. Rules:
- one command per line, each line starting with "- ";
- start each command with Add, Remove, Replace, Move or Adjust;
- put the most important correction first;
- say exactly which object and where (left, right, top, bottom, next to what);
- never change what the prompt describes and the image already shows correctly;
- no explanations, no other text. If the image already matches, write "- Keep the image unchanged.\""""

REFINE_SYSTEM = "You write prompts for a text-to-image model."
REFINE_USER = TASK_REFINE + """
Prompt: "{original}"
Current prompt: "{current}"
Edit commands for the last image: {reflection}
Evaluation of the last image: {evaluation}
Rewrite the current prompt so that the next image avoids the problems above. Keep everything the
original prompt describes, unchanged in meaning; you may add detail that makes it explicit (counts,
colors, positions). Reply with the new prompt only, on one line, without quotes."""


def evaluation_text(verdict: Verdict | None) -> str:
    """A verdict as the judges read it: its sub-scores and explanation, never a benchmark category."""
    if verdict is None:
        return "none"
    if verdict.error:
        return "unavailable"
    d = {k: v for k, v in (verdict.details or {}).items() if k != "category" and isinstance(v, (int, float, str))}
    head = f"score {verdict.score:.3g}" + ("" if verdict.yes is None else f", match: {'yes' if verdict.yes else 'no'}")
    return head + (f", {json.dumps(d, sort_keys=True)}" if d else "")


_FIELD = re.compile(r'^(Prompt|Current prompt|Previous edit commands|Edit commands for the last image): ?(.*)$', re.M)


def parse_fields(text: str) -> dict[str, str]:
    """The named lines of a task message (what `reflectionflow serve` reads back)."""
    out = {}
    for name, value in _FIELD.findall(text):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        out[name.lower()] = value
    m = re.search(r'The prompt is: "(.*)"', text)  # the released reflection generator's message
    if m and "prompt" not in out:
        out["prompt"] = m.group(1)
    return out


def task_of(text: str) -> str | None:
    for task, marker in (("yesno", TASK_YESNO), ("score", TASK_SCORE), ("reflect", TASK_REFLECT),
                         ("refine", TASK_REFINE)):
        if marker in text:
            return task
    if "Generate reflections to improve the input image" in text:
        return "reflect"
    return None


# ----------------------------------------------------------------------------------------------
# Reading answers


_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+(.*\S)\s*$")


def parse_bullets(text: str) -> list[str]:
    """Bullet or numbered lines as '- command' lines; free text with no bullets gives its sentences."""
    lines = [m.group(1) for m in map(_BULLET.match, text.splitlines()) if m]
    if not lines:
        lines = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]
    return ["- " + line.strip().strip('"') for line in lines if line.strip().strip('"')]


def parse_reflection_generator(text: str) -> list[str]:
    """The released reflection generator's answer: numbered sections `N. Title: - item - item`,
    separated by blank lines; a section with an item saying None is skipped (as the original's
    `concat_extract_reflections` does)."""
    out: list[str] = []
    for section in re.split(r"\n\s*\n", text.strip()):
        if ":" not in section:
            continue
        _, content = section.split(":", 1)
        items = [it.strip(" -\n\t") for it in re.split(r"\n\s*-", "\n" + content) if it.strip(" -\n\t")]
        if any("None" in it for it in items):
            continue
        out += ["- " + it for it in items]
    return out or parse_bullets(text)


def parse_refined_prompt(text: str) -> str:
    """The first non-empty line, without quotes or a 'Prompt:' label."""
    for line in text.strip().splitlines():
        line = re.sub(r"^\s*(refined prompt|new prompt|prompt)\s*:\s*", "", line.strip(), flags=re.I)
        line = line.strip().strip('"\u201c\u201d\'').strip()
        if line:
            return line
    return ""


def parse_score(text: str) -> tuple[dict | None, str | None]:
    """The score JSON, validated against SCORE_SCHEMA; returns (fields, problem)."""
    raw = text.strip()
    if raw.startswith("```"):  # some servers fence JSON even when asked not to
        raw = re.sub(r"^```(json)?|```$", "", raw, flags=re.M).strip()
    try:
        obj = json.loads(raw)
    except ValueError:
        return None, "it is not valid JSON"
    if not isinstance(obj, dict):
        return None, "it is not a JSON object"
    missing = [k for k in (*SCORE_FIELDS, "explanation") if k not in obj]
    if missing:
        return None, f"field(s) {', '.join(missing)} missing"
    for k in SCORE_FIELDS:
        v = obj[k]
        if not is_number(v, 0, 10):
            return None, f"field {k} must be a number from 0 to 10, got {v!r}"
    if not isinstance(obj["explanation"], str):
        return None, "field explanation must be a string"
    return {**{k: float(obj[k]) for k in SCORE_FIELDS}, "explanation": obj["explanation"]}, None
