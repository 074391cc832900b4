#!/usr/bin/env bash
# On-policy world judges and corrector, round 1, on one GPU in one command (about 9 minutes on an H200):
# 1. harvest: the real search (noise, prompt, reflection at budget 8) with the shipped components on
#    training prompts, every candidate labelled (`reflectionflow genref harvest`);
# 2. the corrector (a LoRA on the generator v2), the verifier and the reflector trained on it side
#    by side, each within the time left;
# 3. shipped vs new on held-out data (benchmarks/world_onpolicy_compare.py).
#   bash benchmarks/world_onpolicy.sh OUTDIR [PROMPTS] [SECONDS]
# OUTDIR receives new-weights.tar (fp16 verifier, corrector, logs), reflector.tar, logs.tar.gz and compare.json;
# the tables are printed last. SECONDS (default 540) is the whole job's target.
set -euo pipefail
OUT=${1:?usage: world_onpolicy.sh OUTDIR [PROMPTS] [SECONDS]}
PROMPTS=${2:-800}
TOTAL=${3:-540}
R=${R:-/tmp/onpolicy}
H=$R/h1
T0=$(date +%s)
mkdir -p "$OUT" "$R"
rf() { python -m reflectionflow "$@"; }
# Smoke test on a CPU: HARVEST_FLAGS="--generator world-render ..." with a few PROMPTS.
/usr/bin/time -f "harvest %e s" python -m reflectionflow genref harvest --out "$H" --round 1 --prompts "$PROMPTS" \
  --budget 8 --processes 3 --label-workers "${LABEL_WORKERS:-15}" ${HARVEST_FLAGS:-} --quiet 2>&1 | tail -3
LEFT=$(( TOTAL - ($(date +%s) - T0) - 110 ))
MIN=$(python -c "print(round(max($LEFT, 90) / 60, 2))")
echo "training for $MIN minutes each"
rf train world-corrector --out "$R/corr" --harvest "$H" --generator weights/world-generator --steps 3500 \
  --minutes "$MIN" --compile --workers 5 --batch-size 256 --mix-steps 700 --sample-every 1750 --ckpt-every 1750 \
  --log-every 100 --keep-share 0.35 --val-max 256 --quiet > "$R/corr.log" 2>&1 &
rf train world-verifier --out "$R/ver" --harvest "$H" --generator-share 0.75 --steps 4000 --minutes "$MIN" \
  --workers 4 --log-every 250 --ckpt-every 1000 --no-compile --quiet > "$R/ver.log" 2>&1 &
rf train world-reflector --out "$R/refl" --harvest "$H" --generator-share 0.75 --steps 4500 --minutes "$MIN" \
  --workers 4 --log-every 250 --ckpt-every 1000 --no-compile --quiet > "$R/refl.log" 2>&1 &
wait
tail -n 2 "$R/corr.log" "$R/ver.log" "$R/refl.log"
python benchmarks/world_onpolicy_compare.py --harvest "$H" --verifier "$R/ver/verifier" --reflector "$R/refl/reflector" \
  --corrector "$R/corr/corrector" --json "$OUT/compare.json" | tee "$R/compare.md"
python - "$R" <<'PY'
import shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
r = Path(sys.argv[1])
for name, src in (("world-verifier", r / "ver/verifier"), ("world-reflector", r / "refl/reflector")):
    dst = r / "export" / name
    dst.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(state, str(dst / "model.safetensors"))
    shutil.copy(src / "config.json", dst / "config.json")
shutil.copytree(r / "corr/corrector", r / "export/world-corrector", dirs_exist_ok=True)
PY
for d in ver refl corr; do cp "$R/$d/log.jsonl" "$R/export/$d-log.jsonl" || true; cp "$R/$d/train_config.json" "$R/export/$d-train_config.json"; done
cp "$R/corr/val.jsonl" "$R/ver/scores.json" "$R/corr/scores.json" "$H/summary.json" "$H/harvest.json" "$R/export/" 2>/dev/null || true
cp "$R/ver/scores.json" "$R/export/ver-scores.json"; cp "$R/corr/scores.json" "$R/export/corr-scores.json"
tar cf "$OUT/reflector.tar" -C "$R/export" world-reflector
tar cf "$OUT/new-weights.tar" -C "$R/export" --exclude world-reflector .
tar czf "$OUT/logs.tar.gz" -C "$R" corr.log ver.log refl.log compare.md corr/samples 2>/dev/null || true
ls -la "$OUT"
echo "elapsed $(( $(date +%s) - T0 )) s"
cat "$H/summary.json" | python -c "import json,sys; d=json.load(sys.stdin); print({k: d[k] for k in ('samples','failed','fixable','kinds','seconds')})"
cat "$R/compare.md"
