"""A small client for OpenAI-compatible chat completions (GPT-4o, vLLM, `reflectionflow serve`).

Standard library only (urllib + threads). What it guarantees, and the original code did not:
- results come back in input order, whatever order the calls finish in;
- at most `concurrency` calls are in flight;
- 429, 408, 5xx, timeouts and dropped connections are retried with exponential backoff and
  jitter (a server's Retry-After is honoured, capped at `max_backoff`);
- a call that still fails becomes a `ChatResult` with `error` set; it never raises, so the batch's
  other calls and the run go on, and the engine records the error in the trace;
- the API key is sent in the Authorization header and nowhere else: not in errors, not in repr.
"""

from __future__ import annotations

import http.client
import json
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

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


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
        """One HTTP request; returns (status, parsed JSON) or raises _CallFailed."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, headers=self._headers(), method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as e:
            detail = _error_detail(e)
            retry_after = _retry_after(e.headers.get("Retry-After") if e.headers else None)
            raise _CallFailed(str(e.code), f"HTTP {e.code}: {detail}", e.code in RETRY_STATUS, retry_after) from None
        except TimeoutError:
            raise _CallFailed("timeout", f"no answer within {timeout:g} s", True) from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _CallFailed("timeout", f"no answer within {timeout:g} s", True) from None
            raise _CallFailed("connection", f"cannot reach {safe_url(self.base_url)} ({reason})", True) from None
        except (ConnectionError, OSError, http.client.HTTPException) as e:  # reset / cut off mid-answer
            raise _CallFailed("connection", f"connection to {safe_url(self.base_url)} broke ({e})", True) from None
        try:
            return status, json.loads(raw)
        except ValueError:
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
    if isinstance(lp, dict) and lp.get("content"):
        first = lp["content"][0]
        top = first.get("top_logprobs") or [{"token": first.get("token"), "logprob": first.get("logprob")}]
    usage = answer.get("usage") or {}
    return ChatResult(text=text, top_logprobs=top, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                      completion_tokens=int(usage.get("completion_tokens") or 0))


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read() or b"{}")
        msg = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("error")
        return str(msg or e.reason)[:200]
    except (ValueError, AttributeError, OSError):
        return str(e.reason)[:200]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
