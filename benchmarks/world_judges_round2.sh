#!/usr/bin/env bash
# Round 2 of the world's on-policy judges on one GPU in one command (about 9 minutes on an H200):
# 1. two harvests at once with the shipped (round-1) judges, on two draws of training prompts;
# 2. on both: three verifiers (as round 1; + left-right flips; + flips and the scene head), the
#    reflector, and a corrector LoRA on the generator v1 (the shipped corrector's base), side by side;
# 3. every verifier against the shipped one on the harvests' held-out searches, and the reflector and
#    corrector against the shipped ones (benchmarks/world_onpolicy_compare.py).
# The model tars are written before the comparison, which stops after COMPARE_LIMIT seconds (120).
#   bash benchmarks/world_judges_round2.sh OUTDIR [PROMPTS] [SECONDS]
# OUTDIR receives one tar per model (fp16 weights, config, logs, scores) and results.tar.gz (the
# comparisons' JSON, the harvests' summaries, the logs); the tables are printed last.
# ONLY_V2=1 trains only the v2 verifier and the reflector (the comparison then uses the shipped corrector).
# A CPU smoke test: HARVEST_FLAGS="--generator world-render --corrector world-edit --verifier world-oracle
# --reflector world-oracle" VSTEPS=2 CSTEPS=2 RSTEPS=2 EXTRA="--batch-size 8 --device cpu" with PROMPTS 6.
set -euo pipefail
OUT=${1:?usage: world_judges_round2.sh OUTDIR [PROMPTS] [SECONDS]}
PROMPTS=${2:-1000}
TOTAL=${3:-540}
R=${R:-/tmp/judges-r2}
T0=$(date +%s)
mkdir -p "$OUT" "$R"
rf() { python -m reflectionflow "$@"; }
[ -n "${SKIP_HARVEST:-}" ] || rf genref harvest --out "$R/ha" --round 2 --prompts "$PROMPTS" --prompt-seed 2 --seed 1002 --budget 8 \
  --processes 3 --label-workers 7 ${HARVEST_FLAGS:-} --quiet > "$R/ha.log" 2>&1 &
[ -n "${SKIP_HARVEST:-}" ] || rf genref harvest --out "$R/hb" --round 2 --prompts "$PROMPTS" --prompt-seed 3 --seed 1003 --budget 8 \
  --processes 3 --label-workers 7 ${HARVEST_FLAGS:-} --quiet > "$R/hb.log" 2>&1 &
wait
tail -n 1 "$R/ha.log" "$R/hb.log"
echo "harvests: $(( $(date +%s) - T0 )) s"
H="$R/ha,$R/hb"
LEFT=$(( TOTAL - ($(date +%s) - T0) - 100 ))
MIN=$(python -c "print(round(max($LEFT, 60) / 60, 2))")
echo "training for $MIN minutes each"
EXTRA=${EXTRA:-}
V="--harvest $H --generator-share 0.85 --steps ${VSTEPS:-5000} --minutes $MIN $EXTRA --workers 3 --log-every 250 --ckpt-every 1000 --no-compile --quiet"
[ -n "${ONLY_V2:-}" ] || rf train world-verifier --out "$R/v0" $V > "$R/v0.log" 2>&1 &
[ -n "${ONLY_V2:-}" ] || rf train world-verifier --out "$R/v1" $V --flip > "$R/v1.log" 2>&1 &
rf train world-verifier --out "$R/v2" $V --flip --scene-weight 0.5 > "$R/v2.log" 2>&1 &
rf train world-reflector --out "$R/refl" --harvest "$H" --generator-share 0.75 --steps "${RSTEPS:-4500}" --minutes "$MIN" \
  $EXTRA --workers 3 --log-every 250 --ckpt-every 1000 --no-compile --quiet > "$R/refl.log" 2>&1 &
[ -n "${ONLY_V2:-}" ] || rf train world-corrector --out "$R/corr" --harvest "$H" --generator weights/world-generator-v1 \
  --steps "${CSTEPS:-3500}" --minutes "$MIN" --no-compile --workers 3 --batch-size 256 $EXTRA --mix-steps 700 --sample-every 1750 --ckpt-every 1750 \
  --log-every 100 --keep-share 0.35 --val-max 256 --quiet > "$R/corr.log" 2>&1 &
wait
tail -n 1 "$R"/v2.log "$R"/refl.log || true
echo "training: $(( $(date +%s) - T0 )) s"
python - "$R" <<'PY'
import json, sys
from pathlib import Path
import torch
from reflectionflow.backends.world.learned import DEFAULT_VERIFIER
from reflectionflow.models.verifier import WorldVerifier
from reflectionflow.train.verifier import harvest_pool, held_out_scores
r = Path(sys.argv[1])
_, held = harvest_pool([str(r / "ha"), str(r / "hb")], 0.1)
res = {}
for name, f in (("shipped", Path(DEFAULT_VERIFIER)), ("v0", r / "v0/verifier"), ("v1", r / "v1/verifier"),
                ("v2", r / "v2/verifier")):
    if not (f / "model.safetensors").is_file():
        print(name, "missing"); continue
    m = WorldVerifier.from_pretrained(f, device="cuda" if torch.cuda.is_available() else "cpu")
    res[name] = held_out_scores(m, held, m.config.temperature)
    f3 = lambda x: "-" if x is None else f"{x:.3f}"
    print(f"| {name} | {f3(res[name]['auc'])} | {f3(res[name]['ece'])} | "
          + " | ".join(f"{k} {f3(v['auc'])}" for k, v in res[name]["kinds"].items()) + " |")
(r / "compare-verifiers.json").write_text(json.dumps(res, indent=1))
PY
python benchmarks/export_fp16.py "$R" "$R/export" v0:verifier v1:verifier v2:verifier refl:reflector corr:corrector
for d in v0 v1 v2 refl corr; do [ -d "$R/export/$d" ] && tar cf "$OUT/$d.tar" -C "$R/export" "$d"; done
CORR="$R/corr/corrector"; [ -d "$CORR" ] || CORR=weights/world-corrector
timeout "${COMPARE_LIMIT:-120}" python benchmarks/world_onpolicy_compare.py --harvest "$R/ha" "$R/hb" --verifier "$R/v2/verifier" \
  --reflector "$R/refl/reflector" --corrector "$CORR" --json "$R/compare.json" | tee "$R/compare.md" || true
cp "$R/ha/summary.json" "$R/ha-summary.json"; cp "$R/hb/summary.json" "$R/hb-summary.json"
tar czf "$OUT/results.tar.gz" -C "$R" ha.log hb.log v0.log v1.log v2.log refl.log corr.log compare.md compare.json \
  compare-verifiers.json ha-summary.json hb-summary.json 2>/dev/null || true
echo "total: $(( $(date +%s) - T0 )) s"
cat "$R/compare.md" || true
