"""The pictures in docs/screenshots/: report.html and compare.html as headless Chromium shows them,
and a sweep's sweep.png.

    python benchmarks/screenshots.py --out docs/screenshots          # about 2 minutes on a 2-core CPU
    python benchmarks/screenshots.py --out /tmp/shots --fast         # renderer-backed stand-ins: seconds

The report is one prompt with the default settings (the trained world models). The comparison is
noise against reflection at 4 images on 24 GenEval-Shapes prompts (4 per category: the category
rows show their n instead of an interval), and the sweep noise, prompt and reflection at up to 8
images on 60 prompts with two verifiers; both on the renderer-backed generator and corrector, so
they take seconds. `--fast` puts the stand-ins everywhere (the test suite's check).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPORT_SIZE = (1280, 1800)
COMPARE_SIZE = (1280, 1800)
STAND_INS = ["--generator", "world-render", "--corrector", "world-edit"]
ORACLES = ["--verifier", "world-oracle", "--reflector", "world-oracle"]


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(n)), None)


def screenshot(page: Path, shot: Path, size: tuple[int, int], profile: Path) -> list[str]:
    """Headless Chromium's picture of a page; returns the page's console lines (errors included)."""
    exe = chromium()
    if exe is None:
        raise SystemExit("screenshots: no chromium binary (apt-get install chromium)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", f"--window-size={size[0]},{size[1]}",
           "--virtual-time-budget=3000", f"--screenshot={shot}", page.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if res.returncode != 0 or not shot.is_file():
        raise SystemExit(f"screenshots: chromium failed on {page}: {res.stderr[-500:]}")
    return [line for line in res.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def _cli(*argv) -> None:
    from reflectionflow.cli import main

    code = main([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"screenshots: reflectionflow {' '.join(map(str, argv[:2]))} exited {code}")


def make(out: Path, fast: bool = False, work: Path | None = None) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="screenshots-") as tmp:
        w = Path(work or tmp)
        report_flags = STAND_INS + ORACLES if fast else []
        _cli("generate", "a photo of a cross left of a ring", "--out", w / "one", "--quiet", *report_flags)
        judges = ORACLES if fast else []
        for method in ("noise", "reflection"):
            _cli("generate", "--prompts", "geneval-shapes", "--limit", 24, "--method", method, "--budget", 4,
                 "--out", w / f"{method}4", "--quiet", *STAND_INS, *judges)
            _cli("evaluate", w / f"{method}4")
        _cli("compare", w / "noise4", w / "reflection4", "--out", w / "compare")
        verifiers = "world-oracle" if fast else "world-oracle,world-learned"
        _cli("sweep", "--prompts", "geneval-shapes", "--limit", 60, "--methods", "noise,prompt,reflection",
             "--verifiers", verifiers, "--budget", 8, "--out", w / "sweep", "--quiet", *STAND_INS,
             "--reflector", "world-oracle")
        shots = {"report": out / "report.png", "compare": out / "compare.png", "sweep": out / "sweep.png"}
        console = screenshot(w / "one" / "report.html", shots["report"], REPORT_SIZE, w / "profile")
        console += screenshot(w / "compare" / "compare.html", shots["compare"], COMPARE_SIZE, w / "profile")
        if console:
            raise SystemExit("screenshots: console messages: " + " | ".join(console))
        shutil.copyfile(w / "sweep" / "sweep.png", shots["sweep"])
    return shots


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/screenshots", help="where the three PNGs go (default docs/screenshots)")
    p.add_argument("--fast", action="store_true", help="renderer-backed stand-ins and oracle judges everywhere")
    args = p.parse_args(argv)
    for name, path in make(Path(args.out), fast=args.fast).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
