"""Verifiers, a reflector and a prompt refiner behind any OpenAI-compatible chat endpoint.

Each component turns its batch into one `ChatClient.complete` call (bounded concurrency, results in
input order). A failed call never raises: its result carries `error` (the engine records it in the
trace; a failed verdict scores -inf so it is never selected, a failed refinement keeps the chain's
prompt) and `calls` / `tokens` count what was spent, retries and re-asks included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ...components import (
    PromptRefiner,
    RefinedPrompt,
    RefineRequest,
    Reflection,
    ReflectionRequest,
    Reflector,
    Verdict,
    Verifier,
)
from ...io import png_bytes
from . import prompts as P
from .client import ChatClient, ChatRequest, ChatResult

FAILED = float("-inf")  # a verdict that failed ranks below every real one
REFLECTOR_STYLES = ("instruct", "reflection-generator")


def data_url(image) -> str:
    """An (H, W, 3) uint8 image as a base64 PNG data: URL (OpenAI's image_url format)."""
    import base64

    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def user_message(text: str, image=None) -> dict:
    content = []
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def _messages(system: str, text: str, image=None) -> list[dict]:
    return [{"role": "system", "content": system}, user_message(text, image)]


class VLMScoreVerifier(Verifier):
    """0-10 scores on objects / attributes / relations / overall as validated JSON; score = overall.

    The request carries a JSON schema (`response_format`, which GPT-4o and vLLM's guided decoding
    honour); the answer is validated here anyway, and a malformed one is re-asked once with the
    reason, inside the same conversation.
    """

    def __init__(self, client: ChatClient, max_tokens: int = 200):
        self.client = client
        self.max_tokens = max_tokens

    def _request(self, messages: list[dict]) -> ChatRequest:
        return ChatRequest(messages=messages, max_tokens=self.max_tokens, response_format=P.SCORE_RESPONSE_FORMAT)

    def score(self, images: Sequence, prompts: Sequence[str]) -> list[Verdict]:
        convs = [_messages(P.SCORE_SYSTEM, P.SCORE_USER.format(prompt=p), im) for im, p in zip(images, prompts)]
        first = self.client.complete([self._request(m) for m in convs])
        parsed = [P.parse_score(r.text) if r.error is None else (None, None) for r in first]
        # Re-ask once, only the malformed answers, all together.
        redo = [i for i, (fields, problem) in enumerate(parsed) if fields is None and problem is not None]
        second = self.client.complete([
            self._request(convs[i] + [{"role": "assistant", "content": first[i].text},
                                      {"role": "user", "content": P.SCORE_REASK.format(problem=parsed[i][1])}])
            for i in redo
        ])
        again = dict(zip(redo, second))
        out = []
        for i, r in enumerate(first):
            calls, tokens = r.attempts, r.tokens
            fields, problem = parsed[i]
            error = r.error
            if i in again:
                r2 = again[i]
                calls, tokens = calls + r2.attempts, tokens + r2.tokens
                fields, problem2 = P.parse_score(r2.text) if r2.error is None else (None, None)
                error = r2.error or (None if fields else f"malformed score twice: {problem}; then {problem2}")
            if fields is None:
                out.append(Verdict(score=FAILED, calls=calls, tokens=tokens, error=error or "no score"))
            else:
                out.append(Verdict(score=fields["overall"], details=fields, calls=calls, tokens=tokens))
        return out


def yes_probability(top: list[dict] | None) -> float | None:
    """P(yes) / (P(yes) + P(no)) over the first token's alternatives; None when neither appears."""
    if not top:
        return None
    p_yes = p_no = 0.0
    for alt in top:
        token = str(alt.get("token") or "").strip().lower()
        lp = alt.get("logprob")
        if lp is None:
            continue
        if token == "yes":
            p_yes += math.exp(lp)
        elif token == "no":
            p_no += math.exp(lp)
    if p_yes + p_no == 0.0:
        return None
    return p_yes / (p_yes + p_no)


class VLMYesNoVerifier(Verifier):
    """"Does the image match the prompt?" scored as P(yes) from the first token's log-probabilities
    (the NVILA verifier's rule, docs/method.md, section 5); ranking puts yes-answers first.

    Where the server returns no log-probabilities the answer itself decides: score 1.0 or 0.0, and
    `details["logprobs"]` says so.
    """

    def __init__(self, client: ChatClient, top_logprobs: int = 5):
        self.client = client
        self.top_logprobs = top_logprobs

    def score(self, images: Sequence, prompts: Sequence[str]) -> list[Verdict]:
        reqs = [ChatRequest(messages=_messages(P.YESNO_SYSTEM, P.YESNO_USER.format(prompt=p), im), max_tokens=1,
                            logprobs=True, top_logprobs=self.top_logprobs) for im, p in zip(images, prompts)]
        return [self._verdict(r) for r in self.client.complete(reqs)]

    @staticmethod
    def _verdict(r: ChatResult) -> Verdict:
        if r.error:
            return Verdict(score=FAILED, calls=r.attempts, tokens=r.tokens, error=r.error)
        answer = r.text.strip().lower().strip(".!\"' ")
        said = True if answer.startswith("yes") else False if answer.startswith("no") else None
        p = yes_probability(r.top_logprobs)
        if p is None and said is None:
            return Verdict(score=FAILED, calls=r.attempts, tokens=r.tokens,
                           error=f"answer {r.text[:40]!r} is neither yes nor no")
        yes = said if said is not None else p >= 0.5
        score = p if p is not None else float(yes)
        return Verdict(score=score, yes=yes, details={"answer": r.text.strip(), "logprobs": p is not None},
                       calls=r.attempts, tokens=r.tokens)


class VLMReflector(Reflector):
    """Edit commands for an image, most critical first.

    style "instruct" (GPT-4o, Qwen2.5-VL-Instruct): the project's reflection prompt, with the
    prompts, the previous reflection and the evaluation. style "reflection-generator": the released
    ReflectionFlow reflection model's own message and answer format.
    """

    def __init__(self, client: ChatClient, style: str = "instruct", max_tokens: int = 300):
        if style not in REFLECTOR_STYLES:
            raise ValueError(f"reflector style {style!r}; accepted: {', '.join(REFLECTOR_STYLES)}")
        self.client = client
        self.style = style
        self.max_tokens = max_tokens

    def _messages(self, r: ReflectionRequest) -> list[dict]:
        if self.style == "reflection-generator":
            return _messages("You are a helpful assistant.",
                             P.REFLECTION_GENERATOR_TEXT.format(prompt=r.original_prompt), r.image)
        previous = "\n" + r.previous_reflection if r.previous_reflection else "none"
        text = P.REFLECT_USER.format(original=r.original_prompt, current=r.current_prompt, previous=previous,
                                     evaluation=P.evaluation_text(r.verdict))
        return _messages(P.REFLECT_SYSTEM, text, r.image)

    def reflect(self, requests: Sequence[ReflectionRequest]) -> list[Reflection]:
        results = self.client.complete([ChatRequest(messages=self._messages(r), max_tokens=self.max_tokens)
                                        for r in requests])
        out = []
        for res in results:
            if res.error:
                out.append(Reflection(text="", calls=res.attempts, tokens=res.tokens, error=res.error))
                continue
            parse = P.parse_reflection_generator if self.style == "reflection-generator" else P.parse_bullets
            lines = parse(res.text)
            out.append(Reflection(text="\n".join(lines), calls=res.attempts, tokens=res.tokens,
                                  error=None if lines else "empty reflection"))
        return out


class VLMRefiner(PromptRefiner):
    """A refined prompt from the original and current prompts, the reflection and the evaluation
    (and the image, when `with_image`). It never drops what the original prompt describes: the
    instruction says so and the engine always scores against the original prompt anyway."""

    def __init__(self, client: ChatClient, with_image: bool = True, max_tokens: int = 200):
        self.client = client
        self.with_image = with_image
        self.max_tokens = max_tokens

    def refine(self, requests: Sequence[RefineRequest]) -> list[RefinedPrompt]:
        reqs = []
        for r in requests:
            text = P.REFINE_USER.format(original=r.original_prompt, current=r.current_prompt,
                                        reflection=("\n" + r.reflection) if r.reflection else "none",
                                        evaluation=P.evaluation_text(r.verdict))
            reqs.append(ChatRequest(messages=_messages(P.REFINE_SYSTEM, text, r.image if self.with_image else None),
                                    max_tokens=self.max_tokens))
        out = []
        for r, res in zip(requests, self.client.complete(reqs)):
            if res.error:
                out.append(RefinedPrompt(text=r.current_prompt, calls=res.attempts, tokens=res.tokens, error=res.error))
                continue
            text = P.parse_refined_prompt(res.text)
            out.append(RefinedPrompt(text=text or r.current_prompt, calls=res.attempts, tokens=res.tokens,
                                     error=None if text else "empty refined prompt"))
        return out
