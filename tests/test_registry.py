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


def test_number_checks_refuse_bools_non_finite_and_out_of_range_values():
    from reflectionflow.runtime import is_int, is_number

    assert is_int(3, 1) and is_int(0) and is_int(5, 0, 5)
    assert not any([is_int(True), is_int(2.0), is_int("3"), is_int(0, 1), is_int(6, 0, 5)])
    assert is_number(0.5, 0, 1) and is_number(3) and is_number(1, maximum=1.0, above=0.0)
    assert not any([is_number(False), is_number(float("nan")), is_number(float("inf")), is_number("1"),
                    is_number(0.0, above=0.0), is_number(1.5, 0, 1), is_number(-1, 0)])
