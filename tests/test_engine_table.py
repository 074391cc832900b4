"""With the oracle components, reflection at 8 samples beats noise at 8 samples (the paper's claim).

The full table (all 553 GenEval-Shapes prompts) is benchmarks/engine_oracle_table.py, recorded in
docs/RESULTS.md; here the same code runs on 10 prompts per category.
"""

from __future__ import annotations

from .conftest import load_benchmark_module
from .test_engine_support import subset_file


def test_reflection_beats_noise_at_equal_budget_on_geneval_shapes(tmp_path):
    bench = load_benchmark_module("engine_oracle_table")
    rows = bench.run_table(str(subset_file(tmp_path, 10)), [8], ["noise", "reflection"], tmp_path / "runs",
                           extra_at_max=())
    acc = {r.variant: r.accuracy for r in rows}
    assert all(r.images == 8 * 60 for r in rows)  # equal budgets, really spent
    assert acc["reflection"] > acc["noise"] + 0.05, bench.markdown(rows, [8])
