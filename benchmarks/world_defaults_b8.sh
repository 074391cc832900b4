#!/usr/bin/env bash
# GenEval-Shapes at budget 8 with the world backend's defaults (generator v2, the v1 corrector, the
# learned verifier and reflector): noise and reflection (the default `generate` split: pool 2 + 2 x 3),
# noise re-scored by the oracle verifier too.   bash benchmarks/world_defaults_b8.sh OUTDIR
set -euo pipefail
OUT=${1:?usage: world_defaults_b8.sh OUTDIR}
S=${S:-/tmp/defaults-b8}
mkdir -p "$OUT"
/usr/bin/time -f "%e s" python -m reflectionflow sweep --prompts geneval-shapes --methods noise,reflection --budget 8 \
  --verifiers world-learned,world-oracle --batch-size 1024 --prompt-batch 553 --out "$S" --quiet 2>&1 | tail -8
cp "$S/sweep.md" "$S/sweep.json" "$OUT/"
cat "$S/sweep.md"
