"""The `reflectionflow` command line: parse, validate, call library functions.

Each part of the library contributes its sub-commands through a module with
`register(subparsers)`; handlers raise the library's ValueError subclasses for bad input, which
become a one-line error and exit code 2 here, before any weights load.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from . import __version__

# Modules that add sub-commands; a module that is not part of this installation is skipped.
COMMAND_MODULES = (
    "reflectionflow.engine.cli",
    "reflectionflow.engine.sweep_cli",
    "reflectionflow.world.cli",
    "reflectionflow.train.cli",
    "reflectionflow.data.cli",
    "reflectionflow.backends.cli",
    "reflectionflow.report.cli",
)


class UsageError(ValueError):
    """Bad command-line input found by a handler."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reflectionflow",
        description="Inference-time scaling for text-to-image diffusion along three axes: noise "
        "(best-of-N over seeds), prompt (refinement) and reflection (critique + correction).",
    )
    parser.add_argument("--version", action="version", version=f"reflectionflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name.rsplit(".", 1)[0]) is None or importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(sub)
    return parser


MAX_ERROR = 1000  # characters of an error line at most (a 10,000-character prompt is not echoed whole)


def one_line(err: BaseException) -> str:
    """An error as one line: lines joined, secrets scrubbed, long quoted text cut, at most MAX_ERROR."""
    from .redact import scrub

    return clip(scrub("; ".join(line.strip() for line in str(err).splitlines() if line.strip())))


def clip(text: str, limit: int = MAX_ERROR) -> str:
    """Any run of over 120 characters inside quotes cut to its start, then the whole to `limit`."""
    import re

    text = re.sub(r"(['\"])([^'\"]{120})[^'\"]{40,}\1", lambda m: f"{m.group(1)}{m.group(2)}...{m.group(1)}", text)
    return text if len(text) <= limit else text[: limit - 30] + f"... ({len(text)} characters)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        # Library input errors are ValueError subclasses (PromptError, EvaluationError, ...).
        print(f"reflectionflow: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reflectionflow: interrupted; run again with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
