"""Settings of the VLM endpoint and the pre-flight check that runs before any model loads.

The API key is a value here (`api_key`, never printed: repr=False, left out of `public()`); only
the command line reads it, from the environment variable the user names (`--vlm-api-key-env`).
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass, field, fields

from ...runtime import is_int
from .client import ChatClient, VLMError, _CallFailed, normalize_base_url, safe_url
from .judges import REFLECTOR_STYLES

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
# Hosts that bill per token and never run without a key.
KEYED_HOSTS = ("api.openai.com", "generativelanguage.googleapis.com", "api.anthropic.com", "openrouter.ai")


@dataclass
class VLMOptions:
    url: str | None = None
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str = DEFAULT_KEY_ENV  # where the CLI found the key (a name, safe to record)
    api_key_env_explicit: bool = False  # the user named the variable: then it must be set
    concurrency: int = 8
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 1.0
    reflector_style: str = "instruct"  # or "reflection-generator" (the released reflection model)
    refine_with_image: bool = True

    def public(self) -> dict:
        """Everything but the key (what config.json may record)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "api_key"}
        d["url"] = safe_url(self.url) if self.url else None
        d["api_key_set"] = self.api_key is not None
        return d

    def check_values(self) -> None:
        """Offline checks of every value (no network)."""
        if not self.url:
            raise VLMError("the VLM components need --vlm-url (an OpenAI-compatible endpoint, e.g. "
                           "https://api.openai.com/v1 or http://127.0.0.1:8000/v1 for vLLM / reflectionflow serve)")
        normalize_base_url(self.url)
        refuse_credentials(self.url)
        if not self.model:
            raise VLMError("the VLM components need --vlm-model (e.g. gpt-4o, Qwen/Qwen2.5-VL-7B-Instruct)")
        if self.reflector_style not in REFLECTOR_STYLES:
            raise VLMError(f"--vlm-reflector-style {self.reflector_style!r}; accepted: {', '.join(REFLECTOR_STYLES)}")
        if not is_int(self.concurrency, 1):
            raise VLMError(f"--vlm-concurrency must be an integer >= 1, got {self.concurrency!r}")
        if not isinstance(self.timeout, (int, float)) or self.timeout <= 0:
            raise VLMError(f"--vlm-timeout must be > 0 seconds, got {self.timeout!r}")
        if not is_int(self.retries, 0):
            raise VLMError(f"--vlm-retries must be an integer >= 0, got {self.retries!r}")
        host = urllib.parse.urlsplit(self.url).hostname or ""
        if self.api_key is None and (self.api_key_env_explicit or host in KEYED_HOSTS):
            raise VLMError(f"no API key for {safe_url(self.url)}: set the environment variable {self.api_key_env} "
                           "(named by --vlm-api-key-env)")

    def client(self, **overrides) -> ChatClient:
        kw = dict(concurrency=self.concurrency, timeout=self.timeout, retries=self.retries, backoff=self.backoff)
        return ChatClient(self.url, self.model, api_key=self.api_key, **(kw | overrides))

    def preflight(self, timeout: float = 5.0) -> list[str]:
        """Reach the endpoint (GET /models) before anything loads; returns the models it serves.

        Unreachable, refused key and unknown model are one-line VLMErrors. A server that does not
        list models (some proxies) passes if it answers at all.
        """
        self.check_values()
        client = self.client()
        where = safe_url(client.base_url)
        try:
            served = client.list_models(timeout=min(timeout, self.timeout))
        except _CallFailed as e:
            if e.outcome in ("401", "403"):
                hint = (f"the environment variable {self.api_key_env} is not set" if self.api_key is None
                        else f"the key in {self.api_key_env} was refused")
                raise VLMError(f"--vlm-url {where} refused the request (HTTP {e.outcome}): {hint}") from None
            if e.outcome in ("connection", "timeout"):
                raise VLMError(f"--vlm-url {where} is unreachable: {e}") from None
            if e.outcome in ("404", "405", "malformed"):
                return []  # answers, but lists no models: the first real call will tell
            raise VLMError(f"--vlm-url {where} answered GET /models with {e}") from None
        if served and self.model not in served:
            shown = ", ".join(served[:8]) + (" ..." if len(served) > 8 else "")
            raise VLMError(f"--vlm-model {self.model!r} is not served by {where}; it serves: {shown}")
        return served


def refuse_credentials(url: str | None) -> None:
    """A URL with user:password@ would put a secret in a setting that config.json records."""
    parts = urllib.parse.urlsplit(url or "")
    if parts.username or parts.password:
        raise VLMError(f"--vlm-url {safe_url(url)}: holds a user name or password; put the key in the environment "
                       f"variable --vlm-api-key-env names (default {DEFAULT_KEY_ENV})")


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def vlm_options(options: dict, who: str) -> VLMOptions:
    """VLMOptions(**options) with an error naming the component and the accepted keys."""
    known = [f.name for f in fields(VLMOptions)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise VLMError(f"{who}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(known)}")
    opts = VLMOptions(**options)
    opts.check_values()
    return opts
