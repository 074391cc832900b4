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
# EARLY=0.9 (a verifier score) adds adaptive compute on each set: the budget-8 defaults with
# `--early-stop 0.9 --reallocate none` (def8e), then benchmarks/adaptive_replay.py on def8r, def8e and
# refl (accuracy, images and ledger seconds per prompt, fixed budget vs stopping at 0.8 / 0.9 / 0.95).
# SKIP="prompt refl" leaves those runs out of each set (names: noise prompt refl def8 def8r def8e).
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
want() { case " ${SKIP:-} " in *" $1 "*) return 1 ;; esac; }
sw() { timeout "${SWEEP_LIMIT:-430}" python -m reflectionflow sweep --batch-size 1024 --prompt-batch 600 --quiet "$@"; }
if [ -n "${ORACLE:-}" ]; then  # the oracle judges on GenEval-Shapes: noise vs noise & prompt, curves 1-32
  sw --prompts geneval-shapes --methods prompt --budget 32 --verifiers world-oracle --reflector world-oracle \
    --out "$R/oracle-np" > "$R/oracle-np.log" 2>&1 &
fi
for set in ${SETS:-geneval-shapes fresh}; do
  P=$set; [ "$set" = fresh ] && P="$R/fresh.jsonl"
  want noise && sw --prompts "$P" --methods noise --budget 32 --verifiers world-learned,world-oracle --out "$R/$set-noise" \
    > "$R/$set-noise.log" 2>&1 &
  want prompt && sw --prompts "$P" --methods prompt --budget 32 --out "$R/$set-prompt" > "$R/$set-prompt.log" 2>&1 &
  if [ "${ON_KEEP:-correct}" = resample ]; then
    echo '{"on_keep": "resample"}' > "$R/resample.json"
    want refl && sw --prompts "$P" --methods reflection --budget 32 --config "$R/resample.json" --out "$R/$set-refl" \
      > "$R/$set-refl.log" 2>&1 &
    want def8r && sw --prompts "$P" --methods reflection --budget 8 --config "$R/resample.json" --out "$R/$set-def8r" \
      > "$R/$set-def8r.log" 2>&1 &
  else
    want refl && sw --prompts "$P" --methods reflection --budget 32 --config "$R/correct.json" --out "$R/$set-refl" > "$R/$set-refl.log" 2>&1 &
  fi
  if [ -n "${EARLY:-}" ]; then
    echo "{\"on_keep\": \"resample\", \"early_stop\": $EARLY, \"reallocate\": \"none\"}" > "$R/early.json"
    want def8e && sw --prompts "$P" --methods reflection --budget 8 --config "$R/early.json" --out "$R/$set-def8e" \
      > "$R/$set-def8e.log" 2>&1 &
  fi
  [ -n "${SKIP_CORRECT:-}" ] || ! want def8 || sw --prompts "$P" --methods reflection --budget 8 --config "$R/correct.json" \
    --out "$R/$set-def8" > "$R/$set-def8.log" 2>&1 &
done
wait
echo "sweeps: $(( $(date +%s) - T0 )) s"
for f in "$R"/*/; do  # every sweep folder under $R (a reused R brings its older ones too)
  f=${f%/}
  cp "$f/sweep.md" "$OUT/$(basename "$f").md" && cp "$f/sweep.json" "$OUT/$(basename "$f").json" \
    || echo "$(basename "$f"): no sweep table (stopped by the time limit; see $f.log)"
done
runs=""; for r in noise/runs/noise prompt/runs/prompt refl/runs/reflection; do  # the judges on the fresh candidates
  [ -f "$R/fresh-${r%%/*}/sweep.json" ] && runs="$runs $R/fresh-$r-world-learned"; done
[ -z "$runs" ] || [ ! -f "$R/fresh-noise/sweep.json" ] || timeout "${EVAL_LIMIT:-150}" python benchmarks/world_onpolicy_eval.py \
  --runs $runs --noise-run "$R/fresh-noise/runs/noise-world-learned" --workers 15 --json "$OUT/eval.json" \
  | tee "$R/eval.md" || true
if [ -n "${EARLY:-}" ]; then
  for set in ${SETS:-geneval-shapes fresh}; do
    runs=""; for k in def8r def8e refl; do
      [ -f "$R/$set-$k/sweep.json" ] && runs="$runs $R/$set-$k/runs/reflection-world-learned"; done
    [ -z "$runs" ] || timeout "${EVAL_LIMIT:-150}" python benchmarks/adaptive_replay.py --runs $runs \
      --thresholds 0.8,0.9,0.95 --json "$OUT/adaptive-$set.json" | tee "$R/adaptive-$set.md" || true
  done
fi
echo "total: $(( $(date +%s) - T0 )) s"
for f in "$R"/*/; do f=${f%/}; echo "## $(basename "$f")"; sed -n '1,12p' "$f/sweep.md" || true; done
cat "$R"/eval.md "$R"/adaptive-*.md 2>/dev/null || true
