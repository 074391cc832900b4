"""Secrets never reach disk: one scrubber applied where messages are written.

A secret the process holds (the VLM endpoint's API key, read from the environment) is registered
with `register`; `scrub(text)` then replaces it, and anything shaped like a key (OpenAI's `sk-...`,
Hugging Face's `hf_...`, `Bearer ...`, `api_key=...`), with `[redacted]`. The writers of the run
folder (trace.jsonl, done.json, ledger.json, report.html), the trainers' logs and `serve`'s log
call it, so an endpoint that echoes the key in an error ("Incorrect API key provided: sk-...")
leaves no copy behind. `scrub_obj` walks JSON-ready values (dict keys and strings).
"""

from __future__ import annotations

import re
import threading

MARK = "[redacted]"
MIN_SECRET = 6  # shorter registered values would blot out ordinary words

_KEY_SHAPES = re.compile(
    r"\b(?:sk|pk|rk)-[A-Za-z0-9_\-]{16,}"  # OpenAI-style (sk-..., sk-proj-...)
    r"|\bhf_[A-Za-z0-9]{16,}"  # Hugging Face tokens
    r"|\b(?:ghp|gho|ghs|github_pat)_[A-Za-z0-9_]{16,}"  # GitHub tokens
    r"|\bAKIA[0-9A-Z]{16}\b"  # AWS access key ids
)
# A named value: the name is kept, the value goes.
_NAMED = re.compile(
    r"(?P<head>(?i:\bbearer\s+)"
    r"|(?i:\b(?:api[_-]?key|access[_-]?token|auth[_-]?token|secret[_-]?key|password)[\"']?\s*[:=]\s*[\"']?))"
    r"(?P<value>[^\s\"',;}\]\[]{4,})"
)

_lock = threading.Lock()
_secrets: set[str] = set()


def register(secret: str | None) -> None:
    """Scrub this exact value from every message from now on (process-wide)."""
    if secret and len(secret) >= MIN_SECRET:
        with _lock:
            _secrets.add(secret)


def scrub(text: str) -> str:
    """`text` with every registered secret and every key-shaped token replaced by [redacted]."""
    if not text:
        return text
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, MARK)
    return _NAMED.sub(lambda m: m.group("head") + MARK, _KEY_SHAPES.sub(MARK, text))


def scrub_obj(obj):
    """JSON-ready values with every string scrubbed (the same object back when nothing changed)."""
    if isinstance(obj, str):
        return scrub(obj)
    if isinstance(obj, dict):
        return {scrub(k) if isinstance(k, str) else k: scrub_obj(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub_obj(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(scrub_obj(v) for v in obj)
    return obj
