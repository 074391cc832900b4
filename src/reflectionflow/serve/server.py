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

Standard library only (ThreadingHTTPServer); it listens on 127.0.0.1 unless told otherwise.
Component calls are serialised by a lock: the world's judges take microseconds and need no
thread safety that way.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from ..backends.vlm import prompts as P
from ..components import PromptRefiner, RefineRequest, ReflectionRequest, Reflector, Verifier

WORLD_SIZE = 64
MAX_BODY = 64 * 1024 * 1024


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
    """A data: URL -> (H, W, 3) uint8, resized to size x size when it differs."""
    from PIL import Image, UnidentifiedImageError

    if not url.startswith("data:") or ";base64," not in url:
        raise ServeError("image_url must be a data: URL with base64 content (this server fetches nothing)")
    try:
        raw = base64.b64decode(url.split(";base64,", 1)[1], validate=False)
        with Image.open(io.BytesIO(raw)) as im:
            im = im.convert("RGB")
            if size and im.size != (size, size):
                im = im.resize((size, size), Image.BOX)
            return np.asarray(im)
    except (binascii.Error, UnidentifiedImageError, OSError) as e:
        raise ServeError(f"image_url does not hold a readable image ({e})") from None


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
                if part.get("type") == "text":
                    texts.append(str(part.get("text", "")))
                elif part.get("type") == "image_url":
                    iu = part.get("image_url")
                    images.append(iu.get("url", "") if isinstance(iu, dict) else str(iu))
    return "\n".join(texts), images


def _p_yes(score: float, yes: bool | None) -> float:
    """A verdict as P(yes): yes-verdicts in (0.5, 1], ordered by score; clamped so log is finite."""
    s = min(max(float(score), 0.0), 1.0) if math.isfinite(score) else 0.0
    p = s if yes is None else (0.5 + 0.5 * s if yes else 0.5 * s)
    return min(max(p, 1e-6), 1 - 1e-6)


class JudgeService:
    def __init__(self, judges: Judges, model_name: str = "reflectionflow-world"):
        self.judges = judges
        self.model_name = model_name
        self._lock = threading.Lock()

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "reflectionflow",
                                            "judges": self.judges.names or {}}]}

    def complete(self, body: dict) -> dict:
        if not isinstance(body, dict):
            raise ServeError("the body must be a JSON object")
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
        logprobs = None
        with self._lock:
            if task in ("yesno", "score"):
                v = self.judges.verifier.score([image], [prompt])[0]
                p = _p_yes(v.score, v.yes)
                if task == "yesno":
                    answer = "Yes" if p >= 0.5 else "No"
                    if body.get("logprobs"):
                        alts = [{"token": "Yes", "logprob": math.log(p)}, {"token": "No", "logprob": math.log(1 - p)}]
                        alts.sort(key=lambda a: -a["logprob"])
                        k = int(body.get("top_logprobs") or 0)
                        logprobs = {"content": [{"token": answer, "logprob": math.log(p if answer == "Yes" else 1 - p),
                                                 "top_logprobs": alts[: max(k, 1)] if k else []}]}
                else:
                    grade = int(round(10 * p))
                    reason = str((v.details or {}).get("reason") or ("matches" if p >= 0.5 else "does not match"))
                    answer = json.dumps({"objects": grade, "attributes": grade, "relations": grade,
                                         "overall": grade, "explanation": reason})
            elif task == "reflect":
                req = ReflectionRequest(image=image, original_prompt=prompt,
                                        current_prompt=fields.get("current prompt", prompt),
                                        previous_reflection=fields.get("previous edit commands"))
                answer = self.judges.reflector.reflect([req])[0].text
            else:
                current = fields.get("current prompt", prompt)
                if self.judges.refiner is None:
                    answer = current
                else:
                    reflection = fields.get("edit commands for the last image")
                    req = RefineRequest(original_prompt=prompt, current_prompt=current,
                                        reflection=None if reflection in (None, "none") else reflection, image=image)
                    answer = self.judges.refiner.refine([req])[0].text or current
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and max_tokens == 1 and task == "yesno":
            answer = answer.split()[0]
        prompt_tokens = len(text.split()) + 85 * len(urls)  # a rough count, like a small VLM's (85 per image)
        completion_tokens = max(1, len(answer.split()))
        return {
            "id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop",
                         "logprobs": logprobs}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }


# A hook may replace an answer (tests inject faults with it): (path, body) -> None to answer
# normally, or (status, payload bytes, delay seconds) to send instead.
Hook = Callable[[str, dict | None], tuple[int, bytes, float] | None]


class _Handler(BaseHTTPRequestHandler):
    server: JudgeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet by default; the CLI turns logging on
        if self.server.log:
            super().log_message(fmt, *args)

    def _send(self, status: int, payload: bytes, content_type: str = "application/json", extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
            pass

    def _error(self, status: int, message: str):
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send(status, json.dumps({"error": {"message": message, "type": kind}}).encode())

    def _authorised(self) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        if self.headers.get("Authorization", "") == f"Bearer {key}":
            return True
        self._error(401, "missing or wrong API key")
        return False

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

    def do_GET(self):
        if not self._authorised() or self._hooked(None):
            return
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send(200, json.dumps(self.server.service.models()).encode())
        else:
            self._error(404, f"no route {self.path}; try POST /v1/chat/completions")

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._error(413, f"request body over {MAX_BODY} bytes")
            return
        raw = self.rfile.read(length)
        if not self._authorised():
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._error(400, "the body is not JSON")
            return
        if self._hooked(body):
            return
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no route {self.path}; try POST /v1/chat/completions")
            return
        try:
            answer = self.server.service.complete(body)
        except ServeError as e:
            self._error(e.status, str(e))
            return
        except ValueError as e:  # a judge refusing its input (e.g. a prompt outside the world)
            self._error(400, f"the judge could not answer: {e}")
            return
        self._send(200, json.dumps(answer).encode())


class JudgeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, service: JudgeService, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 hook: Hook | None = None, log: bool = False):
        self.service = service
        self.api_key = api_key
        self.hook = hook
        self.log = log
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> threading.Thread:
        """Serve in a daemon thread (tests, the GPU benchmark); `shutdown()` stops it."""
        t = threading.Thread(target=self.serve_forever, name="reflectionflow-serve", daemon=True)
        t.start()
        return t


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
