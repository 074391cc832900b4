#!/usr/bin/env bash
# Install what the test suite needs, lint, and run it. This is the README's test command and CI's.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch is pinned: 2.13.0 is the CPU build; an unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q --disable-pip-version-check torch==2.13.0 -e ".[test,flux]"
# The report-page tests drive headless Chromium; install it where we can (root with apt), else they skip.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
    || echo "could not install chromium: the report-page tests will be skipped"
fi
ruff check src tests benchmarks
# Two workers with one thread each (pytest-xdist): on a 2-core machine the suite's many start-ups,
# subprocesses and waits overlap instead of queueing; one thread per worker keeps the two from
# fighting over the cores. Run a single test file with plain `python -m pytest FILE`.
OMP_NUM_THREADS=1 python -m pytest -q -n 2
