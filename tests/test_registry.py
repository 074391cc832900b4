"""The component registry lists every built-in name, whatever was imported before."""

from __future__ import annotations

import json
import subprocess
import sys


def _names_after(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code + "\nimport json\nfrom reflectionflow import components as c\n"
                          "print(json.dumps({k: c.names(k) for k in c.KINDS}))"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_names_do_not_depend_on_import_order():
    fresh = _names_after("")
    after_all = _names_after("import reflectionflow.backends.vlm, reflectionflow.backends.flux, "
                             "reflectionflow.backends.world, reflectionflow.metrics.verifier")
    assert fresh == after_all
    assert {"world-learned", "world-oracle", "vlm-score", "vlm-yesno", "reward"} <= set(fresh["verifier"])
    assert {"world-mmdit", "reflection", "kontext"} <= set(fresh["corrector"])
