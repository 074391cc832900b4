#!/usr/bin/env bash
# Round 2 of the on-policy verifier on one GPU (about 8 minutes on an H200): harvest with the round-1
# judges (the shipped defaults), train the verifier on it, compare it with the shipped one on the held-out
# searches, and run best-of-32 noise on GenEval-Shapes with it (re-scored by the oracle verifier too).
#   bash benchmarks/world_verifier_round2.sh OUTDIR [PROMPTS] [MINUTES]
set -euo pipefail
OUT=${1:?usage: world_verifier_round2.sh OUTDIR [PROMPTS] [MINUTES]}
PROMPTS=${2:-1200}
MIN=${3:-3.5}
R=${R:-/tmp/round2}
H=$R/h2
T0=$(date +%s)
mkdir -p "$OUT" "$R"
python -m reflectionflow genref harvest --out "$H" --round 2 --prompts "$PROMPTS" --prompt-seed 2 --seed 1002 \
  --budget 8 --processes 3 --label-workers 15 --quiet 2>&1 | tail -2
echo "harvest: $(( $(date +%s) - T0 )) s"
python -m reflectionflow train world-verifier --out "$R/ver" --harvest "$H" --generator-share 0.85 --steps 5000 \
  --minutes "$MIN" --workers 12 --log-every 250 --ckpt-every 1000 --no-compile --quiet 2>&1 | tail -1
echo "verifier: $(( $(date +%s) - T0 )) s"
mkdir -p "$R/export/world-verifier"
python - "$R" <<'PY'
import shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
r = Path(sys.argv[1])
state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(str(r / "ver/verifier/model.safetensors")).items()}
save_file(state, str(r / "export/world-verifier/model.safetensors"))
shutil.copy(r / "ver/verifier/config.json", r / "export/world-verifier/config.json")
for name in ("log.jsonl", "scores.json", "train_config.json"):
    shutil.copy(r / "ver" / name, r / "export" / f"ver-{name}")
shutil.copy(r / "h2/summary.json", r / "export/h2-summary.json")
PY
python - "$R" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
from reflectionflow.models.verifier import WorldVerifier
from reflectionflow.backends.world.learned import DEFAULT_VERIFIER
from reflectionflow.train.verifier import harvest_pool, held_out_scores
r = Path(sys.argv[1])
_, held = harvest_pool([str(r / "h2")], 0.1)
res = {}
for name, f in (("shipped", DEFAULT_VERIFIER), ("round2", r / "export/world-verifier")):
    m = WorldVerifier.from_pretrained(f, device="cuda")
    res[name] = held_out_scores(m, held, m.config.temperature)
    print(name, "all AUC %.3f ECE %.3f" % (res[name]["auc"], res[name]["ece"]),
          {k: round(v["auc"], 3) for k, v in res[name]["kinds"].items()})
(r / "export/compare-round2.json").write_text(json.dumps(res, indent=1))
PY
tar cf "$OUT/round2.tar" -C "$R/export" .  # what is done so far comes back even if the sweep is cut
cp "$R/export/world-verifier/"* weights/world-verifier/  # this copy of the tree only: the sweep uses it by default
timeout "${SWEEP_LIMIT:-200}" python -m reflectionflow sweep --prompts geneval-shapes --methods noise --budget 32 \
  --verifiers world-learned,world-oracle --batch-size 1024 --prompt-batch 600 \
  --out "$R/noise" --quiet > "$R/noise.log" 2>&1 || echo "noise sweep did not finish: $(tail -1 "$R/noise.log")"
cp "$R/noise/sweep.md" "$R/export/noise-round2.md" 2>/dev/null || true
tar cf "$OUT/round2.tar" -C "$R/export" .
echo "total: $(( $(date +%s) - T0 )) s"
sed -n '1,16p' "$R/noise/sweep.md" 2>/dev/null || true
