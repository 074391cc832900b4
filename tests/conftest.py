import importlib.util
import sys
from pathlib import Path

import pytest

import reflectionflow  # noqa: F401  (first: it puts MKL in its reproducible mode before anything loads torch)

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark_module(name: str):
    """Import benchmarks/<name>.py (benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def cli(capsys):
    """Run the command line in-process; returns (exit code, stdout, stderr)."""
    from reflectionflow.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


# The shipped world defaults are the trained MMDiT generator and corrector (about 20 s per prompt on
# a 2-core CPU). Tests run the engine on the renderer-backed stand-ins, which take milliseconds per
# image; tests marked `trained_world` get the real defaults back. Subprocesses name the stand-ins
# with STAND_INS on their command line.
STAND_INS = ("--generator", "world-render", "--corrector", "world-edit", "--verifier", "world-oracle",
             "--reflector", "world-oracle")
SHIPPED = {}


@pytest.fixture(autouse=True, scope="session")
def _fast_world_defaults():
    from reflectionflow.backends import world

    SHIPPED.update({kind: world.DEFAULTS[kind] for kind in ("generator", "corrector", "verifier", "reflector")})
    with pytest.MonkeyPatch.context() as mp:
        for kind, name in zip(("generator", "corrector", "verifier", "reflector"), STAND_INS[1::2]):
            mp.setitem(world.DEFAULTS, kind, name)
        yield


@pytest.fixture(autouse=True)
def _shipped_world_defaults(request, monkeypatch):
    if request.node.get_closest_marker("trained_world"):
        from reflectionflow.backends import world

        for kind, name in SHIPPED.items():
            monkeypatch.setitem(world.DEFAULTS, kind, name)
