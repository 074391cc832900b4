#!/usr/bin/env bash
# One on-policy round of the world's learned components on one GPU in one command (about 9.5 minutes
# on an H200): the default generator's search, harvested with the shipped judges and corrector, and
# all three learned components trained again on it.
# 1. at once: two harvests (`genref harvest`, two draws of training prompts) with the shipped
#    components, and the corrector's pool of judged samples of the default generator (`train
#    world-corrector --pool-only`);
# 2. the corrector: a LoRA on the default generator (so it reads the generator's whole text: 80 words),
#    trained on that pool with --compile as soon as the pool is ready, beside the harvests;
# 3. once the harvests are done: the verifier (flips and the scene head) and the reflector on both;
# 4. the shipped and the new verifier and reflector on the harvests' held-out searches
#    (benchmarks/world_onpolicy_compare.py: AUC and ECE per kind; exact match and fixes), stopped
#    after COMPARE_LIMIT seconds (120), once the model tars are written.
# On one H100 (docs/RESULTS.md, round 4) the pool's sampling beside the harvests took 359 s, which left
# the corrector 1.5 minutes: give it a run of its own (benchmarks/world_corrector_long.sh with
# GENERATOR=weights/world-generator), or a smaller POOL_FLAGS pool.
# Run it installed (pip install -e .) or with the core dependencies present (braceexpand).
#   bash benchmarks/world_onpolicy_round.sh OUTDIR [PROMPTS] [SECONDS] [ROUND]
# OUTDIR receives verifier.tar, reflector.tar, corrector.tar (fp16 weights, config, logs) and
# results.tar.gz (logs, harvest summaries, the comparison); the tables are printed last.
# A CPU smoke test: HARVEST_FLAGS="--generator world-render --corrector world-edit --verifier world-oracle
# --reflector world-oracle" POOL_FLAGS="--pool-size 64 --val-prompts 6 --label-workers 1" VSTEPS=2 RSTEPS=2
# CSTEPS=2 EXTRA="--batch-size 8 --device cpu" CEXTRA="--no-compile --workers 0 --val-max 8" with PROMPTS 6.
set -euo pipefail
OUT=${1:?usage: world_onpolicy_round.sh OUTDIR [PROMPTS] [SECONDS] [ROUND]}
PROMPTS=${2:-1000}
TOTAL=${3:-560}
ROUND=${4:-4}
R=${R:-/tmp/onpolicy-round}
T0=$(date +%s)
mkdir -p "$OUT" "$R"
rf() { python -m reflectionflow "$@"; }
EXTRA=${EXTRA:-}
for h in a b; do
  s=$([ $h = a ] && echo 2 || echo 3)
  rf genref harvest --out "$R/h$h" --round "$ROUND" --prompts "$PROMPTS" --prompt-seed "$s" --seed "100$s" --budget 8 \
    --processes 3 --label-workers 5 ${HARVEST_FLAGS:-} --quiet > "$R/h$h.log" 2>&1 &
  HPIDS="${HPIDS:-} $!"
done
# the corrector: pool, then training until SECONDS - 45
(
  C="train world-corrector --generator weights/world-generator --pool $R/pool ${POOL_FLAGS:---pool-size 32768 --label-workers 4} --quiet"
  rf $C --out "$R/corr" --pool-only > "$R/pool.log" 2>&1
  echo "corrector pool: $(( $(date +%s) - T0 )) s" >> "$R/times.log"
  MIN=$(python -c "print(round(max($TOTAL - ($(date +%s) - $T0) - 45, 60) / 60, 2))")
  rf $C --out "$R/corr" --steps "${CSTEPS:-6000}" --minutes "$MIN" --compile --workers 4 --batch-size 256 $EXTRA \
    --mix-steps 700 --sample-every 2000 --ckpt-every 2000 --log-every 100 --val-max 256 ${CEXTRA:-} > "$R/corr.log" 2>&1 \
    || echo "corrector training failed: see corr.log" >> "$R/times.log"
  echo "corrector: $(( $(date +%s) - T0 )) s" >> "$R/times.log"
) &
wait $HPIDS
echo "harvests: $(( $(date +%s) - T0 )) s" | tee -a "$R/times.log"
tail -n 1 "$R/ha.log" "$R/hb.log" || true
H="$R/ha,$R/hb"
MIN=$(python -c "print(round(max($TOTAL - ($(date +%s) - $T0) - 75, 60) / 60, 2))")
echo "judges: training for $MIN minutes each"
rf train world-verifier --out "$R/v" --harvest "$H" --generator-share 0.85 --steps "${VSTEPS:-5000}" --minutes "$MIN" \
  $EXTRA --workers 3 --log-every 250 --ckpt-every 1000 --no-compile --flip --scene-weight 0.5 --quiet > "$R/v.log" 2>&1 &
rf train world-reflector --out "$R/refl" --harvest "$H" --generator-share 0.75 --steps "${RSTEPS:-4500}" --minutes "$MIN" \
  $EXTRA --workers 3 --log-every 250 --ckpt-every 1000 --no-compile --quiet > "$R/refl.log" 2>&1 &
JPIDS="$JPIDS $!"
wait $JPIDS
echo "training: $(( $(date +%s) - T0 )) s" | tee -a "$R/times.log"
python benchmarks/export_fp16.py "$R" "$R/export" v:verifier:verifier refl:reflector:reflector corr:corrector:corrector
for d in verifier reflector corrector; do [ -d "$R/export/$d" ] && tar cf "$OUT/$d.tar" -C "$R/export" "$d"; done
# shipped against new on the harvests' held-out searches (the reflections through the shipped corrector)
timeout "${COMPARE_LIMIT:-120}" python benchmarks/world_onpolicy_compare.py --harvest "$R/ha" "$R/hb" \
  --verifier "$R/v/verifier" --reflector "$R/refl/reflector" --json "$R/compare.json" | tee "$R/compare.md" || true
for h in ha hb; do cp "$R/$h/summary.json" "$R/$h-summary.json" 2>/dev/null || true; done
tar czf "$OUT/results.tar.gz" -C "$R" ha.log hb.log pool.log corr.log v.log refl.log times.log \
  compare.md compare.json ha-summary.json hb-summary.json 2>/dev/null || true
cat "$R/times.log"
echo "total: $(( $(date +%s) - T0 )) s"
tail -n 3 "$R/v/log.jsonl" "$R/refl/log.jsonl" 2>/dev/null || true
cat "$R/corr/val.jsonl" 2>/dev/null || true
