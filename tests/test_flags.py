"""One vocabulary of flags: a shared flag means the same, takes the same values and has the same
default in every command that has it, and every name list is in --help."""

from __future__ import annotations

import argparse
import re

import pytest

from reflectionflow.cli import build_parser
from reflectionflow.flags import DTYPES
from reflectionflow.stats import RESAMPLES

COMMANDS = ("generate", "sweep", "evaluate", "compare", "serve")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.fixture(scope="module")
def commands() -> dict[str, argparse.ArgumentParser]:
    subs = _subparsers(build_parser())
    out = {name: subs[name] for name in COMMANDS}
    out["genref build"] = _subparsers(subs["genref"])["build"]
    return out


def _flag(p: argparse.ArgumentParser, name: str) -> argparse.Action | None:
    return next((a for a in p._actions if name in a.option_strings), None)


def test_shared_flags_agree_across_commands(commands):
    seen: dict[str, list[tuple[str, argparse.Action]]] = {}
    for cmd, p in commands.items():
        for flag in ("--device", "--dtype", "--bootstrap", "--batch-size", "--config"):
            a = _flag(p, flag)
            if a is not None:
                seen.setdefault(flag, []).append((cmd, a))
    assert {c for c, _ in seen["--device"]} >= {"generate", "evaluate"}  # flux's and the metrics'
    assert {c for c, _ in seen["--bootstrap"]} == {"evaluate", "compare"}
    assert {c for c, _ in seen["--config"]} == {"generate", "sweep"}
    for cmd, a in seen["--device"]:
        assert a.type("cuda:1") == "cuda:1" and a.type("auto") == "auto", cmd
        with pytest.raises(argparse.ArgumentTypeError, match="accepted: auto, cpu, cuda, cuda:N"):
            a.type("tpu")
        assert "auto | cpu | cuda | cuda:N" in a.help, cmd
    for cmd, a in seen["--dtype"]:
        assert tuple(a.choices) == DTYPES, cmd
    for cmd, a in seen["--bootstrap"]:
        assert a.default == RESAMPLES, cmd
    for cmd, a in seen["--batch-size"]:
        assert "per" in a.help and "speed and memory" in a.help, cmd
    for cmd, a in seen["--config"]:
        assert "YAML or JSON" in a.help, cmd


def test_every_name_list_is_in_help(commands):
    import reflectionflow.backends.flux  # noqa: F401  (registers the flux names)
    from reflectionflow import components

    for cmd in ("generate", "sweep"):
        for kind in ("generator", "reflector", "refiner", "corrector") + (("verifier",) if cmd == "generate" else ()):
            a = _flag(commands[cmd], f"--{kind}")
            for name in components.names(kind):
                assert name in a.help, (cmd, kind, name)
    for kind in ("verifier", "reflector", "refiner"):
        assert "world-oracle" in _flag(commands["serve"], f"--{kind}").help or kind == "refiner"
    help_text = commands["generate"].format_help()
    for word in ("noise | zero-order | prompt | reflection", "world | flux", "none | chains (default) | prompts",
                 "geneval-shapes, geneval-shapes-val"):
        assert word in re.sub(r"-\s+", "-", " ".join(help_text.split())), word


def test_bad_device_is_one_line(capsys):
    from reflectionflow.cli import main

    with pytest.raises(SystemExit) as e:
        main(["evaluate", "nowhere", "--device", "tpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "'tpu' is not a device; accepted: auto, cpu, cuda, cuda:N" in err
