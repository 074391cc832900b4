#!/usr/bin/env bash
# The shipped world corrector's recipe trained longer, on one GPU in one command (about 9 minutes on
# an H200): the pool of the generator v1's judged samples (as weights/MODEL_CARD.md, world-corrector),
# then STEPS optimizer steps (the shipped one stopped at 3,500 with its validation still rising),
# then the shipped and the new corrector on the generator v2's samples of the validation prompts
# (benchmarks/world_corrector_eval.py --prompts geneval-shapes-val: failures fixed in 1 and 2 rounds
# with the oracle's reflection, passed samples broken by "keep").
#   bash benchmarks/world_corrector_long.sh OUTDIR [STEPS] [SECONDS]
# A CPU smoke test: POOL_SIZE=64 POOL_FLAGS="--val-prompts 6 --device cpu" LABEL_WORKERS=1 EXTRA="--device cpu --no-compile --batch-size 8 --workers 0 --val-max 8" EVAL_FLAGS="--limit 6 --device cpu" with STEPS 2.
# GENERATOR=weights/world-generator trains the LoRA on the default generator (v2.1) instead of the v1.
# OUTDIR receives corr.tar (the adapters, config, logs) and eval.json; the table is printed last. The
# comparison stops after EVAL_LIMIT seconds (90), so a slow machine still brings the adapters back.
set -euo pipefail
OUT=${1:?usage: world_corrector_long.sh OUTDIR [STEPS] [SECONDS]}
STEPS=${2:-8000}
TOTAL=${3:-560}
R=${R:-/tmp/corr-long}
T0=$(date +%s)
mkdir -p "$OUT" "$R"
T="python -m reflectionflow train world-corrector --generator ${GENERATOR:-weights/world-generator-v1} --pool $R/pool --pool-size ${POOL_SIZE:-32768} ${POOL_FLAGS:-} --quiet"
$T --out "$R/run" --pool-only --label-workers ${LABEL_WORKERS:-15} > "$OUT/pool.log" 2>&1
echo "pool: $(( $(date +%s) - T0 )) s"
MIN=$(python -c "print(round(max($TOTAL - ($(date +%s) - $T0) - 75, 60) / 60, 2))")
echo "training for at most $MIN minutes"
$T --out "$R/run" --steps "$STEPS" --minutes "$MIN" --compile --workers 8 --batch-size 256 --mix-steps 700 \
  --sample-every 2000 --ckpt-every 2000 --log-every 50 ${EXTRA:-} > "$OUT/train.log" 2>&1 || echo "training failed: see train.log"
echo "training: $(( $(date +%s) - T0 )) s"
mkdir -p "$R/export"
cp -r "$R/run/corrector" "$R/export/corr"
for f in scores.json log.jsonl val.jsonl train_config.json; do cp "$R/run/$f" "$R/export/corr/run-$f" 2>/dev/null || true; done
tar cf "$OUT/corr.tar" -C "$R/export" corr
cat "$R/run/val.jsonl" 2>/dev/null || true
timeout "${EVAL_LIMIT:-90}" python benchmarks/world_corrector_eval.py --correctors weights/world-corrector "$R/run/corrector" \
  --prompts geneval-shapes-val --samples 2 --rounds 2 --workers 15 --out "$OUT/eval.json" ${EVAL_FLAGS:-} | tee "$OUT/eval.md" || true
echo "total: $(( $(date +%s) - T0 )) s"
