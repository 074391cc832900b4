"""`reflectionflow serve`: the world's judges as an OpenAI-compatible endpoint, over real HTTP."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from reflectionflow.backends.vlm import prompts as P
from reflectionflow.backends.vlm.judges import data_url
from reflectionflow.serve import JudgeServer, JudgeService, world_judges
from reflectionflow.world.render import draw
from reflectionflow.world.spec import parse_prompt

PROMPT = "a photo of a red circle and a blue square"


@pytest.fixture(scope="module")
def server():
    srv = JudgeServer(JudgeService(world_judges()))
    srv.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _post(url: str, body, headers=None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/chat/completions", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _chat(text: str, image=None, **extra) -> dict:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
    return {"model": "reflectionflow-world", "messages": [{"role": "system", "content": "judge"},
                                                          {"role": "user", "content": content}], **extra}


def _images():
    good = draw(parse_prompt(PROMPT), 1)[1]
    bad = draw(parse_prompt("a photo of a green circle and a blue square"), 1)[1]
    return good, bad


def test_models(server):
    with urllib.request.urlopen(server.url + "/models", timeout=5) as r:
        body = json.loads(r.read())
    assert body["data"][0]["id"] == "reflectionflow-world"
    assert body["data"][0]["judges"]["verifier"] == "world-oracle"


def test_yes_no_with_logprobs(server):
    good, bad = _images()
    q = P.YESNO_USER.format(prompt=PROMPT)
    status, a = _post(server.url, _chat(q, good, max_tokens=1, logprobs=True, top_logprobs=2))
    assert status == 200 and a["choices"][0]["message"]["content"] == "Yes"
    top = a["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert [t["token"] for t in top] == ["Yes", "No"]
    assert math.isclose(sum(math.exp(t["logprob"]) for t in top), 1.0, rel_tol=1e-6)
    status, b = _post(server.url, _chat(q, bad, max_tokens=1, logprobs=True, top_logprobs=2))
    assert b["choices"][0]["message"]["content"] == "No"
    p_bad = math.exp(b["choices"][0]["logprobs"]["content"][0]["logprob"])
    assert p_bad > 0.5  # confident "No"
    status, c = _post(server.url, _chat(q, good))  # no logprobs asked: none sent
    assert c["choices"][0]["logprobs"] is None and c["usage"]["total_tokens"] > 0
    # Any size is judged at the world's 64x64.
    import numpy as np

    big = np.kron(good, np.ones((8, 8, 1), dtype=np.uint8))
    assert _post(server.url, _chat(q, big))[1]["choices"][0]["message"]["content"] == "Yes"


def test_score_reflect_refine(server):
    good, bad = _images()
    _, s = _post(server.url, _chat(P.SCORE_USER.format(prompt=PROMPT), bad, response_format=P.SCORE_RESPONSE_FORMAT))
    fields, problem = P.parse_score(s["choices"][0]["message"]["content"])
    assert problem is None and fields["overall"] < 10
    text = P.REFLECT_USER.format(original=PROMPT, current=PROMPT, previous="none", evaluation="none")
    _, r = _post(server.url, _chat(text, bad))
    assert r["choices"][0]["message"]["content"] == "- Change the green circle to red."
    _, r2 = _post(server.url, _chat(P.REFLECTION_GENERATOR_TEXT.format(prompt=PROMPT), bad))
    assert r2["choices"][0]["message"]["content"] == "- Change the green circle to red."
    text = P.REFINE_USER.format(original=PROMPT, current=PROMPT, reflection="\n- Change the green circle to red.",
                                evaluation="score 0.5")
    _, f = _post(server.url, _chat(text))
    assert f["choices"][0]["message"]["content"].startswith(PROMPT + ", ")


def test_bad_requests(server):
    good, _ = _images()
    q = P.YESNO_USER.format(prompt=PROMPT)
    cases = [
        (b"{not json", 400, "not JSON"),
        ({"messages": []}, 400, "non-empty"),
        (_chat("hello", good), 400, "unrecognised task"),
        (_chat(P.TASK_YESNO + "\nno prompt line", good), 400, "Prompt"),
        (_chat(q), 400, "needs one image"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}},
                                                    {"type": "text", "text": q}]}]}, 400, "data: URL"),
        (_chat(P.YESNO_USER.format(prompt="a photo of a cat"), good), 400, "judge could not answer"),
    ]
    for body, status, words in cases:
        code, answer = _post(server.url, body)
        assert code == status and words in answer["error"]["message"], (body if isinstance(body, bytes) else "", answer)
    req = urllib.request.Request(server.url.replace("/v1", "/nope"), method="GET")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 404


def test_api_key_required_when_configured():
    srv = JudgeServer(JudgeService(world_judges()), api_key="sk-local")
    srv.start()
    try:
        good, _ = _images()
        body = _chat(P.YESNO_USER.format(prompt=PROMPT), good)
        assert _post(srv.url, body)[0] == 401
        assert _post(srv.url, body, {"Authorization": "Bearer sk-wrong"})[0] == 401
        assert _post(srv.url, body, {"Authorization": "Bearer sk-local"})[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


def test_cli_serves_until_stopped_and_refuses_bad_flags(cli):
    code, _, err = cli("serve", "--verifier", "nope")
    assert code == 2 and "unknown verifier 'nope'" in err
    code, _, err = cli("serve", "--port", "70000")
    assert code == 2 and "--port" in err
    code, _, err = cli("serve", "--api-key-env", "SURELY_UNSET_VARIABLE_XYZ")
    assert code == 2 and "SURELY_UNSET_VARIABLE_XYZ" in err
    proc = subprocess.Popen([sys.executable, "-m", "reflectionflow", "serve", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "world-learned" in line and "http://127.0.0.1:" in line
        url = line.split(" at ")[1].split()[0]
        with urllib.request.urlopen(url + "/models", timeout=5) as r:
            assert json.loads(r.read())["data"][0]["id"] == "reflectionflow-world"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
