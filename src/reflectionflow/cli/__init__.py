"""The `reflectionflow` command line: parse, validate, call library functions.

Every command-line module of the package is here, one a command (or a group): generate.py
(`generate`, `report`), sweep.py, evaluate.py, world.py, train.py (with train_world_judges.py,
train_flux.py and train_vlm.py), genref.py, serve.py, compare.py. Each has `register(subparsers)`
and handlers that turn flags (and, where a command needs it, the environment) into the library's
arguments; below this package no module parses arguments or reads os.environ. Handlers raise the
library's ValueError subclasses for bad input, which become a one-line error and exit code 2 here,
before any weights load.
"""

from __future__ import annotations

import argparse
import sys

from ..version import __version__


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
    # Imported here, not at the top: `python -m reflectionflow.cli.train` loads no other command.
    from . import compare, evaluate, generate, genref, serve, sweep, train, world

    for module in (generate, sweep, evaluate, world, train, genref, serve, compare):
        module.register(sub)
    return parser


def one_line_errors(parser: argparse.ArgumentParser, name: str) -> None:
    """argparse prints the whole usage before an error; the project's errors are one line."""

    def error(message: str):
        parser.exit(2, f"reflectionflow {name}: error: {message}\n")

    parser.error = error


MAX_ERROR = 1000  # characters of an error line at most (a 10,000-character prompt is not echoed whole)


def one_line(err: BaseException) -> str:
    """An error as one line: lines joined, secrets scrubbed, long quoted text cut, at most MAX_ERROR."""
    from ..redact import scrub

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
