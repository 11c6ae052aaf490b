"""The merge planner: each group of blocks takes the form that is fastest on the target; a block no form speeds
up leaves the search space; the choice reaches every merge of the run and the final model's files.

Two kinds of target: ONNX Runtime on this CPU (real timing), and cost-model targets, backends whose
"latency" of a module is a fixed function of its convolutions, so the test knows which form must win on
each (a CPU-like target where dense kxk convolutions are slow, a GPU-like one where depthwise ones are).
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from updp.core.config import override
from updp.latency.base import LatencyBackend, MeasureConfig
from updp.pipeline.config import RunConfig
from updp.pipeline.rundir import Inputs
from updp.pipeline.search import merge_forms
from updp.pruner import Checkpoint, PruningPlan, create_model, find_blocks, load_checkpoint, save_checkpoint
from updp.pruner.merge import merge_model
from updp.search.forms import FormPlan, plan_forms
from updp.search.space import SearchSpace
from updp.search.timing import PlanTimer
from updp.train.runtime import CPU

CFG = MeasureConfig(warmup_runs=1, warmup_ms=0, min_runs=4, min_time_s=0, threads=1)


class CostTarget(LatencyBackend):
    """Latency = sum over convolutions of MACs per output pixel x a cost per MAC of its kind; activations free.

    ``dense_cost`` weighs a dense conv with a kernel above 1x1, ``grouped_cost`` a depthwise/grouped one.
    """

    name = "cost-model"
    needs_onnx = False
    dense_cost, grouped_cost = 4.0, 1.0

    def load(self, target: nn.Module, cfg: MeasureConfig) -> None:
        total = 0.0
        for m in target.modules():
            if isinstance(m, nn.Conv2d):
                macs = m.out_channels * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
                kind = self.grouped_cost if m.groups > 1 else (self.dense_cost if m.kernel_size[0] > 1 else 1.0)
                total += macs * kind / m.stride[0] ** 2
            elif isinstance(m, nn.Linear):
                total += m.in_features * m.out_features
        self.ms = total / 1e6

    def run_once(self) -> float:
        return self.ms


class GpuLikeTarget(CostTarget):
    name = "cost-model-gpu"
    dense_cost, grouped_cost = 0.02, 3.0  # dense kernels at full occupancy, depthwise memory-bound


def _timer(model: str, backend, size: int = 32) -> tuple[PlanTimer, list]:
    timer = PlanTimer(model, backend, CFG, img_size=size, num_classes=10)
    specs = find_blocks(timer.base, (3, size, size)).worthwhile
    return timer, specs


@pytest.mark.parametrize("target, want", [(CostTarget, "dw_pw"), (GpuLikeTarget, "dense")])
def test_the_fastest_form_on_the_target_wins_for_each_group(target, want):
    timer, specs = _timer("test_convnext", target)
    plan = plan_forms(timer, specs, rounds=2)
    assert len(plan.groups) == 4 and not plan.dropped
    for g in plan.groups.values():
        assert set(g["ratios"]) == {"dw_pw", "dense"} and g["chosen"] == want
        assert g["chosen"] == min(g["ratios"], key=g["ratios"].get) and g["ratios"][want] < 1
    assert set(plan.forms) == {s.name for s in specs} and set(plan.forms.values()) == {want}


def test_a_group_no_form_speeds_up_is_left_out_of_the_space(tmp_path):
    # On the CPU-like target a dense kxk costs 4x per MAC and the chain form keeps every conv (activations are
    # free): mobilenetv2's inverted residuals gain nothing in either form; its depthwise-separable first block
    # and the bigger later ones may still gain, whatever the exact figures, the rule is the same.
    timer, specs = _timer("mobilenetv2_050", CostTarget)
    cfg = override(RunConfig(model="mobilenetv2_050"), {"latency.merge_forms": "auto"})
    inp = Inputs(cfg, tmp_path, None, SearchSpace("mobilenetv2_050", tuple(specs)), None, 10, 32, CPU)
    reduced, plan = merge_forms(inp, timer)
    assert plan.dropped, plan.summary()
    for g in plan.groups.values():
        assert (g["chosen"] is None) == (min(g["ratios"].values()) >= 1.0)
    assert set(reduced.space.names) == {s.name for s in specs} - set(plan.dropped)
    assert timer.forms == plan.forms and json.loads((tmp_path / "merge_forms.json").read_text())["groups"]
    again, _ = merge_forms(inp, timer)  # resumed: read from merge_forms.json, not timed again
    assert again.space.names == reduced.space.names


def test_every_form_choice_is_timed_for_real_on_onnxruntime():
    timer, specs = _timer("test_convnext", "onnxruntime")
    plan = plan_forms(timer, specs, rounds=3)
    assert plan.backend == "onnxruntime" and plan.context["rounds"] == 3
    for g in plan.groups.values():
        assert set(g["ratios"]) == {"dw_pw", "dense"} and all(0.2 < r < 2 for r in g["ratios"].values())
        assert g["chosen"] in (None, min(g["ratios"], key=g["ratios"].get))


def test_plans_are_timed_in_their_chosen_forms_and_cached_apart():
    timer, specs = _timer("test_convnext", GpuLikeTarget)
    plan = PruningPlan("test_convnext", {specs[0].name})
    default = timer.measure_many([plan])[0].median_ms
    key_default = timer.key(plan)
    timer.forms = {specs[0].name: "dense"}
    assert timer.measure_many([plan])[0].median_ms < default  # the dense form is cheaper on this target
    assert timer.key(plan) != key_default


def test_a_merged_checkpoint_keeps_its_forms(tmp_path, float64):
    model = create_model("resnet18", 10).double().eval()
    plan = PruningPlan("resnet18", {"layer2.0", "layer3.1"})
    forms = {"layer2.0": "chain", "layer3.1": "dense"}
    merged = merge_model(model, plan, forms)
    save_checkpoint(tmp_path / "m.pt", Checkpoint(merged, plan, 10, "merged", {"merge_forms": forms}))
    loaded = load_checkpoint(tmp_path / "m.pt").model
    assert type(loaded.get_submodule("layer2.0")).__name__ == "MergedChain"
    x = torch.randn(1, 3, 33, 33, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded(x), merged(x))


def test_form_plan_round_trips(tmp_path):
    timer, specs = _timer("test_convnext", CostTarget)
    plan = plan_forms(timer, specs, rounds=2)
    plan.save(tmp_path / "f.json")
    again = FormPlan.load(tmp_path / "f.json")
    assert again.forms == plan.forms and again.summary() == plan.summary()
    assert all(again.speedup_vs_default(g) == pytest.approx(1.0) for g in again.groups)  # dw_pw is the default
