#!/usr/bin/env bash
# The world backend's defaults, end to end, on GenEval-Shapes and on fresh prompts (one GPU, about
# 9 minutes on an H200): one sample, the `generate` defaults (reflection at budget 8: pool 2 + 2 x 3),
# noise at 8 and 32 (re-scored by the oracle verifier too), prompt and reflection at 32, all with the
# learned judges; then the judges on the candidates those runs made (benchmarks/world_onpolicy_eval.py).
# Reflection runs with `--on-keep correct` (def8, refl); with ON_KEEP=resample, reflection at 32 runs with
# `--on-keep resample` (the default) and budget 8 runs both ways (def8: correct, def8r: resample).
# SKIP_CORRECT=1 leaves out the budget-8 run with `--on-keep correct`.
# ORACLE=1 adds noise & prompt at 32 on GenEval-Shapes with the oracle judges (oracle-np; noise with the
# oracle verifier is the noise run re-scored, same seeds). SETS="fresh" (or "geneval-shapes") runs one set.
#   bash benchmarks/world_onpolicy_eval.sh OUTDIR [FRESH_SEED]
# OUTDIR receives the sweep tables (*.md, *.json) and eval.json; the tables are printed last.
set -euo pipefail
OUT=${1:?usage: world_onpolicy_eval.sh OUTDIR [FRESH_SEED]}
SEED=${2:-2026}
R=${R:-/tmp/onpolicy-eval}
T0=$(date +%s)
mkdir -p "$OUT" "$R"
python -m reflectionflow world prompts --out "$R/fresh.jsonl" --seed "$SEED" --per-category 50
echo '{"on_keep": "correct"}' > "$R/correct.json"
sw() { timeout "${SWEEP_LIMIT:-430}" python -m reflectionflow sweep --batch-size 1024 --prompt-batch 600 --quiet "$@"; }
if [ -n "${ORACLE:-}" ]; then  # the oracle judges on GenEval-Shapes: noise vs noise & prompt, curves 1-32
  sw --prompts geneval-shapes --methods prompt --budget 32 --verifiers world-oracle --reflector world-oracle \
    --out "$R/oracle-np" > "$R/oracle-np.log" 2>&1 &
fi
for set in ${SETS:-geneval-shapes fresh}; do
  P=$set; [ "$set" = fresh ] && P="$R/fresh.jsonl"
  sw --prompts "$P" --methods noise --budget 32 --verifiers world-learned,world-oracle --out "$R/$set-noise" \
    > "$R/$set-noise.log" 2>&1 &
  sw --prompts "$P" --methods prompt --budget 32 --out "$R/$set-prompt" > "$R/$set-prompt.log" 2>&1 &
  if [ "${ON_KEEP:-correct}" = resample ]; then
    echo '{"on_keep": "resample"}' > "$R/resample.json"
    sw --prompts "$P" --methods reflection --budget 32 --config "$R/resample.json" --out "$R/$set-refl" \
      > "$R/$set-refl.log" 2>&1 &
    sw --prompts "$P" --methods reflection --budget 8 --config "$R/resample.json" --out "$R/$set-def8r" \
      > "$R/$set-def8r.log" 2>&1 &
  else
    sw --prompts "$P" --methods reflection --budget 32 --config "$R/correct.json" --out "$R/$set-refl" > "$R/$set-refl.log" 2>&1 &
  fi
  [ -n "${SKIP_CORRECT:-}" ] || sw --prompts "$P" --methods reflection --budget 8 --config "$R/correct.json" \
    --out "$R/$set-def8" > "$R/$set-def8.log" 2>&1 &
done
wait
echo "sweeps: $(( $(date +%s) - T0 )) s"
for f in "$R"/*-noise "$R"/*-prompt "$R"/*-refl "$R"/*-def8 "$R"/*-def8r "$R"/oracle-np; do
  [ -d "$f" ] || continue
  cp "$f/sweep.md" "$OUT/$(basename "$f").md" && cp "$f/sweep.json" "$OUT/$(basename "$f").json" \
    || echo "$(basename "$f"): no sweep table (stopped by the time limit; see $f.log)"
done
timeout "${EVAL_LIMIT:-150}" python benchmarks/world_onpolicy_eval.py --runs "$R/fresh-noise/runs/noise-world-learned" \
  "$R/fresh-prompt/runs/prompt-world-learned" "$R/fresh-refl/runs/reflection-world-learned" \
  --noise-run "$R/fresh-noise/runs/noise-world-learned" --workers 15 --json "$OUT/eval.json" | tee "$R/eval.md" || true
echo "total: $(( $(date +%s) - T0 )) s"
for f in "$R"/*-noise "$R"/*-prompt "$R"/*-refl "$R"/*-def8 "$R"/*-def8r "$R"/oracle-np; do [ -d "$f" ] || continue; echo "## $(basename "$f")"; sed -n '1,12p' "$f/sweep.md" || true; done
cat "$R/eval.md"
