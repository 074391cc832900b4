"""Any verifier of the engine as a metric: the VLM yes/no judge (P(yes), VQAScore-style), the 0-10
judge, a local VLM asked yes/no, the world's own judges. Built through the component registry with
the options its name needs; a failed verdict is an unscored image, not a zero."""

from __future__ import annotations

from pathlib import Path

from .. import components as registry
from .base import ImageScore, Metric, MetricError, MetricOptions, PromptItem

# Which settings a verifier's registry factory takes (every other verifier: --verifier-option only).
VLM_VERIFIERS = ("vlm-yesno", "vlm-score")
LOCAL_PATH = {"local-yesno": ("local_verifier_path", "--local-verifier-path")}
DESCRIPTIONS = {
    "vlm-yesno": "P(yes) from a VLM asked whether the image matches the prompt (VQAScore-style; --vlm-url)",
    "vlm-score": "0-10 overall score from a VLM judge (--vlm-url)",
    "local-yesno": "P(yes) from a local transformers VLM asked yes/no (--local-verifier-path)",
}


def registered_verifiers() -> list[str]:
    from ..backends import vlm  # noqa: F401  (registers the VLM verifiers)

    return registry.names("verifier")


class VerifierMetric(Metric):
    """The verifier's score per image; yes/no verifiers also give the yes rate."""

    name = "verifier"
    description = "an engine verifier"

    def __init__(self, options: MetricOptions, verifier: str):
        super().__init__(options)
        self.verifier = verifier
        self.judge = registry.build("verifier", verifier, **self.component_options(options, verifier))

    @classmethod
    def for_verifier(cls, verifier: str) -> type[VerifierMetric]:
        """A subclass named after the verifier (the registry entry `--metric NAME` resolves to)."""
        desc = DESCRIPTIONS.get(verifier) or registry.describe("verifier").get(verifier) or "an engine verifier"

        def init(self, options: MetricOptions):
            VerifierMetric.__init__(self, options, verifier)

        return type(f"VerifierMetric[{verifier}]", (cls,), {
            "name": verifier, "description": f"verifier {verifier}: {desc}", "verifier_name": verifier,
            "__init__": init, "__module__": __name__})

    @staticmethod
    def component_options(options: MetricOptions, verifier: str) -> dict:
        opts: dict = {}
        if verifier in VLM_VERIFIERS:
            opts.update({k: v for k, v in options.vlm.items() if v is not None})
        elif verifier in LOCAL_PATH:
            attr, _ = LOCAL_PATH[verifier]
            opts.update(path=getattr(options, attr), device=options.device, dtype=options.dtype,
                        batch_size=options.batch_size)
        return opts | dict(options.verifier_options)

    @classmethod
    def check(cls, options: MetricOptions, root: Path, items: list[PromptItem]) -> None:
        verifier = cls.verifier_name
        if verifier in VLM_VERIFIERS:
            from ..backends.vlm.options import vlm_options

            opts = {k: v for k, v in options.vlm.items() if v is not None} | dict(options.verifier_options)
            vlm_options(opts, f"--metric {verifier}").preflight()  # the endpoint answers, the model is served
        elif verifier in LOCAL_PATH:
            from ..backends.vlm.local import check_model_folder

            attr, flag = LOCAL_PATH[verifier]
            if not getattr(options, attr):
                raise MetricError(f"--metric {verifier} needs {flag} (a local transformers VLM folder)")
            check_model_folder(getattr(options, attr), flag)

    def info(self) -> dict:
        opts = self.component_options(self.options, self.verifier)
        shown = {k: v for k, v in opts.items() if k not in ("api_key",) and v is not None}
        return {"verifier": self.verifier, "options": shown} if shown else {"verifier": self.verifier}

    def score(self, images, prompts) -> list[ImageScore]:
        out = []
        for v in self.judge.score(images, prompts):
            details = v.details if isinstance(v.details, dict) else {}
            out.append(ImageScore(score=None if v.error else v.score, yes=v.yes, details=details, calls=v.calls,
                                  tokens=v.tokens, error=v.error))
        return out
