"""Copy trained world models out of their run folders for shipping: fp16 weights, the config, and the
run's logs beside them (as run-*.jsonl / run-*.json).

    python benchmarks/export_fp16.py RUN_ROOT EXPORT_DIR RUN:SUBFOLDER[:NAME] ...

For each `RUN:SUBFOLDER[:NAME]`, RUN_ROOT/RUN/SUBFOLDER is copied to EXPORT_DIR/NAME (NAME defaults to
RUN); `model.safetensors` is written in fp16. A missing run is reported and skipped, so a script that
trains several models still exports the ones that finished.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

LOGS = ("log.jsonl", "scores.json", "train_config.json", "val.jsonl")


def export(run: Path, sub: str, dst: Path) -> bool:
    from safetensors.torch import load_file, save_file

    src = run / sub
    if not src.is_dir():
        print(f"{src}: missing, not exported")
        return False
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name == "model.safetensors":
            state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(str(f)).items()}
            save_file(state, str(dst / f.name))
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    for name in LOGS:
        if (run / name).is_file():
            shutil.copy(run / name, dst / f"run-{name}")
    return True


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[2].strip())
        return 2
    root, out = Path(argv[0]), Path(argv[1])
    for spec in argv[2:]:
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            print(f"{spec!r}: expected RUN:SUBFOLDER[:NAME]")
            return 2
        run, sub = parts[0], parts[1]
        export(root / run, sub, out / (parts[2] if len(parts) == 3 else run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
