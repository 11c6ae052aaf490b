"""The search's latency budget from ``--budget-frac``: inside the range the latency table measured, on any machine."""
from __future__ import annotations

import pytest

from updp.core.config import override
from updp.core.errors import UpdpError
from updp.latency.table import LatencyTable
from updp.pipeline.config import RunConfig
from updp.pipeline.rundir import Inputs
from updp.pipeline.search import budget
from updp.pruner.spec import BlockSpec
from updp.search.space import SearchSpace
from updp.train.runtime import CPU

BASELINE_MS = 18.47  # the demo's baseline on the machine where its 1.25x budget was out of reach
FAILED = "stages.1.blocks.3"  # a block whose measurement failed: never in a plan


def _inputs(tmp_path, **search) -> Inputs:
    """10 blocks in stages of 3, 4 and 3, at most 2 pruned per stage: the most-pruned plan prunes 6."""
    blocks = [BlockSpec(f"stages.{s}.blocks.{i}", s, i, "toy", "ToyBlock", 8, 8, 1, macs=100, params=10,
                        merged_macs=50) for s, n in enumerate((3, 4, 3)) for i in range(n)]
    cfg = override(RunConfig(model="toy"), {f"search.{k}": v for k, v in search.items()})
    return Inputs(cfg, tmp_path, None, SearchSpace("toy", tuple(blocks), max_per_stage=2), None, 10, 32, CPU)


def _table(inp: Inputs, saved_frac: float) -> LatencyTable:
    return LatencyTable(BASELINE_MS, {n: saved_frac for n in inp.space.names if n != FAILED},
                        failed={FAILED: "engine build failed"})


@pytest.mark.parametrize("frac", [0.25, 0.5, 1.0])
def test_budget_frac_of_small_savings_is_inside_the_measured_range_and_reachable(tmp_path, capsys, frac):
    inp = _inputs(tmp_path, budget_frac=frac)
    table = _table(inp, 0.015)  # 1.5 % a block: the most-pruned plan saves 9 %, far from a 1.25x speedup
    floor = BASELINE_MS * (1 - 6 * 0.015)
    ms = budget(inp, table)
    assert ms == pytest.approx(BASELINE_MS - frac * (BASELINE_MS - floor), rel=1e-12)
    most_pruned = inp.space.repair(n for n in inp.space.names if n != FAILED)
    assert len(most_pruned) == 6 and table.predict(most_pruned) <= ms + 1e-9 and ms < BASELINE_MS
    assert capsys.readouterr().err == ""
    with pytest.raises(UpdpError, match="impossible budget"):  # what a fixed speedup gives on such a table
        budget(_inputs(tmp_path, target_speedup=1.25), table)


@pytest.mark.parametrize("saved_frac", [0.0, -0.002])  # nothing saved, or noise a little above the baseline
def test_budget_frac_on_a_table_measuring_no_saving_warns_and_searches_without_a_budget(tmp_path, capsys,
                                                                                          saved_frac):
    inp = _inputs(tmp_path, budget_frac=0.5)
    assert budget(inp, _table(inp, saved_frac)) is None
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "measured no saving" in err and "without a budget" in err
