"""`reflectionflow serve`: the world's judges as an OpenAI-compatible endpoint, over real HTTP."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from reflectionflow.backends.vlm import prompts as P
from reflectionflow.backends.vlm.judges import data_url
from reflectionflow.components import PromptRefiner, Reflector, Verifier
from reflectionflow.serve import Judges, JudgeServer, JudgeService, ServeError, world_judges
from reflectionflow.serve.server import Batcher, BatchOptions
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


# Batching ---------------------------------------------------------------------------------------
# A gate holds the first verifier call (and with it the lock every component call takes) until the
# test has queued all its requests, so the batches that form next are known exactly: no timing.


class _Gate:
    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()
        self.sizes: dict[str, list[int]] = {"verifier": [], "reflector": [], "refiner": []}

    def record(self, kind: str, n: int) -> None:
        self.sizes[kind].append(n)
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(30), "the test never opened the gate"


class _GatedVerifier(Verifier):
    def __init__(self, inner, gate):
        self.inner, self.gate = inner, gate

    def score(self, images, prompts):
        self.gate.record("verifier", len(images))
        return self.inner.score(images, prompts)


class _CountedReflector(Reflector):
    def __init__(self, inner, gate):
        self.inner, self.gate = inner, gate

    def reflect(self, requests):
        self.gate.record("reflector", len(requests))
        return self.inner.reflect(requests)


class _CountedRefiner(PromptRefiner):
    def __init__(self, inner, gate):
        self.inner, self.gate = inner, gate

    def refine(self, requests):
        self.gate.record("refiner", len(requests))
        return self.inner.refine(requests)


@contextlib.contextmanager
def _gated_server(max_batch: int = 64):
    gate = _Gate()
    base = world_judges()
    judges = Judges(verifier=_GatedVerifier(base.verifier, gate), reflector=_CountedReflector(base.reflector, gate),
                    refiner=_CountedRefiner(base.refiner, gate), names=base.names)
    srv = JudgeServer(JudgeService(judges, batch=BatchOptions(max_batch=max_batch)))
    srv.start()
    try:
        yield srv, gate
    finally:
        gate.release.set()
        srv.shutdown()
        srv.server_close()


def _post_full(url: str, body) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def _through_the_gate(srv, gate, bodies: list[dict], waiting: dict[str, int]) -> list[tuple[int, dict, dict]]:
    """Hold the gate with one yes/no request, send bodies concurrently, open it once `waiting` are queued."""
    good, _ = _images()
    first = threading.Thread(target=_post_full, args=(srv.url, _chat(P.YESNO_USER.format(prompt=PROMPT), good)))
    first.start()
    assert gate.entered.wait(30)
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(_post_full, srv.url, b) for b in bodies]
        want = {k: n + (k == "verifier") for k, n in waiting.items()}  # + the request holding the gate
        batchers = srv.service.batchers
        for _ in range(3000):
            if all(batchers[k].waiting() == n for k, n in want.items()):
                break
            time.sleep(0.01)
        assert {k: batchers[k].waiting() for k in want} == want
        gate.release.set()
        out = [f.result() for f in futures]
    first.join()
    return out


def _mixed_bodies() -> list[dict]:
    """yes/no (with and without logprobs), score, reflect and refine requests over several prompts and images."""
    prompts = [PROMPT, "a photo of three triangles", "a photo of a ring left of a cross", "a photo of a green diamond"]
    bodies = []
    for i in range(16):
        prompt = prompts[i % 4]
        image = draw(parse_prompt(prompts[(i // 3) % 4]), i)[1]
        kind = i % 5
        if kind == 0:
            bodies.append(_chat(P.YESNO_USER.format(prompt=prompt), image, max_tokens=1, logprobs=True, top_logprobs=2))
        elif kind == 1:
            bodies.append(_chat(P.YESNO_USER.format(prompt=prompt), image))
        elif kind == 2:
            bodies.append(_chat(P.SCORE_USER.format(prompt=prompt), image))
        elif kind == 3:
            bodies.append(_chat(P.REFLECT_USER.format(original=prompt, current=prompt, previous="none",
                                                      evaluation="none"), image))
        else:
            bodies.append(_chat(P.REFINE_USER.format(original=prompt, current=prompt,
                                                     reflection="\n- Add one red circle.", evaluation="score 0.5")))
    return bodies


def _answer(reply: dict) -> tuple:
    choice = reply["choices"][0]
    return choice["message"]["content"], choice["logprobs"]


def test_concurrent_requests_form_batches_and_get_their_own_answers():
    bodies = _mixed_bodies()
    kinds = [("verifier", "verifier", "verifier", "reflector", "refiner")[i % 5] for i in range(len(bodies))]
    counts = {k: kinds.count(k) for k in ("verifier", "reflector", "refiner")}
    with _gated_server() as (srv, gate):
        together = _through_the_gate(srv, gate, bodies, counts)
        # One call per component for everything that waited: the gate's own call, then the batches.
        assert gate.sizes == {"verifier": [1, counts["verifier"]], "reflector": [counts["reflector"]],
                              "refiner": [counts["refiner"]]}
        assert [int(h["X-Batch-Size"]) for _, _, h in together] == [counts[k] for k in kinds]
        alone = [_post_full(srv.url, b) for b in bodies]  # sequential: one request per call
        assert all(int(h["X-Batch-Size"]) == 1 for _, _, h in alone)
        stats = srv.service.stats()
        assert stats["verifier"].calls == 2 + counts["verifier"] and stats["verifier"].split == 0
    assert all(code == 200 for code, _, _ in together + alone)
    assert [_answer(a) for _, a, _ in together] == [_answer(a) for _, a, _ in alone]


def test_max_batch_caps_the_batches():
    good, bad = _images()
    bodies = [_chat(P.YESNO_USER.format(prompt=PROMPT), good if i % 2 else bad) for i in range(7)]
    with _gated_server(max_batch=3) as (srv, gate):
        replies = _through_the_gate(srv, gate, bodies, {"verifier": 7})
    assert gate.sizes["verifier"] == [1, 3, 3, 1]
    assert [r["choices"][0]["message"]["content"] for _, r, _ in replies] == ["No", "Yes"] * 3 + ["No"]


def test_a_bad_request_fails_alone():
    good, bad = _images()
    q = P.YESNO_USER.format(prompt=PROMPT)
    bodies = [_chat(q, good), _chat(P.YESNO_USER.format(prompt="a photo of a cat"), good), _chat(q, bad),
              _chat(q), _chat(P.SCORE_USER.format(prompt=PROMPT), bad)]
    with _gated_server() as (srv, gate):
        # The body without an image is refused in its own thread and never joins the batch.
        replies = _through_the_gate(srv, gate, bodies, {"verifier": 4})
        alone = [_post_full(srv.url, b) for i, b in enumerate(bodies) if i in (0, 2, 4)]
        stats = srv.service.stats()["verifier"]
    # The batch of 4 raised (the oracle refuses the cat); each of its requests was then judged alone.
    assert gate.sizes["verifier"][:6] == [1, 4, 1, 1, 1, 1] and stats.split == 1
    codes = [code for code, _, _ in replies]
    assert codes == [200, 400, 200, 400, 200]
    assert "judge could not answer" in replies[1][1]["error"]["message"]
    assert "needs one image" in replies[3][1]["error"]["message"]
    assert [_answer(replies[i][1]) for i in (0, 2, 4)] == [_answer(a) for _, a, _ in alone]


def test_batcher_isolates_wrong_result_counts_and_refuses_after_close():
    lock = threading.Lock()
    b = Batcher("short", lambda items: items[1:], lock)  # always one result short
    with pytest.raises(RuntimeError, match="returned 0 results for 1 requests"):
        b(1)
    ok = Batcher("double", lambda items: [2 * x for x in items], lock, BatchOptions(max_batch=2, max_wait_ms=1))
    assert ok(21).result == 42
    ok.close()
    with pytest.raises(ServeError, match="shutting down"):
        ok(1)
    b.close()


@pytest.mark.parametrize("options, words", [
    (BatchOptions(max_batch=0), "max_batch must be an integer >= 1"),
    (BatchOptions(max_batch=2.5), "max_batch must be an integer >= 1"),
    (BatchOptions(max_wait_ms=-1), "max_wait_ms must be"),
    (BatchOptions(max_wait_ms=float("nan")), "max_wait_ms must be"),
    (BatchOptions(max_wait_ms=5000), "0..1000"),
])
def test_batch_options_are_validated(options, words):
    with pytest.raises(ServeError, match=words):
        JudgeService(world_judges(), batch=options)


def test_cli_refuses_bad_batch_flags(cli):
    for flags, words in [(["--max-batch", "0"], "--max-batch must be >= 1"),
                         (["--batch-wait-ms", "-5"], "--batch-wait-ms must be in 0..1000"),
                         (["--batch-wait-ms", "nan"], "--batch-wait-ms must be in 0..1000"),
                         (["--batch-wait-ms", "2000"], "got 2000")]:
        code, _, err = cli("serve", *flags)
        assert code == 2 and words in err and err.count("\n") == 1, err
