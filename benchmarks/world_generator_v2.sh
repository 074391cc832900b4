#!/usr/bin/env bash
# The world generator v2 on one GPU, in one command (about 9.5 minutes on an H200):
# train the `compact` MMDiT on template prompts + explicit captions with an EMA snapshot every 1,000
# steps, choose the snapshot closest to FLUX.1-dev's GenEval profile on the VALIDATION prompts
# (benchmarks/world_generator_profile.py choose), then profile it, the final weights and the
# generator v1 on GenEval-Shapes (template vs explicit prompts, 8 seeds per prompt).
#   bash benchmarks/world_generator_v2.sh OUTDIR [MINUTES]
# OUTDIR receives chosen/ (the chosen snapshot), logs.tar.gz (training log, validation, choice and
# profile JSON, sample grids) and prints the tables last.
set -euo pipefail
OUT=${1:?usage: world_generator_v2.sh OUTDIR [MINUTES]}
MIN=${2:-5.8}
RUN=${RUN:-/tmp/world-generator-v2}
V1=${V1:-weights/world-generator}
mkdir -p "$OUT"
python -m reflectionflow train world-generator --out "$RUN" --size compact --steps 12000 --minutes "$MIN" \
  --lr 8e-4 --warmup 500 --ema 0.999 --compile --workers 12 --log-every 250 --ckpt-every 1000 \
  --sample-every 1000 --val-prompts 120 --snapshots --no-final-eval --quiet 2>&1 | tail -20
cp -r "$RUN/ema" "$RUN/snapshots/step_final"
python benchmarks/world_generator_profile.py choose --snapshots "$RUN/snapshots" --json "$RUN/choice.json" \
  | tee "$RUN/choice.md"
CHOSEN=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['chosen'])" "$RUN/choice.json")
mkdir -p "$OUT/chosen"
cp "$RUN/snapshots/$CHOSEN/"* "$OUT/chosen/"
python benchmarks/world_generator_profile.py profile --generators "v2=$RUN/snapshots/$CHOSEN" \
  "v2-final=$RUN/ema" "v1=$V1" --json "$RUN/profile.json" | tee "$RUN/profile.md"
tar czf "$OUT/logs.tar.gz" -C "$RUN" log.jsonl val.jsonl train_config.json choice.json choice.md profile.json \
  profile.md samples
echo "chosen: $CHOSEN"
