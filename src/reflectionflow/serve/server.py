"""An OpenAI-compatible HTTP endpoint in front of registered judges (by default the world's).

    GET  /v1/models             the one model this server answers as
    POST /v1/chat/completions   OpenAI chat format; images as data: URLs (base64 PNG/JPEG)

The task of a request is read from its text (`backends.vlm.prompts.task_of`), so the project's
VLM components, and any tool that writes the same first line, get:
  yes/no   -> "Yes"/"No" from the verifier; with `logprobs` the first token's top_logprobs carry
              P(yes) (yes-verdicts above 0.5, ordered by the verifier's score)
  score    -> the JSON object of the 0-10 score schema
  reflect  -> the reflector's edit commands, one "- " line each (also for the released reflection
              generator's message)
  refine   -> the refiner's prompt (the current prompt unchanged when no refiner is served)
Images of another size are resized to the world's 64x64 (box filter) before judging.

Standard library only (http.server; no HTTP server library is among the project's dependencies,
and the one route needs none); it listens on 127.0.0.1 unless told otherwise.

Hostile clients (docs/security.md). Connections are served by a bounded pool of `workers` threads;
at most `backlog` more wait for one, and a connection beyond that is answered 503 at once. Each
request must arrive whole (request line, headers and body) within `request_timeout` seconds and
each read within `idle_timeout` (a watchdog shuts the socket of a late one: slow drips and
half-open connections are cut). The API key is checked from the headers, before the body is read;
Content-Length must be a decimal number up to MAX_BODY. Every request the server refuses gets a
4xx JSON error in the OpenAI shape, and an error inside the server a 500 one, never silence.
Images are decoded by `reflectionflow.io.decode_image` (its byte and pixel caps), at most
`DECODE_SLOTS` at a time.

Batching. Each component (verifier, reflector, refiner) sits behind a `Batcher`: a queue and one
worker thread. When the component is free, the worker takes every request waiting for it (at most
`BatchOptions.max_batch`; after the first it waits up to `max_wait_ms` for more, by default not at
all) and makes one batched call, then hands each request its own result, in order. One lock, shared
by the workers, still lets only one thread call any component at a time (the judges need no thread
safety, and torch models do not share the CPU with each other). yes/no and score requests share the
verifier's batches. Errors stay with the request that caused them:
  1. everything the server checks itself (JSON, messages, task, prompt line, image decoding) is
     checked in the request's own thread, before it joins a batch: a bad request never reaches one;
  2. when a batched call raises (a judge refusing one input, e.g. the oracle on a prompt outside the
     world), the worker calls the component again for each request of that batch alone, so each gets
     the result or the error it would have got unbatched.
Answers are those of unbatched calls wherever the component is batch-invariant (the oracle judges:
bitwise); a learned torch model's P(yes) may move in its last bits (about 1e-7) with its batch-mates,
as any batched model's does. `max_batch=1` gives one request per call. Each answer carries the size
of the batch that answered it in an `X-Batch-Size` header (benchmarks/serve_throughput.py reads it).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import numpy as np

from .. import redact
from ..backends.vlm import prompts as P
from ..components import PromptRefiner, RefineRequest, ReflectionRequest, Reflector, Verdict, Verifier
from ..io import MAX_IMAGE_BYTES, ImageError
from ..io import decode_image as _decode
from ..runtime import is_int, is_number

WORLD_SIZE = 64
MAX_BODY = 16 * 1024 * 1024  # one request's body at most: a FLUX-size PNG is about 2 MB
# Image decodes at once (CPU-bound: more than the cores only multiplies the memory held).
DECODE_SLOTS = max(1, min(4, os.cpu_count() or 1))
_decodes = threading.BoundedSemaphore(DECODE_SLOTS)
MAX_TOP_LOGPROBS = 20  # OpenAI's own limit


class ServeError(ValueError):
    """A request the server cannot answer (becomes an HTTP error with an OpenAI-style body)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Judges:
    verifier: Verifier
    reflector: Reflector
    refiner: PromptRefiner | None = None
    names: dict[str, str] | None = None  # kind -> registry name, for /v1/models


def decode_image(url: str, size: int | None = WORLD_SIZE) -> np.ndarray:
    """A data: URL -> (H, W, 3) uint8, resized to size x size when it differs (io.decode_image's caps)."""
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise ServeError("image_url must be a data: URL with base64 content (this server fetches nothing)")
    payload = url.split(";base64,", 1)[1]
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ServeError(f"image_url: over the cap of {MAX_IMAGE_BYTES} bytes for one image", status=413)
    try:
        raw = base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as e:
        raise ServeError(f"image_url is not valid base64 ({e})") from None
    with _decodes:
        try:
            return _decode(raw, "image_url", size=size)
        except ImageError as e:
            over = "over the cap" in str(e)
            raise ServeError(str(e) if over else f"image_url does not hold a readable image ({e})",
                             status=413 if over else 400) from None


def _content(messages) -> tuple[str, list[str]]:
    """All text of the user messages, and the image URLs, in order."""
    if not isinstance(messages, list) or not messages:
        raise ServeError("messages must be a non-empty list")
    texts, images = [], []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ServeError("each message needs a role of system, user or assistant")
        if m["role"] != "user":
            continue
        c = m.get("content")
        if isinstance(c, str):
            texts.append(c)
        elif isinstance(c, list):
            for part in c:
                if not isinstance(part, dict):
                    raise ServeError("each part of a message's content must be an object with a type "
                                     f"(text or image_url), got {type(part).__name__}")
                if part.get("type") == "text":
                    texts.append(str(part.get("text", "")))
                elif part.get("type") == "image_url":
                    iu = part.get("image_url")
                    images.append(iu.get("url", "") if isinstance(iu, dict) else str(iu))
        elif c is not None:
            raise ServeError(f"a message's content must be text or a list of parts, got {type(c).__name__}")
    return "\n".join(texts), images


def _p_yes(score: float, yes: bool | None) -> float:
    """A verdict as P(yes): yes-verdicts in (0.5, 1], ordered by score; clamped so log is finite."""
    s = min(max(float(score), 0.0), 1.0) if math.isfinite(score) else 0.0
    p = s if yes is None else (0.5 + 0.5 * s if yes else 0.5 * s)
    return min(max(p, 1e-6), 1 - 1e-6)


MAX_WAIT_MS = 1000  # a longer wait only delays answers: the judges batch whatever is waiting anyway


@dataclass
class BatchOptions:
    """How concurrent requests for one component are merged into one call."""

    max_batch: int = 64  # requests in one component call at most (1: no batching)
    max_wait_ms: float = 0.0  # after a batch's first request, wait this long for more (0: take what is waiting)

    def check(self) -> None:
        if not is_int(self.max_batch, 1):
            raise ServeError(f"max_batch must be an integer >= 1 (1: no batching), got {self.max_batch!r}")
        wait = self.max_wait_ms
        if not is_number(wait, 0, MAX_WAIT_MS):
            raise ServeError(f"max_wait_ms must be a number of milliseconds in 0..{MAX_WAIT_MS}, got {wait!r}")


@dataclass
class BatchStats:
    calls: int = 0  # component calls made (a batch that raised, and its re-runs one by one, included)
    requests: int = 0  # requests answered (with a result or an error)
    split: int = 0  # batched calls that raised and were re-run one request at a time

    @property
    def mean_batch(self) -> float:
        return self.requests / self.calls if self.calls else 0.0


@dataclass
class Batched:
    """One request's own result, and the size of the component call that produced it."""

    result: Any
    batch: int


_STOP = object()


class Batcher:
    """A component behind a queue and one worker thread: whatever waits when it is free is one call.

    `call` takes a list of items and returns one result per item, in order (the components' own
    interface). `lock` is held around every call; share it between batchers so that only one thread
    calls any component at a time.
    """

    def __init__(self, name: str, call: Callable[[list], Sequence], lock: threading.Lock,
                 options: BatchOptions | None = None):
        self.name = name
        self.options = options or BatchOptions()
        self.options.check()
        self.stats = BatchStats()
        self._call = call
        self._lock = lock
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._state = threading.Lock()  # orders submit() against close(): nothing queued after _STOP
        self._closed = False
        self._waiting = 0
        self._worker = threading.Thread(target=self._run, name=f"reflectionflow-serve-{name}", daemon=True)
        self._worker.start()

    def __call__(self, item) -> Batched:
        """Queue one item and wait for its own result (a component's exception is raised here)."""
        future: Future = Future()
        with self._state:
            if self._closed:
                raise ServeError(f"the server is shutting down ({self.name} closed)", status=503)
            self._queue.put((item, future))
            self._waiting += 1
        try:
            return future.result()
        finally:
            with self._state:
                self._waiting -= 1

    def waiting(self) -> int:
        """Requests queued or in a call, not yet answered (tests wait on it)."""
        with self._state:
            return self._waiting

    def close(self) -> None:
        """Answer what is queued, then stop the worker."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._worker.join()

    def _gather(self, batch: list, wait_s: float) -> bool:
        """Add waiting requests to batch, up to max_batch, waiting at most wait_s; True at _STOP."""
        deadline = time.monotonic() + wait_s
        while len(batch) < self.options.max_batch:
            left = deadline - time.monotonic()
            try:
                entry = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                return False
            if entry is _STOP:
                return True
            batch.append(entry)
        return False

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = self._gather(batch, self.options.max_wait_ms / 1000)
            with self._lock:
                if not stop:  # what arrived while another component held the lock joins too
                    stop = self._gather(batch, 0.0)
                self._answer(batch)
            if stop:
                return

    def _answer(self, batch: list) -> None:
        items = [item for item, _ in batch]
        self.stats.calls += 1
        try:
            results = list(self._call(items))
            if len(results) != len(items):
                raise RuntimeError(f"{self.name} returned {len(results)} results for {len(items)} requests")
        except Exception as e:
            if len(batch) > 1:
                # One input the component refuses must not fail its batch-mates: each alone gets
                # what it would have got unbatched.
                self.stats.split += 1
                for entry in batch:
                    self._answer([entry])
                return
            self.stats.requests += 1
            batch[0][1].set_exception(e)
            return
        self.stats.requests += len(batch)
        for (_, future), result in zip(batch, results):
            future.set_result(Batched(result, len(batch)))


@dataclass
class Answer:
    """A chat completion and the size of the component call behind it (0: no component called)."""

    response: dict
    batch: int = 0


@dataclass
class _Job:
    """A request checked and decoded in its own thread, ready to join a batch."""

    task: str
    text: str
    urls: list[str]
    fields: dict[str, str]
    prompt: str
    image: np.ndarray | None


class JudgeService:
    """Chat requests -> the judges' answers; one Batcher per component, one lock for all of them.

    Its worker threads run until `close()` (JudgeServer.server_close() calls it).
    """

    def __init__(self, judges: Judges, model_name: str = "reflectionflow-world", batch: BatchOptions | None = None):
        self.judges = judges
        self.model_name = model_name
        self.batch = batch or BatchOptions()
        self.batch.check()
        self._lock = threading.Lock()  # one component call at a time, whichever component
        self.batchers: dict[str, Batcher] = {
            "verifier": Batcher("verifier", self._verify, self._lock, self.batch),
            "reflector": Batcher("reflector", lambda reqs: self.judges.reflector.reflect(reqs), self._lock, self.batch),
        }
        if judges.refiner is not None:
            self.batchers["refiner"] = Batcher("refiner", lambda reqs: self.judges.refiner.refine(reqs), self._lock,
                                               self.batch)

    def _verify(self, items: list[tuple[np.ndarray, str]]) -> list[Verdict]:
        return self.judges.verifier.score([image for image, _ in items], [prompt for _, prompt in items])

    def close(self) -> None:
        for b in self.batchers.values():
            b.close()

    def stats(self) -> dict[str, BatchStats]:
        return {name: b.stats for name, b in self.batchers.items()}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "reflectionflow",
                                            "judges": self.judges.names or {}}]}

    def complete(self, body: dict) -> dict:
        return self.answer(body).response

    def answer(self, body: dict) -> Answer:
        """1. check and decode (this thread); 2. the component's batched call; 3. the reply."""
        job = self._check(body)
        batch = 0
        logprobs = None
        if job.task in ("yesno", "score"):
            done = self.batchers["verifier"]((job.image, job.prompt))
            v: Verdict = done.result
            batch = done.batch
            p = _p_yes(v.score, v.yes)
            if job.task == "yesno":
                answer = "Yes" if p >= 0.5 else "No"
                if body.get("logprobs"):
                    alts = [{"token": "Yes", "logprob": math.log(p)}, {"token": "No", "logprob": math.log(1 - p)}]
                    alts.sort(key=lambda a: -a["logprob"])
                    k = body.get("top_logprobs") or 0
                    logprobs = {"content": [{"token": answer, "logprob": math.log(p if answer == "Yes" else 1 - p),
                                             "top_logprobs": alts[: max(k, 1)] if k else []}]}
            else:
                grade = int(round(10 * p))
                reason = str((v.details or {}).get("reason") or ("matches" if p >= 0.5 else "does not match"))
                answer = json.dumps({"objects": grade, "attributes": grade, "relations": grade,
                                     "overall": grade, "explanation": reason})
        elif job.task == "reflect":
            req = ReflectionRequest(image=job.image, original_prompt=job.prompt,
                                    current_prompt=job.fields.get("current prompt", job.prompt),
                                    previous_reflection=job.fields.get("previous edit commands"))
            done = self.batchers["reflector"](req)
            batch = done.batch
            answer = done.result.text
        else:
            current = job.fields.get("current prompt", job.prompt)
            if "refiner" not in self.batchers:
                answer = current
            else:
                reflection_text = job.fields.get("edit commands for the last image")
                req = RefineRequest(original_prompt=job.prompt, current_prompt=current,
                                    reflection=None if reflection_text in (None, "none") else reflection_text,
                                    image=job.image)
                done = self.batchers["refiner"](req)
                batch = done.batch
                answer = done.result.text or current
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and max_tokens == 1 and job.task == "yesno":
            answer = answer.split()[0]
        prompt_tokens = len(job.text.split()) + 85 * len(job.urls)  # a rough count, like a small VLM's (85 per image)
        completion_tokens = max(1, len(answer.split()))
        response = {
            "id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop",
                         "logprobs": logprobs}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }
        return Answer(response, batch)

    def _check(self, body) -> _Job:
        """Everything the server can refuse by itself, before the request joins a batch."""
        if not isinstance(body, dict):
            raise ServeError("the body must be a JSON object")
        k = body.get("top_logprobs")
        if k is not None and not is_int(k, 0, MAX_TOP_LOGPROBS):
            raise ServeError(f"top_logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}, got {str(k)[:40]!r}")
        text, urls = _content(body.get("messages"))
        fields = P.parse_fields(text)
        task = P.task_of(text)
        if task is None:
            raise ServeError("unrecognised task: the user message must start with one of the task lines of "
                             "reflectionflow.backends.vlm.prompts (yes/no, score, reflect, refine)")
        prompt = fields.get("prompt")
        if not prompt:
            raise ServeError('no `Prompt: "..."` line in the user message')
        if task != "refine" and not urls:
            raise ServeError(f"the {task} task needs one image (an image_url part)")
        image = decode_image(urls[-1]) if urls else None
        return _Job(task=task, text=text, urls=urls, fields=fields, prompt=prompt, image=image)


# A hook may replace an answer (tests inject faults with it): (path, body) -> None to answer
# normally, or (status, payload bytes, delay seconds) to send instead.
Hook = Callable[[str, dict | None], tuple[int, bytes, float] | None]


class _Refused(Exception):
    """A request answered with an error before its body was read: the connection closes after it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    server: JudgeServer
    protocol_version = "HTTP/1.1"

    def setup(self):
        self.timeout = self.server.idle_timeout  # every read: StreamRequestHandler sets it on the socket
        super().setup()

    def handle_one_request(self):
        # The whole request (line, headers, body) must arrive by the deadline; the watchdog cuts it off.
        self._answered = False
        self.server.watch(self.connection, self.server.request_timeout)
        try:
            super().handle_one_request()
            if not self._answered and self.server.expired(self.connection):
                self._error(408, f"the request did not arrive within {self.server.request_timeout:g} s", close=True)
        except OSError:
            self.close_connection = True
        finally:
            self.server.unwatch(self.connection)

    def log_message(self, fmt, *args):  # quiet by default; the CLI turns logging on
        if self.server.log:
            super().log_message("%s", redact.scrub(fmt % args))

    def _send(self, status: int, payload: bytes, content_type: str = "application/json", extra: dict | None = None):
        self._answered = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.write(payload)
        except OSError:  # the client gave up (its timeout), or the watchdog cut it
            self.close_connection = True

    def _error(self, status: int, message: str, close: bool = False):
        if close:
            self.close_connection = True
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send(status, json.dumps({"error": {"message": message, "type": kind}}).encode())

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a bad request line, headers too long): JSON, like the rest."""
        self.close_connection = True
        if self.server.expired(self.connection):  # the watchdog cut the request short: that is the error
            code, message = 408, f"the request did not arrive within {self.server.request_timeout:g} s"
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.1"  # answer with a status line and headers: nobody speaks 0.9
        try:
            self._error(code, message or self.responses.get(code, ("error",))[0], close=True)
        except OSError:
            pass

    def _authorised(self) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        if self.headers.get("Authorization", "") == f"Bearer {key}":
            return True
        raise _Refused(401, "missing or wrong API key")

    def _hooked(self, body) -> bool:
        if self.server.hook is None:
            return False
        action = self.server.hook(self.path, body)
        if action is None:
            return False
        status, payload, delay = action
        if delay:
            time.sleep(delay)
        extra = {"Retry-After": "0"} if status == 429 else None
        self._send(status, payload, extra=extra)
        return True

    def _body(self) -> bytes:
        """The body, after the key and the Content-Length were checked; _Refused otherwise."""
        self._authorised()
        if self.headers.get("Transfer-Encoding"):
            raise _Refused(411, "send the body with a Content-Length (chunked bodies are not read)")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise _Refused(411, "a POST needs a Content-Length header")
        text = values[0].strip()
        if len(set(v.strip() for v in values)) > 1 or not text.isascii() or not text.isdigit() or len(text) > 20:
            raise _Refused(400, f"Content-Length must be one decimal number of bytes, got {text[:40]!r}")
        length = int(text)
        if length > self.server.max_body:
            raise _Refused(413, f"request body of {length} bytes is over the cap of {self.server.max_body} bytes")
        chunks, left = [], length
        while left > 0:
            late = False
            try:
                chunk = self.rfile.read(min(left, 1 << 20))
            except OSError as e:
                chunk, late = b"", isinstance(e, TimeoutError)
            if not chunk:
                raise _Refused(408 if late or self.server.expired(self.connection) else 400,
                               f"the body ended after {length - left} of {length} bytes "
                               f"(each request must arrive within {self.server.request_timeout:g} s)")
            chunks.append(chunk)
            left -= len(chunk)
        self.server.unwatch(self.connection)  # the request is in: answering may take as long as it takes
        return b"".join(chunks)

    def _guarded(self, serve: Callable[[], None]) -> None:
        try:
            serve()
        except _Refused as e:
            self._error(e.status, str(e), close=True)
        except Exception as e:  # a bug must still answer, and not kill the worker
            self.server.errors += 1
            self._error(500, f"internal error ({type(e).__name__}); the request was not answered", close=True)
            if self.server.log:
                super().log_message("%s", redact.scrub(f"internal error: {type(e).__name__}: {e}"))

    def do_GET(self):
        self._guarded(self._get)

    def do_POST(self):
        self._guarded(self._post)

    def _get(self):
        self._authorised()
        self.server.unwatch(self.connection)
        if self._hooked(None):
            return
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send(200, json.dumps(self.server.service.models()).encode())
        else:
            self._error(404, f"no route {self.path[:200]}; try POST /v1/chat/completions")

    def _post(self):
        raw = self._body()
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, RecursionError):
            self._error(400, "the body is not JSON")
            return
        if self._hooked(body):
            return
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no route {self.path[:200]}; try POST /v1/chat/completions")
            return
        try:
            answer = self.server.service.answer(body)
        except ServeError as e:
            self._error(e.status, str(e))
            return
        except ValueError as e:  # a judge refusing its input (e.g. a prompt outside the world)
            self._error(400, f"the judge could not answer: {str(e)[:500]}")
            return
        self._send(200, json.dumps(answer.response).encode(), extra={"X-Batch-Size": str(answer.batch)})


class JudgeServer(HTTPServer):
    """The endpoint: a bounded pool of worker threads, per-request deadlines, one watchdog thread.

    workers: connections served at once; backlog: connections accepted and waiting for a worker
    (beyond both: 503 at once); request_timeout: seconds for a whole request to arrive;
    idle_timeout: seconds for any one read (also how long a kept-alive connection may sit idle).
    """

    # The kernel's queue of connections not yet accepted (socketserver's default of 5 overflows
    # under a few dozen clients: connections reset).
    request_queue_size = 128

    def __init__(self, service: JudgeService, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 hook: Hook | None = None, log: bool = False, workers: int = 64, backlog: int = 64,
                 request_timeout: float = 30.0, idle_timeout: float = 10.0, max_body: int = MAX_BODY):
        for name, v in (("workers", workers), ("backlog", backlog)):
            if not is_int(v, 1 if name == "workers" else 0):
                raise ServeError(f"{name} must be an integer >= {1 if name == 'workers' else 0}, got {v!r}")
        for name, v in (("request_timeout", request_timeout), ("idle_timeout", idle_timeout)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ServeError(f"{name} must be a positive number of seconds, got {v!r}")
        self.service = service
        self.api_key = api_key
        redact.register(api_key)
        self.hook = hook
        self.log = log
        self.workers, self.backlog = workers, backlog
        self.request_timeout, self.idle_timeout, self.max_body = request_timeout, idle_timeout, max_body
        self.refused = 0  # connections answered 503 because every worker and queue place was taken
        self.cut = 0  # requests the watchdog cut off at their deadline
        self.errors = 0  # requests answered 500
        self._slots = threading.BoundedSemaphore(workers + backlog)
        self._pool = _Pool(workers)
        self._watch_lock = threading.Lock()
        self._deadlines: dict[socket.socket, float] = {}
        self._expired: set[socket.socket] = set()
        self._closing = threading.Event()
        super().__init__((host, port), _Handler)
        self._watchdog = threading.Thread(target=self._watch_loop, name="reflectionflow-serve-watchdog", daemon=True)
        self._watchdog.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    # -- the bounded pool -----------------------------------------------------------------------
    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            _refuse(request)
            self.shutdown_request(request)
            return
        try:
            self._pool.submit(self._serve_one, request, client_address)
        except RuntimeError:  # the pool is closed: the server is stopping
            self._slots.release()
            self.shutdown_request(request)

    def _serve_one(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.unwatch(request)
            self._expired.discard(request)
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request, client_address):  # a dropped client is no traceback in the log
        if self.log:
            super().handle_error(request, client_address)

    # -- the watchdog -----------------------------------------------------------------------------
    def watch(self, sock: socket.socket, seconds: float) -> None:
        with self._watch_lock:
            self._deadlines[sock] = time.monotonic() + seconds

    def unwatch(self, sock: socket.socket) -> None:
        with self._watch_lock:
            self._deadlines.pop(sock, None)

    def expired(self, sock: socket.socket) -> bool:
        with self._watch_lock:
            return sock in self._expired

    def _watch_loop(self) -> None:
        tick = min(0.25, self.request_timeout / 4)
        while not self._closing.wait(tick):
            now = time.monotonic()
            with self._watch_lock:
                late = [s for s, t in self._deadlines.items() if t <= now]
                for s in late:
                    del self._deadlines[s]
                    self._expired.add(s)
            for s in late:
                self.cut += 1
                try:
                    s.shutdown(socket.SHUT_RD)  # the blocked read returns; an answer can still be written
                except OSError:
                    pass

    def server_close(self) -> None:
        super().server_close()
        self._closing.set()
        self._pool.close()
        self.service.close()

    def start(self) -> threading.Thread:
        """Serve in a daemon thread (tests, the GPU benchmark); `shutdown()` stops it."""
        t = threading.Thread(target=self.serve_forever, name="reflectionflow-serve", daemon=True)
        t.start()
        return t


class _Pool:
    """A fixed set of daemon worker threads over one queue (they never outlive the process)."""

    def __init__(self, workers: int):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"reflectionflow-serve-worker-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, fn, *args) -> None:
        if self._closed:
            raise RuntimeError("pool closed")
        self._queue.put((fn, args))

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            fn, args = job
            fn(*args)

    def close(self) -> None:
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)


_BUSY = json.dumps({"error": {"message": "the server is busy (every worker and queue place is taken); "
                              "retry later", "type": "server_error"}}).encode()


def _refuse(sock: socket.socket) -> None:
    """503 from the accepting thread, without reading anything and without waiting on the client."""
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(_BUSY)}"
            "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
    try:
        sock.setblocking(False)
        sock.send(head + _BUSY)
    except OSError:
        pass


def world_judges(verifier: str | None = None, reflector: str | None = None, refiner: str | None = None,
                 no_refiner: bool = False) -> Judges:
    """Judges built by registry name; empty names take the world backend's defaults."""
    from .. import components
    from ..backends.world import DEFAULTS

    names = {"verifier": verifier or DEFAULTS["verifier"], "reflector": reflector or DEFAULTS["reflector"]}
    if not no_refiner:
        names["refiner"] = refiner or DEFAULTS["refiner"]
    for kind, name in names.items():
        components.check_name(kind, name)
    built = {kind: components.build(kind, name) for kind, name in names.items()}
    return Judges(verifier=built["verifier"], reflector=built["reflector"], refiner=built.get("refiner"), names=names)
