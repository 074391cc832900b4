"""The OpenAI-compatible client and the VLM judges against a loopback `serve` that injects faults:
429s, 500s, answers slower than the timeout, malformed JSON. Every prompt finishes, failures are
counted, results stay in input order; bad endpoint settings fail before anything loads; the API
key never shows up anywhere."""

from __future__ import annotations

import argparse
import json
import random
import socket
import threading

import numpy as np
import pytest

from reflectionflow.backends.flux.options import add_arguments, options_from_args
from reflectionflow.backends.vlm import prompts as P
from reflectionflow.backends.vlm.client import ChatClient, ChatRequest, VLMError, normalize_base_url
from reflectionflow.backends.vlm.judges import VLMRefiner, VLMReflector, VLMScoreVerifier, VLMYesNoVerifier
from reflectionflow.backends.vlm.options import VLMOptions
from reflectionflow.cli import one_line
from reflectionflow.components import RefineRequest, ReflectionRequest
from reflectionflow.serve import JudgeServer, JudgeService, world_judges
from reflectionflow.world.render import draw
from reflectionflow.world.spec import COLOR_NAMES, parse_prompt

SECRET = "sk-test-7d1e0c-DO-NOT-LEAK"


def _prompts(n: int) -> list[str]:
    shapes = ("circle", "square", "triangle", "diamond")
    return [f"a photo of a {COLOR_NAMES[i % 10]} {shapes[i // 10]}" for i in range(n)]


def _images(prompts: list[str]) -> tuple[list[np.ndarray], list[bool]]:
    """Even indices: the prompt's scene; odd: the same shape in the wrong colour."""
    images, truth = [], []
    for i, p in enumerate(prompts):
        meta = parse_prompt(p)
        if i % 2:
            color = meta["include"][0]["color"]
            wrong = COLOR_NAMES[(COLOR_NAMES.index(color) + 5) % 10]
            meta = parse_prompt(p.replace(color, wrong))
        images.append(draw(meta, seed=i)[1])
        truth.append(i % 2 == 0)
    return images, truth


class Faults:
    """Per-prompt fault plans: a list of actions for the prompt's successive attempts."""

    def __init__(self, plans: dict[str, list[str]], jitter: float = 0.02):
        self.plans = plans
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()
        self.rng = random.Random(0)
        self.jitter = jitter

    def __call__(self, path: str, body: dict | None):
        if body is None:
            return None
        text = "\n".join(part["text"] for m in body["messages"] if m["role"] == "user"
                         for part in (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}])
                         if "text" in part)
        prompt = P.parse_fields(text).get("prompt", "")
        with self.lock:
            k = self.seen.get(prompt, 0)
            self.seen[prompt] = k + 1
            delay = self.rng.random() * self.jitter  # scrambles completion order
        plan = self.plans.get(prompt, [])
        action = plan[k] if k < len(plan) else "ok"
        if action == "ok":
            import time

            time.sleep(delay)
            return None
        if action == "429":
            return 429, b'{"error": {"message": "rate limited"}}', delay
        if action == "500":
            return 500, b'{"error": {"message": "boom"}}', delay
        if action == "slow":
            return 200, b"{}", 1.2  # past the client's 0.5 s timeout
        if action == "badjson":
            return 200, b'{"choices": [', delay
        if action == "badscore":
            answer = {"choices": [{"message": {"role": "assistant", "content": "I think it is an 8"}}]}
            return 200, json.dumps(answer).encode(), delay
        raise AssertionError(action)


@pytest.fixture
def faulty_server():
    servers = []

    def start(plans, api_key=None):
        srv = JudgeServer(JudgeService(world_judges()), api_key=api_key, hook=Faults(plans))
        srv.start()
        servers.append(srv)
        return srv

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _client(url, **kw):
    kw = {"concurrency": 4, "timeout": 0.5, "retries": 3, "backoff": 0.01, "max_backoff": 0.05, "seed": 0} | kw
    return ChatClient(url, "reflectionflow-world", **kw)


def test_yesno_verifier_survives_faults_in_order(faulty_server):
    prompts = _prompts(16)
    images, truth = _images(prompts)
    plans = {prompts[1]: ["429", "429"], prompts[2]: ["500"], prompts[3]: ["slow"], prompts[4]: ["badjson"],
             prompts[5]: ["500"] * 10, prompts[6]: ["429", "500", "slow"], prompts[9]: ["slow"] * 10}
    srv = faulty_server(plans)
    client = _client(srv.url)
    verdicts = VLMYesNoVerifier(client).score(images, prompts)

    assert len(verdicts) == 16
    failed = {i for i, v in enumerate(verdicts) if v.error}
    assert failed == {5, 9}  # always 500 / always too slow: failed after every retry, recorded
    assert "HTTP 500" in verdicts[5].error and "4 attempts" in verdicts[5].error
    assert "no answer within" in verdicts[9].error
    assert verdicts[5].score == float("-inf") and verdicts[5].calls == 4
    for i, v in enumerate(verdicts):
        if i not in failed:  # every other verdict belongs to its own image, whatever order they finished in
            assert v.yes is truth[i], (i, v)
            assert v.details["logprobs"] is True and 0.0 < v.score < 1.0
    assert [v.calls for v in verdicts[:7]] == [1, 3, 2, 2, 2, 4, 4]
    s = client.stats.to_dict()
    assert s["calls"] == 16 and s["failures"] == 2
    assert s["attempts"] == sum(v.calls for v in verdicts)
    assert s["outcomes"]["429"] == 3 and s["outcomes"]["timeout"] == 6 and s["outcomes"]["malformed"] == 1
    assert s["prompt_tokens"] > 0


def test_score_verifier_reasks_once_on_malformed_output(faulty_server):
    prompts = _prompts(6)
    images, truth = _images(prompts)
    srv = faulty_server({prompts[0]: ["badscore"], prompts[1]: ["badscore", "badscore"], prompts[2]: ["429"]})
    verdicts = VLMScoreVerifier(_client(srv.url)).score(images, prompts)
    assert verdicts[0].error is None and verdicts[0].calls == 2 and verdicts[0].score == 10.0
    assert verdicts[1].error.startswith("malformed score twice") and verdicts[1].calls == 2
    assert verdicts[2].error is None and verdicts[2].calls == 2
    for i in (3, 4, 5):
        assert verdicts[i].error is None and (verdicts[i].score == 10.0) is truth[i]
        assert set(verdicts[i].details) >= {"objects", "attributes", "relations", "overall", "explanation"}


def test_reflector_and_refiner_keep_order_and_record_failures(faulty_server):
    prompts = _prompts(8)
    images, truth = _images(prompts)
    srv = faulty_server({prompts[3]: ["500"] * 10, prompts[4]: ["slow", "429"]})
    client = _client(srv.url)
    refl = VLMReflector(client).reflect([ReflectionRequest(im, p, p) for im, p in zip(images, prompts)])
    for i, r in enumerate(refl):
        if i == 3:
            assert r.error and r.text == "" and r.calls == 4
        elif truth[i]:
            assert r.text == "- Keep the image unchanged."
        else:
            color = parse_prompt(prompts[i])["include"][0]["color"]
            assert r.text.startswith("- Change the ") and r.text.endswith(f"to {color}.")
    assert refl[4].calls == 3
    refined = VLMRefiner(client).refine([RefineRequest(p, p, r.text, None, im)
                                         for p, r, im in zip(prompts, refl, images)])
    assert refined[3].error and refined[3].text == prompts[3]  # failed: the chain keeps its prompt
    for i, r in enumerate(refined):
        if i != 3:
            assert r.error is None and r.text.startswith(prompts[i] + ", ")


def test_reflection_generator_style():
    text = ("1. Object presence:  \n- Add a red circle in the center.\n\n"
            "2. Color:  \n- None\n\n3. Position:  \n- Move the square to the left.\n- Make it bigger.")
    assert P.parse_reflection_generator(text) == ["- Add a red circle in the center.", "- Move the square to the left.",
                                                  "- Make it bigger."]
    assert P.parse_bullets("1. Add one circle.\n2) Remove the square\nThanks!") == [
        "- Add one circle.", "- Remove the square"]
    assert P.parse_refined_prompt('Refined prompt: "a photo of a red circle"\n') == "a photo of a red circle"


def test_url_forms():
    assert normalize_base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalize_base_url("http://h:1/v1/chat/completions") == "http://h:1/v1"
    with pytest.raises(VLMError, match="http"):
        normalize_base_url("ftp://x")


# ----------------------------------------------------------------------------------------------
# Bad endpoint settings: one-line errors before anything loads; the key never leaks


def _opts(argv, env):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return options_from_args(p.parse_args(argv), env)


def _preflight_error(opts) -> str:
    with pytest.raises(ValueError) as e:
        opts.vlm.preflight(timeout=2)
    assert "\n" not in str(e.value)
    return one_line(e.value)


def test_unreachable_url():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    msg = _preflight_error(_opts(["--vlm-url", f"http://127.0.0.1:{port}/v1", "--vlm-model", "m"], {}))
    assert "unreachable" in msg and f"127.0.0.1:{port}" in msg
    assert "--vlm-url" in _preflight_error(_opts(["--vlm-model", "m"], {}))
    assert "--vlm-model" in _preflight_error(_opts(["--vlm-url", "http://127.0.0.1:9/v1"], {}))


def test_missing_or_wrong_api_key(faulty_server):
    # A variable the user named must be set.
    msg = _preflight_error(_opts(["--vlm-url", "http://127.0.0.1:9/v1", "--vlm-model", "m",
                                  "--vlm-api-key-env", "MY_VLM_KEY"], {}))
    assert "MY_VLM_KEY" in msg and "no API key" in msg
    # Paid hosts never run without one (checked offline, no request sent).
    msg = _preflight_error(_opts(["--vlm-url", "https://api.openai.com/v1", "--vlm-model", "gpt-4o"], {}))
    assert "OPENAI_API_KEY" in msg
    # A server that wants a key says so: 401 becomes a one-line error naming the variable.
    srv = faulty_server({}, api_key=SECRET)
    msg = _preflight_error(_opts(["--vlm-url", srv.url, "--vlm-model", "reflectionflow-world"], {}))
    assert "401" in msg and "OPENAI_API_KEY is not set" in msg
    wrong = _opts(["--vlm-url", srv.url, "--vlm-model", "reflectionflow-world", "--vlm-api-key-env", "K"],
                  {"K": "sk-wrong"})
    assert "was refused" in _preflight_error(wrong)
    msg = _preflight_error(_opts(["--vlm-url", srv.url, "--vlm-model", "gpt-4o", "--vlm-api-key-env", "K"],
                                 {"K": SECRET}))
    assert "'gpt-4o' is not served" in msg and "reflectionflow-world" in msg
    ok = _opts(["--vlm-url", srv.url, "--vlm-model", "reflectionflow-world", "--vlm-api-key-env", "K"], {"K": SECRET})
    assert ok.vlm.preflight() == ["reflectionflow-world"]


def test_api_key_never_leaks(faulty_server):
    srv = faulty_server({}, api_key=SECRET)
    opts = _opts(["--vlm-url", srv.url, "--vlm-model", "reflectionflow-world"], {"OPENAI_API_KEY": SECRET})
    assert opts.vlm.api_key == SECRET  # read from the environment by the CLI layer only
    client = opts.vlm.client(timeout=2, retries=0)
    prompts = _prompts(2)
    images, _ = _images(prompts)
    ok = VLMYesNoVerifier(client).score(images, prompts)
    assert all(v.error is None for v in ok)
    refused = VLMYesNoVerifier(VLMOptions(url=srv.url, model="reflectionflow-world", api_key="sk-other").client(
        retries=0)).score(images, prompts)
    assert all("401" in v.error for v in refused)
    shown = [repr(opts), repr(opts.vlm), repr(client), json.dumps(opts.public(), default=str),
             json.dumps(client.stats.to_dict()), *(repr(v) for v in ok + refused)]
    assert not any(SECRET in s for s in shown)
    assert opts.public()["vlm"]["api_key_set"] is True and "api_key" not in opts.public()["vlm"]


def test_client_sends_batches_concurrently_and_bounded(faulty_server):
    seen, peak, lock = [0], [0], threading.Lock()

    def hook(path, body):
        import time

        if body is None:
            return None
        with lock:
            seen[0] += 1
            peak[0] = max(peak[0], seen[0])
        time.sleep(0.05)
        with lock:
            seen[0] -= 1
        return None

    srv = JudgeServer(JudgeService(world_judges()), hook=hook)
    srv.start()
    try:
        prompts = _prompts(12)
        images, _ = _images(prompts)
        client = _client(srv.url, concurrency=3, timeout=5)
        reqs = [ChatRequest(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}},
            {"type": "text", "text": P.YESNO_USER.format(prompt=p)}]}], max_tokens=1) for p in prompts]
        out = client.complete(reqs)  # empty images: the server answers 400, not retried
        assert all(r.error and "HTTP 400" in r.error and r.attempts == 1 for r in out)
        assert peak[0] == 3
    finally:
        srv.shutdown()
        srv.server_close()
