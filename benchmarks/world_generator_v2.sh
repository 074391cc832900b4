#!/usr/bin/env bash
# A world generator v2 run on one GPU, in one command (about 9 minutes): train an MMDiT on template
# prompts + explicit captions with an EMA snapshot every 1,000 steps, choose the snapshot closest to
# FLUX.1-dev's GenEval profile on the VALIDATION prompts (benchmarks/world_generator_profile.py
# choose), then profile the chosen snapshot and the final weights (and any PROFILE_ALSO generators)
# on GenEval-Shapes (template vs explicit prompts, 8 seeds per prompt).
#   bash benchmarks/world_generator_v2.sh OUTDIR [MINUTES]
# The recipe comes from the environment; the defaults are the shipped default's (weights/MODEL_CARD.md):
#   SIZE=small INIT_FROM=weights/world-generator-v1 STEPS=8000 LR=5e-4 WARMUP=300
#   MIX=relation_noise=0.9,binding_noise=0.5,count_noise=0.15   (world.captions.CaptionMix)
# The first v2 (the `compact` model from scratch, clean captions) was
#   SIZE=compact INIT_FROM= STEPS=12000 LR=8e-4 WARMUP=500 MIX= with MINUTES 5.5.
# OUTDIR receives chosen.part-* (the chosen snapshot's model.safetensors cut in 15 MB pieces, so that
# each fits the device's 16 MiB file limit; `cat chosen.part-* > model.safetensors`), chosen-config.json,
# logs.tar.gz (training log, validation, choice and profile JSON, sample grids) and prints the tables last.
# A CPU smoke run: SIZE=tiny INIT_FROM= STEPS=4 EXTRA="--device cpu --batch-size 8 --workers 0
# --no-compile --sample-every 2 --val-prompts 6" CHOOSE_FLAGS="--limit 12 --batch 16"
# PROFILE_FLAGS="--limit 12 --samples 2 --batch 16" bash benchmarks/world_generator_v2.sh OUT 1
set -euo pipefail
OUT=${1:?usage: world_generator_v2.sh OUTDIR [MINUTES]}
MIN=${2:-5.5}
RUN=${RUN:-/tmp/world-generator-v2}
SIZE=${SIZE:-small}
INIT_FROM=${INIT_FROM-weights/world-generator-v1}
STEPS=${STEPS:-8000}
LR=${LR:-5e-4}
WARMUP=${WARMUP:-300}
MIX=${MIX-relation_noise=0.9,binding_noise=0.5,count_noise=0.15}
T0=$(date +%s)
mkdir -p "$OUT"
ARGS=(--out "$RUN" --size "$SIZE" --steps "$STEPS" --minutes "$MIN" --lr "$LR" --warmup "$WARMUP" --ema 0.999
      --log-every 250 --ckpt-every 1000 --snapshots --no-final-eval --quiet)
[ -n "$INIT_FROM" ] && ARGS+=(--init-from "$INIT_FROM")
[ -n "$MIX" ] && ARGS+=(--caption-mix "$MIX")
# shellcheck disable=SC2086  # EXTRA is a list of flags
python -m reflectionflow train world-generator "${ARGS[@]}" ${EXTRA:---compile --workers 14 --sample-every 1000 \
  --val-prompts 120} 2>&1 | tail -20
echo "training: $(( $(date +%s) - T0 )) s"
cp -r "$RUN/ema" "$RUN/snapshots/step_final"
# shellcheck disable=SC2086
python benchmarks/world_generator_profile.py choose --snapshots "$RUN/snapshots" --json "$RUN/choice.json" \
  ${CHOOSE_FLAGS:-} | tee "$RUN/choice.md"
CHOSEN=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['chosen'])" "$RUN/choice.json")
echo "choice: $(( $(date +%s) - T0 )) s"
# shellcheck disable=SC2086
python benchmarks/world_generator_profile.py profile --generators "chosen=$RUN/snapshots/$CHOSEN" \
  "final=$RUN/ema" ${PROFILE_ALSO:-} --json "$RUN/profile.json" ${PROFILE_FLAGS:-} | tee "$RUN/profile.md"
split -b 15000000 -d "$RUN/snapshots/$CHOSEN/model.safetensors" "$OUT/chosen.part-"
cp "$RUN/snapshots/$CHOSEN/config.json" "$OUT/chosen-config.json"
FILES=(log.jsonl val.jsonl train_config.json choice.json choice.md profile.json profile.md samples)
[ -f "$RUN/init_from.json" ] && FILES+=(init_from.json)
tar czf "$OUT/logs.tar.gz" -C "$RUN" "${FILES[@]}"
echo "chosen: $CHOSEN; total $(( $(date +%s) - T0 )) s"
cat "$RUN/choice.md" "$RUN/profile.md"
