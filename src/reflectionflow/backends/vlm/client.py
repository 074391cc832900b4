"""A small client for OpenAI-compatible chat completions (GPT-4o, vLLM, `reflectionflow serve`).

Standard library only (urllib + threads). What it guarantees, and the original code did not:
- results come back in input order, whatever order the calls finish in;
- at most `concurrency` calls are in flight;
- 429, 408, 5xx, timeouts and dropped connections are retried with exponential backoff and
  jitter (a server's Retry-After is honoured, capped at `max_backoff`);
- a call that still fails becomes a `ChatResult` with `error` set; it never raises, so the batch's
  other calls and the run go on, and the engine records the error in the trace. An answer that
  does not parse (no text, a usage count that is not a number, a logprobs entry that is not an
  object, an answer over MAX_ANSWER bytes) is such a failure, counted as "malformed";
- `timeout` bounds each whole attempt (connect, send, every byte of the answer), not each socket
  read: a watchdog shuts the socket at the deadline, so a server that drips one byte a second
  cannot hold an attempt longer than `timeout`;
- the API key is sent in the Authorization header and nowhere else: not in errors, not in repr;
  it is registered with `reflectionflow.redact`, so an endpoint that echoes it in an error message
  never gets it written to disk.
"""

from __future__ import annotations

import http.client
import json
import math
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ... import redact
from ...runtime import is_number

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_ANSWER = 16 * 1024 * 1024  # bytes of one answer at most (a chat completion is a few KB)


class VLMError(ValueError):
    """A VLM endpoint setting that is wrong, or an endpoint that cannot be used."""


@dataclass
class ChatRequest:
    messages: list[dict]
    max_tokens: int = 512
    temperature: float = 0.0
    response_format: dict | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


@dataclass
class ChatResult:
    text: str | None  # None when the call failed
    top_logprobs: list[dict] | None = None  # first generated token's alternatives: [{token, logprob}]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0  # HTTP requests sent for this call (1 + retries)
    error: str | None = None

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class ClientStats:
    """Counters over the client's lifetime (thread-safe); the ledger of what the endpoint cost."""

    calls: int = 0  # logical calls (one per ChatRequest)
    attempts: int = 0  # HTTP requests sent
    retries: int = 0
    failures: int = 0  # calls that still failed after every retry
    prompt_tokens: int = 0
    completion_tokens: int = 0
    outcomes: Counter = field(default_factory=Counter)  # "200", "429", "timeout", "malformed", ...
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, result: ChatResult, outcomes: list[str]) -> None:
        with self._lock:
            self.calls += 1
            self.attempts += result.attempts
            self.retries += max(0, result.attempts - 1)
            self.failures += result.error is not None
            self.prompt_tokens += result.prompt_tokens
            self.completion_tokens += result.completion_tokens
            self.outcomes.update(outcomes)

    def to_dict(self) -> dict:
        with self._lock:
            return {"calls": self.calls, "attempts": self.attempts, "retries": self.retries,
                    "failures": self.failures, "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": self.completion_tokens, "outcomes": dict(self.outcomes)}


def safe_url(url: str) -> str:
    """The URL without user:password@ (never printed)."""
    p = urllib.parse.urlsplit(url)
    host = p.hostname or ""
    netloc = host + (f":{p.port}" if p.port else "")
    return urllib.parse.urlunsplit((p.scheme, netloc, p.path, "", ""))


def normalize_base_url(url: str) -> str:
    """`http://host:8000` and `http://host:8000/v1/` both mean `http://host:8000/v1`."""
    p = urllib.parse.urlsplit(url.strip())
    if p.scheme not in ("http", "https") or not p.hostname:
        raise VLMError(f"--vlm-url {url!r}: expected an http(s) URL such as http://127.0.0.1:8000/v1")
    path = p.path.rstrip("/")
    if path.endswith("/chat/completions"):
        path = path[: -len("/chat/completions")]
    if not path.endswith("/v1"):
        path += "/v1"
    return urllib.parse.urlunsplit((p.scheme, p.netloc, path, "", ""))


class _CallFailed(Exception):
    def __init__(self, outcome: str, message: str, retry: bool, retry_after: float | None = None):
        super().__init__(message)
        self.outcome, self.retry, self.retry_after = outcome, retry, retry_after


class _Deadline:
    """Shuts down every socket of one attempt when its time is up (a blocked read then returns)."""

    def __init__(self, seconds: float):
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            late = self.expired
        if late:
            _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            socks = list(self._socks)
        for sock in socks:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _watched(base: type, deadline: _Deadline) -> type:
    class Connection(base):
        def connect(self):
            super().connect()
            deadline.watch(self.sock)

    return Connection


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(_watched(http.client.HTTPConnection, self.deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(_watched(http.client.HTTPSConnection, self.deadline), req, context=self._context)


class ChatClient:
    def __init__(self, url: str, model: str, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 60.0, retries: int = 4, backoff: float = 1.0, max_backoff: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep, seed: int | None = None):
        if concurrency < 1:
            raise VLMError(f"--vlm-concurrency must be >= 1, got {concurrency}")
        if timeout <= 0:
            raise VLMError(f"--vlm-timeout must be > 0 seconds, got {timeout}")
        if retries < 0:
            raise VLMError(f"--vlm-retries must be >= 0, got {retries}")
        if not model:
            raise VLMError("--vlm-model is empty: name the model the endpoint serves (e.g. gpt-4o)")
        self.base_url = normalize_base_url(url)
        self.model = model
        self._api_key = api_key
        redact.register(api_key)
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self.stats = ClientStats()

    def __repr__(self) -> str:  # never shows the key
        key = "set" if self._api_key else "unset"
        return f"ChatClient({safe_url(self.base_url)!r}, model={self.model!r}, key={key})"

    # ------------------------------------------------------------------------------------------
    def _headers(self) -> dict:
        h = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            h["Authorization"] = f"Bearer {self._api_key}"
        return h

    def _http(self, method: str, path: str, body: dict | None, timeout: float) -> tuple[int, dict]:
        """One HTTP request, all of it within `timeout`; returns (status, parsed JSON) or raises _CallFailed
        (its message scrubbed of the key and anything shaped like one)."""
        try:
            return self._http_once(method, path, body, timeout)
        except _CallFailed as e:
            raise _CallFailed(e.outcome, redact.scrub(str(e)), e.retry, e.retry_after) from None

    def _http_once(self, method: str, path: str, body: dict | None, timeout: float) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, headers=self._headers(), method=method)
        late = _CallFailed("timeout", f"no answer within {timeout:g} s", True)
        with _Deadline(timeout) as deadline:
            opener = urllib.request.build_opener(_HTTPHandler(deadline), _HTTPSHandler(deadline))
            try:
                with opener.open(req, timeout=timeout) as resp:
                    raw = resp.read(MAX_ANSWER + 1)
                    status = resp.status
            except urllib.error.HTTPError as e:
                if deadline.expired:
                    raise late from None
                detail = _error_detail(e)
                retry_after = _retry_after(e.headers.get("Retry-After") if e.headers else None)
                raise _CallFailed(str(e.code), f"HTTP {e.code}: {detail}", e.code in RETRY_STATUS,
                                  retry_after) from None
            except TimeoutError:
                raise late from None
            except urllib.error.URLError as e:
                reason = e.reason
                if deadline.expired or isinstance(reason, (TimeoutError, socket.timeout)):
                    raise late from None
                raise _CallFailed("connection", f"cannot reach {safe_url(self.base_url)} ({reason})", True) from None
            except (ConnectionError, OSError, http.client.HTTPException, ValueError) as e:  # reset / cut off
                if deadline.expired:
                    raise late from None
                raise _CallFailed("connection", f"connection to {safe_url(self.base_url)} broke ({e})", True) from None
            if deadline.expired:  # the watchdog cut the answer short
                raise late
        if len(raw) > MAX_ANSWER:
            raise _CallFailed("malformed", f"the server's answer is over {MAX_ANSWER} bytes", True)
        try:
            return status, json.loads(raw)
        except (ValueError, RecursionError):
            raise _CallFailed("malformed", "the server's answer is not JSON", True) from None

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        with self._rng_lock:
            jitter = 0.5 + 0.5 * self._rng.random()
        return min(self.backoff * (2**attempt) * jitter, self.max_backoff)

    def _one(self, request: ChatRequest) -> ChatResult:
        body = {"model": self.model, "messages": request.messages, "max_tokens": request.max_tokens,
                "temperature": request.temperature}
        if request.response_format is not None:
            body["response_format"] = request.response_format
        if request.logprobs:
            body["logprobs"] = True
            if request.top_logprobs:
                body["top_logprobs"] = request.top_logprobs
        outcomes: list[str] = []
        attempt = 0
        while True:
            attempt += 1
            try:
                _, answer = self._http("POST", "/chat/completions", body, self.timeout)
                result = _parse_completion(answer)
                outcomes.append("200")
                result.attempts = attempt
                self.stats.add(result, outcomes)
                return result
            except _CallFailed as e:
                outcomes.append(e.outcome)
                if not e.retry or attempt > self.retries:
                    why = f"{e} (after {attempt} attempt{'s' if attempt > 1 else ''})"
                    result = ChatResult(text=None, attempts=attempt, error=why)
                    self.stats.add(result, outcomes)
                    return result
                self._sleep(self._backoff(attempt - 1, e.retry_after))

    def complete(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Every request's result, in input order; at most `concurrency` in flight."""
        requests = list(requests)
        if len(requests) <= 1 or self.concurrency == 1:
            return [self._one(r) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))  # map keeps input order

    def list_models(self, timeout: float = 5.0) -> list[str]:
        """GET /models; raises _CallFailed (used by the pre-flight check)."""
        _, answer = self._http("GET", "/models", None, timeout)
        data = answer.get("data") if isinstance(answer, dict) else None
        return [m.get("id") for m in data or [] if isinstance(m, dict) and m.get("id")]


def _parse_completion(answer) -> ChatResult:
    """A chat completion -> ChatResult; anything that does not fit the format raises _CallFailed("malformed")."""
    try:
        return _parse_fields(answer)
    except _CallFailed:
        raise
    except Exception as e:  # every other surprise in a foreign answer is a malformed answer too
        raise _CallFailed("malformed", f"the answer does not parse ({type(e).__name__}: {str(e)[:120]})", True) \
            from None


def _parse_fields(answer) -> ChatResult:
    try:
        choice = answer["choices"][0]
        text = choice["message"]["content"]
        if isinstance(text, list):  # some servers return content parts
            text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
        if not isinstance(text, str):
            raise TypeError("content is not text")
    except (KeyError, IndexError, TypeError) as e:
        raise _CallFailed("malformed", f"the answer has no choices[0].message.content ({e})", True) from None
    top = None
    lp = choice.get("logprobs")
    if lp is not None and not isinstance(lp, dict):
        raise _CallFailed("malformed", "choices[0].logprobs is not an object", True)
    if lp and lp.get("content"):
        content = lp["content"]
        if not isinstance(content, list) or not isinstance(content[0], dict):
            raise _CallFailed("malformed", "choices[0].logprobs.content[0] is not an object", True)
        first = content[0]
        top = first.get("top_logprobs") or [{"token": first.get("token"), "logprob": first.get("logprob")}]
        if not isinstance(top, list) or not all(_is_alternative(a) for a in top):
            raise _CallFailed("malformed", "logprobs entries must be objects with a text token and a numeric "
                              "logprob", True)
    usage = answer.get("usage") or {}
    if not isinstance(usage, dict):
        raise _CallFailed("malformed", "usage is not an object", True)
    return ChatResult(text=text, top_logprobs=top, prompt_tokens=_count(usage, "prompt_tokens"),
                      completion_tokens=_count(usage, "completion_tokens"))


def _is_alternative(a) -> bool:
    lp = a.get("logprob") if isinstance(a, dict) else None
    return (isinstance(a, dict) and isinstance(a.get("token"), str) and isinstance(lp, (int, float))
            and not isinstance(lp, bool) and not math.isnan(lp))


def _count(usage: dict, name: str) -> int:
    v = usage.get(name)
    if v is None:
        return 0
    if not is_number(v, 0, 1e12):
        raise _CallFailed("malformed", f"usage.{name} is not a token count ({str(v)[:40]!r})", True)
    return int(v)


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read(64 * 1024) or b"{}")
        msg = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("error")
        return redact.scrub(str(msg or e.reason)[:200])
    except (ValueError, AttributeError, OSError, http.client.HTTPException, RecursionError):
        return redact.scrub(str(e.reason)[:200])


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
