"""The depth-pruning comparison benchmark: every method runs and merges exactly (nothing about who wins)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from pruning_methods import block_influence, drop_blocks, droppable, prune_channels, random_plan  # noqa: E402

from updp.pruner.discovery import find_blocks  # noqa: E402
from updp.search.space import SearchSpace  # noqa: E402


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10).eval()


def test_block_influence_is_zero_for_a_block_that_passes_its_input_through():
    model = _model("test_convnext")
    names = [b.name for b in find_blocks(model, (3, 32, 32), costed=False).blocks]
    for n in names:  # timm starts layer scale at 1e-6 (every block near identity): make each block count
        model.get_submodule(n).gamma.data.fill_(100.0)
    model.get_submodule(names[1]).gamma.data.zero_()  # layer scale 0: the block's output is its input
    batches = [(torch.randn(4, 3, 32, 32), None)]
    scores = block_influence(model, names, batches)
    assert scores[names[1]] == pytest.approx(0.0, abs=1e-6)
    assert all(s > 1e-3 for n, s in scores.items() if n != names[1])
    assert droppable(model, names, batches)[0] == names[1]


def test_dropped_blocks_are_identity_and_the_original_is_untouched():
    model = _model("test_convnext")
    names = [b.name for b in find_blocks(model, (3, 32, 32), costed=False).blocks]
    dropped = drop_blocks(model, names[:2])
    assert all(isinstance(dropped.get_submodule(n), torch.nn.Identity) for n in names[:2])
    assert not isinstance(model.get_submodule(names[0]), torch.nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    assert dropped(x).shape == model(x).shape
    assert sum(p.numel() for p in dropped.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,size", [("test_convnext", 32), ("test_vit", 160), ("mobilenetv2_050", 32)])
def test_channel_pruning_shrinks_every_family_and_keeps_the_classifier(name, size):
    model = _model(name)
    pruned = prune_channels(model, 0.3, (3, size, size))
    x = torch.randn(2, 3, size, size)
    assert pruned(x).shape == (2, 10)
    assert sum(p.numel() for p in pruned.parameters()) < 0.85 * sum(p.numel() for p in model.parameters())
    assert pruned.get_classifier().out_features == 10
    unchanged = prune_channels(model, 0.0, (3, size, size))
    torch.testing.assert_close(unchanged(x), model(x))


def test_random_plans_have_the_asked_size_within_the_stage_cap_and_differ_by_seed():
    model = _model("mobilenetv2_050")
    space = SearchSpace(model.default_cfg["architecture"], find_blocks(model, (3, 32, 32)).blocks, max_per_stage=1)
    stage = {b.name: b.stage for b in space.candidates}
    plans = {random_plan(space, 3, seed) for seed in range(8)}
    assert len(plans) > 1
    for plan in plans:
        assert len(plan) == 3
        assert max(sum(stage[n] == s for n in plan.names) for s in set(stage.values())) <= 1
    with pytest.raises(ValueError):
        random_plan(space, len(set(stage.values())) + 1, 0)


@pytest.mark.slow
def test_quick_mode_runs_every_method_merges_exactly_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(BENCH / "compare_depth_pruning.py"), "--quick", "--run",
                           str(tmp_path / "run"), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    df = pd.read_csv(out / "depth_pruning.csv", keep_default_na=False)
    assert sorted(df.method) == sorted(["updp", "removal", "drop", "random", "channels"])
    rows = df.set_index("method")
    for method in ("updp", "removal", "random"):
        assert float(rows.merge_rel_diff_fp64[method]) < 1e-9
    assert rows.plan["removal"] == rows.plan["updp"]
    assert rows.n_pruned["random"] == rows.n_pruned["updp"]
    assert rows.params["channels"] < rows.baseline_params["channels"]
    assert rows.n_pruned["drop"] >= 1
    # the interleaved pass answered for every model (read with NaN kept: an empty field must not pass)
    answered = pd.read_csv(out / "depth_pruning.csv")
    assert answered.speedup.notna().all() and answered.top1.between(0, 100).all()
    assert rows.latency_vs_updp["updp"] == pytest.approx(1.0)
    assert (out / "depth_pruning.png").stat().st_size > 1000
    assert "| updp" in (out / "README.md").read_text()


def test_updp_plan_is_the_best_score_within_the_level_and_skips_trials_without_values(tmp_path):
    from compare_depth_pruning import updp_plan

    csv = tmp_path / "trials.csv"
    csv.write_text("trial,state,score,latency_ms,pruned\n"
                   "0,COMPLETE,50.0,1.0,\n"
                   "1,COMPLETE,40.0,0.5,\"a,b\"\n"
                   "2,COMPLETE,45.0,0.7,a\n"
                   "3,PRUNED,,,a\n"
                   "4,COMPLETE,45.0,0.75,b\n")
    trials = pd.read_csv(csv, keep_default_na=False)
    assert updp_plan(trials, "m", 1.0, 1.3).names == ("a",)  # 45 % within 0.77 ms; the faster of the two
    assert updp_plan(trials, "m", 1.0, 1.6).names == ("a", "b")
    assert updp_plan(trials, "m", 1.0, 5.0).names == ("a", "b")  # none within: the fastest


def test_updp_plan_band_keeps_a_level_from_being_won_by_a_far_faster_plan(tmp_path):
    from compare_depth_pruning import updp_plan

    csv = tmp_path / "trials.csv"
    csv.write_text("trial,state,score,latency_ms,pruned\n"
                   "0,COMPLETE,50.0,1.0,\n"
                   "1,COMPLETE,60.0,0.4,\"a,b,c\"\n"
                   "2,COMPLETE,45.0,0.74,a\n"
                   "3,COMPLETE,48.0,0.70,b\n"
                   "4,COMPLETE,44.0,0.60,c\n")
    trials = pd.read_csv(csv, keep_default_na=False)
    assert updp_plan(trials, "m", 1.0, 1.3).names == ("a", "b", "c")  # no band: the best score under 0.77 ms
    assert updp_plan(trials, "m", 1.0, 1.3, band=0.1).names == ("b",)  # within 0.70-0.77 ms: 48 beats 45
    assert updp_plan(trials, "m", 1.0, 1.6, band=0.01).names == ("c",)  # none in 0.619-0.625 ms: the nearest
