#!/usr/bin/env bash
# Every world trainer through the shared loop (train/loop.run_loop) on a GPU, briefly: the
# generator, the verifier and the reflector (renders), and the corrector with --compile on a small
# pool, then `--resume` of that run (on an H200 its 80 steps fit in the clock, so the resume reloads
# a finished checkpoint; resuming a run stopped midway is left to the CPU tests). Not a measurement
# of quality: it checks that CUDA, bf16, compile and checkpoint loading run. About 2 minutes on an H200.
#   bash benchmarks/train_loop_gpu_smoke.sh OUTDIR
set -uo pipefail
OUT=${1:?usage: train_loop_gpu_smoke.sh OUTDIR}
R=${R:-/tmp/loop-smoke}
mkdir -p "$OUT" "$R"
t() { local name=$1; shift; local t0=$(date +%s)
  if python -m reflectionflow train "$@" --quiet > "$OUT/$name.log" 2>&1; then echo "| $name | ok | $(( $(date +%s) - t0 )) s | $(tail -n 1 "$OUT/$name.log" | cut -c1-110) |"
  else echo "| $name | FAILED | $(( $(date +%s) - t0 )) s | $(tail -n 1 "$OUT/$name.log" | cut -c1-110) |"; fi; }
echo "| run | result | time | last line |"; echo "|---|---|---|---|"
t generator world-generator --out "$R/gen" --steps 60 --batch-size 64 --log-every 20 --ckpt-every 30 &
t verifier world-verifier --out "$R/ver" --steps 60 --batch-size 64 --log-every 20 --ckpt-every 30 --no-compile &
t reflector world-reflector --out "$R/refl" --steps 60 --batch-size 64 --log-every 20 --ckpt-every 30 --no-compile &
wait
C="world-corrector --out $R/corr --generator weights/world-generator-v1 --pool $R/pool --pool-size 512 --val-prompts 12 --batch-size 64 --log-every 20 --ckpt-every 40 --sample-every 40 --val-max 16 --workers 2"
t corrector-40 $C --steps 80 --compile --minutes 1.2 --label-workers 4
t corrector-resume $C --steps 80 --compile --resume
python - "$R" <<'PY'
import json, sys
from pathlib import Path
r = Path(sys.argv[1])
for run in ("gen", "ver", "refl", "corr"):
    rows = [json.loads(line) for line in (r / run / "log.jsonl").read_text().splitlines()] if (r / run / "log.jsonl").is_file() else []
    print(f"{run}: {len(rows)} log rows, last step {rows[-1]['step'] if rows else '-'}, keys {sorted(rows[-1])[:8] if rows else '-'}")
PY
