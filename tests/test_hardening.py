"""Faults and abuse: hostile clients of `serve`, a hostile VLM endpoint, crafted files, bad flags.

Everything listens on 127.0.0.1 and is bounded: a handful of sockets per test, short timeouts,
no test waits more than a few seconds.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import pickle
import socket
import struct
import tarfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from reflectionflow import components, engine, redact
from reflectionflow.backends.vlm import prompts as P
from reflectionflow.backends.vlm.client import ChatClient, ChatRequest
from reflectionflow.backends.vlm.judges import data_url
from reflectionflow.components import Verdict, Verifier
from reflectionflow.io import ImageError, decode_image, png_bytes
from reflectionflow.serve import JudgeServer, JudgeService, world_judges

PROMPT = "a photo of a red circle and a blue square"
FAKE_KEY = "sk-" + "test0123456789abcdefghijklmn"  # built, so no key-shaped literal is committed


# ----------------------------------------------------------------------------------------------
# Helpers


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with a tiny (truncated) image body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + \
        chunk(b"IEND", b"")


def chat(text: str, url: str | None = None, **extra) -> dict:
    content: list = [{"type": "text", "text": text}]
    if url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {"model": "reflectionflow-world", "messages": [{"role": "user", "content": content}], **extra}


def raw_request(port: int, data: bytes, timeout: float = 5.0, shut: bool = False) -> tuple[int, dict, float]:
    """Send raw bytes; (status, JSON body, seconds until the answer)."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            try:
                part = s.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            got += part
            if b"\r\n\r\n" in got:
                head, _, body = got.partition(b"\r\n\r\n")
                n = int(next((ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(
                    b"content-length")), b"0"))
                if len(body) >= n:
                    break
    elapsed = time.perf_counter() - t0
    head, _, body = got.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head else 0
    return status, json.loads(body) if body else {}, elapsed


def post(path: str, body: bytes, headers: dict | None = None) -> bytes:
    h = {"Host": "x", "Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
    return (f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n").encode() + body


@pytest.fixture(scope="module")
def service():
    svc = JudgeService(world_judges("world-oracle", "world-oracle", no_refiner=True))
    yield svc
    svc.close()


def _stop(srv) -> None:
    srv.shutdown()
    # the service is shared by the module's servers: close only the socket, the watchdog and the pool
    srv.socket.close()
    srv._closing.set()
    srv._pool.close()


@pytest.fixture(scope="module")
def shared(service):
    srv = JudgeServer(service)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv
    _stop(srv)


@pytest.fixture
def make_server(service, shared):
    servers = []

    def make(**kw):
        if not kw:
            return shared
        srv = JudgeServer(service, **kw)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        _stop(srv)


def port_of(srv) -> int:
    return srv.server_address[1]


# ----------------------------------------------------------------------------------------------
# serve: hostile requests get a 4xx JSON error


def test_serve_refuses_a_huge_image_before_decoding_it(make_server):
    srv = make_server()
    url = "data:image/png;base64," + base64.b64encode(bomb_png(12000, 12000)).decode()
    body = json.dumps(chat(P.YESNO_USER.format(prompt=PROMPT), url)).encode()
    status, answer, seconds = raw_request(port_of(srv), post("/v1/chat/completions", body))
    assert status == 413 and "12000x12000 pixels, over the cap" in answer["error"]["message"]
    assert seconds < 2
    url = "data:image/png;base64," + base64.b64encode(bomb_png(20000, 20000)).decode()
    status, answer, _ = raw_request(port_of(srv), post("/v1/chat/completions", json.dumps(
        chat(P.YESNO_USER.format(prompt=PROMPT), url)).encode()))
    assert status == 413 and answer["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("length, status, words", [
    ("abc", 400, "Content-Length must be one decimal number"),
    ("-1", 400, "Content-Length must be one decimal number"),
    ("1e3", 400, "Content-Length must be one decimal number"),
    (str(10**12), 413, "over the cap"),
])
def test_serve_answers_a_bad_content_length(make_server, length, status, words):
    srv = make_server()
    data = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{{}}").encode()
    got, answer, _ = raw_request(port_of(srv), data)
    assert got == status and words in answer["error"]["message"]


@pytest.mark.parametrize("body, words", [
    (chat("x") | {"messages": [{"role": "user", "content": ["not an object"]}]}, "must be an object"),
    (chat("x") | {"messages": [{"role": "user", "content": 7}]}, "must be text or a list"),
    ({"messages": "nope"}, "messages must be a non-empty list"),
    ([1, 2], "the body must be a JSON object"),
    (chat(P.YESNO_USER.format(prompt=PROMPT), "data:image/png;base64,!!!!"), "readable image"),
    (chat(P.YESNO_USER.format(prompt=PROMPT), "http://example.com/a.png"), "data: URL"),
    (chat(P.YESNO_USER.format(prompt=PROMPT), "data:image/png;base64,AAAA", logprobs=True, top_logprobs="abc"),
     "top_logprobs must be an integer"),
])
def test_serve_answers_malformed_bodies_with_json_errors(make_server, body, words):
    srv = make_server()
    status, answer, _ = raw_request(port_of(srv), post("/v1/chat/completions", json.dumps(body).encode()))
    assert status == 400 and words in answer["error"]["message"], answer


def test_serve_refuses_other_framings(make_server):
    srv = make_server()
    port = port_of(srv)
    status, answer, _ = raw_request(port, post("/v1/chat/completions", b"{not json"))
    assert status == 400 and "not JSON" in answer["error"]["message"]
    status, answer, _ = raw_request(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 411
    chunked = b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    status, _, _ = raw_request(port, chunked)
    assert status == 411
    status, answer, _ = raw_request(port, b"GARBAGE\r\n\r\n")
    assert status == 400 and "error" in answer
    status, answer, _ = raw_request(port, post("/v1/nowhere", b"{}"))
    assert status == 404


def test_serve_checks_the_key_before_reading_the_body(make_server):
    srv = make_server(api_key="right-key-123", request_timeout=5.0)
    # Headers announce a 10 MB body that never comes: the wrong key is answered at once.
    data = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n" \
           b"Content-Length: 10000000\r\n\r\n"
    status, answer, seconds = raw_request(port_of(srv), data)
    assert status == 401 and answer["error"]["message"] == "missing or wrong API key" and seconds < 1.0


def test_serve_cuts_slow_drips_and_idle_connections_and_bounds_its_threads(make_server):
    srv = make_server(workers=3, backlog=2, request_timeout=0.6, idle_timeout=0.4)
    port = port_of(srv)
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(12)]
    time.sleep(0.2)
    assert threading.active_count() <= before + 1  # a fixed pool: no thread per connection
    # beyond the 3 workers and 2 queue places: 503 at once, as JSON
    answers = []
    for s in idle[5:]:
        s.settimeout(2)
        try:
            answers.append(s.recv(4096))
        except OSError:
            answers.append(b"")
    assert sum(b" 503 " in a and b"busy" in a for a in answers) >= 5
    # the held ones are dropped at their idle deadline: a real request is served again
    time.sleep(0.8)
    status, answer, _ = raw_request(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and answer["data"][0]["id"] == "reflectionflow-world"
    for s in idle:
        s.close()
    # a drip (one header byte every 0.1 s: never idle) is cut at the request deadline with a 408
    t0 = time.perf_counter()
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as drip:
        drip.setblocking(False)
        try:
            for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + b"x" * 100:
                drip.send(bytes([byte]))
                time.sleep(0.1)
                try:
                    got += drip.recv(4096)
                except BlockingIOError:
                    pass
                if got:
                    break
        except OSError:
            pass
    assert b" 408 " in got and b"did not arrive within 0.6 s" in got
    assert time.perf_counter() - t0 < 2.0
    assert srv.cut >= 1 and srv.refused >= 5


def test_serve_still_answers_good_requests(make_server):
    from reflectionflow.world.render import draw
    from reflectionflow.world.spec import parse_prompt

    srv = make_server()
    image = draw(parse_prompt(PROMPT), 1)[1]
    body = json.dumps(chat(P.YESNO_USER.format(prompt=PROMPT), data_url(image), max_tokens=1)).encode()
    status, answer, _ = raw_request(port_of(srv), post("/v1/chat/completions", body))
    assert status == 200 and answer["choices"][0]["message"]["content"] == "Yes"


# ----------------------------------------------------------------------------------------------
# The VLM client against a hostile endpoint


class _Endpoint(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    reply: dict | bytes = {}
    status = 200
    drip = 0.0

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        payload = self.reply if isinstance(self.reply, bytes) else json.dumps(self.reply).encode()
        try:
            self.send_response(self.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.drip:
                for b in payload:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(self.drip)
            else:
                self.wfile.write(payload)
        except OSError:
            pass


@pytest.fixture
def endpoint():
    servers = []

    def make(reply, status=200, drip=0.0):
        handler = type("H", (_Endpoint,), {"reply": reply, "status": status, "drip": drip})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/v1"

    yield make
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _answer(**over) -> dict:
    a = {"choices": [{"message": {"content": "Yes"}, "logprobs": None}],
         "usage": {"prompt_tokens": 10, "completion_tokens": 1}}
    a.update(over)
    return a


@pytest.mark.parametrize("reply, words", [
    (_answer(usage={"prompt_tokens": "lots", "completion_tokens": 1}), "usage.prompt_tokens is not a token count"),
    (_answer(usage=[1, 2]), "usage is not an object"),
    (_answer(choices=[{"message": {"content": "Yes"}, "logprobs": {"content": ["Yes"]}}]), "is not an object"),
    (_answer(choices=[{"message": {"content": "Yes"}, "logprobs": {"content": [{"token": "Yes", "logprob": "x",
                                                                                 "top_logprobs": []}]}}]),
     "logprobs entries must be objects"),
    (_answer(choices=[{"message": {"content": "Yes"}, "logprobs": 5}]), "logprobs is not an object"),
    (_answer(choices="nope"), "no choices[0].message.content"),
    pytest.param(b"[" * 100000, "not JSON", id="deeply-nested-json"),
])
def test_every_unparsable_answer_is_a_counted_failed_call(endpoint, reply, words):
    client = ChatClient(endpoint(reply), "m", retries=1, backoff=0, timeout=5)
    (result,) = client.complete([ChatRequest(messages=[{"role": "user", "content": "hi"}], logprobs=True)])
    assert result.text is None and words in result.error and result.attempts == 2
    stats = client.stats.to_dict()
    assert stats["failures"] == 1 and stats["outcomes"] == {"malformed": 2}


def test_the_timeout_bounds_the_whole_call_not_each_read(endpoint):
    url = endpoint(_answer(), drip=0.05)  # a few hundred bytes at 20 bytes a second: seconds in all
    client = ChatClient(url, "m", retries=0, timeout=0.5)
    t0 = time.perf_counter()
    (result,) = client.complete([ChatRequest(messages=[{"role": "user", "content": "hi"}])])
    assert time.perf_counter() - t0 < 1.5
    assert result.error and "no answer within 0.5 s" in result.error
    assert client.stats.to_dict()["outcomes"] == {"timeout": 1}


def test_an_echoed_key_is_scrubbed_from_the_error(endpoint):
    url = endpoint({"error": {"message": f"Incorrect API key provided: {FAKE_KEY}. See your account."}}, status=401)
    client = ChatClient(url, "m", api_key="my-own-secret-key-42", retries=0)
    (result,) = client.complete([ChatRequest(messages=[{"role": "user", "content": "hi"}])])
    assert "HTTP 401" in result.error and FAKE_KEY not in result.error and "[redacted]" in result.error
    assert redact.scrub("x my-own-secret-key-42 y") == "x [redacted] y"


# ----------------------------------------------------------------------------------------------
# Redaction and the exit code of a run whose every judge call failed


class _Refusing(Verifier):
    """Every verdict an error that echoes a key, as OpenAI's 401 does."""

    def score(self, images, prompts):
        return [Verdict(score=0.0, error=f"HTTP 401: Incorrect API key provided: {FAKE_KEY}") for _ in images]


components.register("verifier", "test-refusing", "always fails")(lambda **_: _Refusing())


def test_a_run_whose_every_verifier_call_failed_exits_3_and_keeps_no_key(cli, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = cli("generate", "a photo of a ring", "--verifier", "test-refusing", "--method", "noise",
                            "--budget", "2", "--out", out, "--quiet")
    assert code == 3 and "every verifier request failed (2 of 2)" in err and len(err.strip().splitlines()) == 1
    for name in ("00000/trace.jsonl", "report.html", "ledger.json", "00000/done.json"):
        text = (out / name).read_text()
        assert FAKE_KEY not in text, name
    assert "[redacted]" in (out / "00000/trace.jsonl").read_text()


def test_scrub_leaves_ordinary_text_alone():
    text = 'a desk-lamp left of a task; {"api_key_env": "OPENAI_API_KEY", "n": 3}'
    assert redact.scrub(text) == text
    assert redact.scrub("Authorization: Bearer abcdefgh1234") == "Authorization: Bearer [redacted]"
    assert redact.scrub("token hf_abcdefghijklmnopqrstu here") == "token [redacted] here"


# ----------------------------------------------------------------------------------------------
# Checkpoints: nothing is unpickled


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_file_runs_nothing(tmp_path):
    from reflectionflow.train.loop import load_plain

    marker = tmp_path / "pwned"
    path = tmp_path / "optimizer.pt"
    with open(path, "wb") as f:
        pickle.dump({"state": _Payload(str(marker))}, f)
    with pytest.raises(ValueError, match="not loadable as tensors and plain data") as e:
        load_plain(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_rng_state_round_trips_through_weights_only(tmp_path):
    import random

    from reflectionflow.train.loop import _rng_state, _set_rng_state, load_plain

    np.random.seed(5)
    random.seed(5)
    torch.manual_seed(5)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.save({"rng": _rng_state()}, tmp_path / "rank_0.pt")
    want = (random.random(), np.random.standard_normal(), torch.rand(1).item())
    _set_rng_state(load_plain(tmp_path / "rank_0.pt")["rng"])
    assert (random.random(), np.random.standard_normal(), torch.rand(1).item()) == want


# ----------------------------------------------------------------------------------------------
# The one image decoder


def test_decoder_caps_and_names(tmp_path):
    with pytest.raises(ImageError, match=r"shard-3/good_image: 12000x12000 pixels, over the cap"):
        decode_image(bomb_png(12000, 12000), "shard-3/good_image")
    with pytest.raises(ImageError, match="over the cap of 10 bytes"):
        decode_image(png_bytes(np.zeros((4, 4, 3), np.uint8)), "x", max_bytes=10)
    with pytest.raises(ImageError, match="x.png: not a readable PNG, JPEG or WebP"):
        decode_image(b"GIF89a" + b"\0" * 64, "x.png")
    img = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    assert np.array_equal(decode_image(png_bytes(img), "ok"), img)


def test_genref_skips_bombs_and_empty_prompts_naming_shard_and_sample(tmp_path):
    from reflectionflow.data.genref import EMPTY_TEXT, UNDECODABLE_IMAGE, ReadStats, iter_genref
    from reflectionflow.train.corrector_common import describe_skips, skip_summary

    good = png_bytes(np.zeros((8, 8, 3), np.uint8))
    shard = tmp_path / "shard-000.tar"
    samples = {"s0": ("a cat", good), "s1": ("", good), "s2": ("a dog", bomb_png(12000, 12000))}
    with tarfile.open(shard, "w") as tar:
        for key, (prompt, image) in samples.items():
            for name, data in (("good_image.png", image), ("bad_image.png", good), ("prompt.txt", prompt.encode()),
                               ("reflection.txt", b"fix it"), ("subset.txt", b"editing")):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    stats = ReadStats()
    got = list(iter_genref(str(shard), stats=stats))
    assert [s.key for s in got] == ["s0"]
    assert stats.corrupt == {EMPTY_TEXT: 1, UNDECODABLE_IMAGE: 1}
    assert {(i["key"], i["reason"]) for i in stats.corrupt_items} == {("s1", EMPTY_TEXT), ("s2", UNDECODABLE_IMAGE)}
    line = describe_skips("GenRef training data", skip_summary(stats))
    assert "skipped 2 unreadable sample(s)" in line and f"shard {shard} sample s1: empty_text" in line


# ----------------------------------------------------------------------------------------------
# One-line errors that name the file or flag


@pytest.fixture
def no_models(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("components were built before the input was checked")

    monkeypatch.setattr(engine, "build_components", refuse)


def _one_line(code, err, *words):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, words", [
    (["generate", "a photo of a ring", "--budget", "1000000000"], ["--budget", "1..4096", "1000000000"]),
    (["generate", "a photo of a ring", "--prompt-batch", "99999999"], ["--prompt-batch", "1..4096"]),
    (["generate", "a photo of a ring", "--out", "/sys/reflectionflow-ro"], ["--out /sys/reflectionflow-ro",
                                                                            "cannot write"]),
    (["generate", "a photo of a ring", "--resume", "--out", "{tmp}/missing"], ["--resume", "no such run folder"]),
    (["sweep", "--prompts", "geneval-shapes", "--budget", "4", "--resume", "--out", "{tmp}/missing"],
     ["--resume", "no such sweep folder"]),
    (["compare", "{tmp}/a", "{tmp}/b", "--out", "{tmp}/file.txt"], ["--out", "file.txt", "not a folder"]),
    (["train", "world-generator", "--out", "{tmp}/t", "--device", "tpu9"], ["--device 'tpu9'", "auto, cpu"]),
    (["train", "world-generator", "--out", "{tmp}/missing", "--resume"], ["--resume", "no such run folder"]),
])
def test_bad_flags_are_one_line_errors_before_any_model_loads(cli, no_models, tmp_path, argv, words):
    if argv[-1] == "/sys/reflectionflow-ro" and os.access("/sys", os.W_OK) and os.geteuid() != 0:
        pytest.skip("/sys is writable here")
    (tmp_path / "file.txt").write_text("x")
    code, _, err = cli(*[a.replace("{tmp}", str(tmp_path)) for a in argv])
    _one_line(code, err, *words)


def test_a_long_prompt_is_cut_in_the_error(cli, no_models):
    prompt = "a photo of a " + "very " * 2000 + "purple dog"
    code, _, err = cli("generate", prompt)
    _one_line(code, err)
    assert len(err) < 1200


def _small_run(cli, out: Path, method: str = "reflection") -> None:
    code, _, err = cli("generate", "a photo of a red circle", "--method", method, "--budget", "4", "--out", out,
                       "--quiet")
    assert code == 0, err


def test_report_on_a_trace_with_a_malformed_line(cli, tmp_path):
    out = tmp_path / "run"
    _small_run(cli, out)
    trace = out / "00000" / "trace.jsonl"
    lines = trace.read_text().splitlines()
    lines.insert(1, '["not", "a", "record"]')
    trace.write_text("\n".join(lines) + "\n")
    before = trace.read_bytes()
    code, _, err = cli("report", out)
    _one_line(code, err, f"{trace}: line 2 is not a trace record")
    assert trace.read_bytes() == before  # nothing cut


def test_resume_with_a_corrupt_image_names_it(cli, tmp_path):
    out = tmp_path / "run"
    _small_run(cli, out)
    (out / "00000" / "done.json").unlink()
    for p in (out / "00000" / "images").glob("*.png"):
        p.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, _, err = cli("generate", "a photo of a red circle", "--method", "reflection", "--budget", "4", "--out",
                       out, "--quiet", "--resume")
    _one_line(code, err, "images/", ".png: not a readable PNG, JPEG or WebP image")


# ----------------------------------------------------------------------------------------------
# A resumed run selects exactly as an uninterrupted one


def test_scores_read_back_from_the_trace_are_exact():
    from reflectionflow.engine.candidates import Candidate, best

    def cand(i: int, score: float) -> Candidate:
        return Candidate(id=f"n{i:04d}", order=i, kind="noise", chain=0, round=0, seed=i, prompt="p",
                         verdict=Verdict(score=score, yes=True, details={"p": score}), file=f"images/n{i:04d}.png")

    # two scores that agree to 6 decimals: rounded, the first would win the tie
    made = [cand(0, 0.7000001234), cand(1, 0.7000003999)]
    back = [Candidate.from_record(json.loads(json.dumps(c.to_record()))) for c in made]
    assert [c.score for c in back] == [c.score for c in made]
    assert back[0].verdict.details == made[0].verdict.details
    assert best(back).id == best(made).id == "n0001"
