#!/usr/bin/env bash
# GenEval-Shapes with the oracle judges and the default generator (v2): noise, noise & prompt and
# reflection at budget 32 (curves 1-32 from the traces), and noise & prompt at budget 8 on its own.
#   bash benchmarks/world_generator_v2_sweeps.sh OUTDIR
set -euo pipefail
OUT=${1:?usage: world_generator_v2_sweeps.sh OUTDIR}
S=${S:-/tmp/v2-sweeps}
COMMON=(--prompts geneval-shapes --verifiers world-oracle --reflector world-oracle --batch-size 1024
        --prompt-batch 553 --quiet)
mkdir -p "$OUT"
/usr/bin/time -f "%e s" python -m reflectionflow sweep --methods noise,prompt,reflection --budget 32 \
  --out "$S/b32" "${COMMON[@]}" 2>&1 | tail -8
/usr/bin/time -f "%e s" python -m reflectionflow sweep --methods prompt --budget 8 --out "$S/b8" "${COMMON[@]}" \
  2>&1 | tail -4
tar czf "$OUT/sweeps.tar.gz" -C "$S" b32/sweep.json b32/sweep.md b32/sweep.png b8/sweep.json b8/sweep.md
cat "$S/b32/sweep.md" "$S/b8/sweep.md"
