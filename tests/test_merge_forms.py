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
from updp.core.errors import UpdpError
from updp.latency.base import LatencyBackend, MeasureConfig
from updp.pipeline.config import RunConfig
from updp.pipeline.rundir import Inputs
from updp.pipeline.search import merge_forms
from updp.pruner import Checkpoint, PruningPlan, create_model, find_blocks, load_checkpoint, save_checkpoint
from updp.pruner.merge import merge_model
from updp.search.forms import FormPlan, choose, plan_forms
from updp.search.space import SearchSpace
from updp.search.timing import PlanTimer
from updp.train.runtime import CPU

CFG = MeasureConfig(warmup_runs=1, warmup_ms=0, min_runs=4, min_time_s=0, threads=1)


class CostTarget(LatencyBackend):
    """Latency = sum over convolutions and linears of MACs per output pixel x a cost per MAC of its kind.

    Activations and norms are free. By default a dense conv with a kernel above 1x1 costs 4 per MAC (a
    CPU-like target), everything else 1.
    """

    name = "cost-model"
    needs_onnx = False

    def cost(self, m: nn.Conv2d) -> float:
        return 1.0 if m.groups > 1 or m.kernel_size[0] == 1 else 4.0

    def figure(self, target: nn.Module) -> float:
        """The model's cost in "ms": a fixed function of its layers."""
        total = 0.0
        for m in target.modules():
            if isinstance(m, nn.Conv2d):
                macs = m.out_channels * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
                total += macs * self.cost(m) / m.stride[0] ** 2
            elif isinstance(m, nn.Linear):
                total += m.in_features * m.out_features
        return total / 1e6

    def load(self, target: nn.Module, cfg: MeasureConfig) -> None:
        self.ms = self.figure(target)

    def run_once(self) -> float:
        return self.ms


class GpuLikeTarget(CostTarget):
    """Dense kernels at full occupancy, depthwise ones memory-bound."""

    name = "cost-model-gpu"

    def cost(self, m: nn.Conv2d) -> float:
        return 3.0 if m.groups > 1 else 0.02


class MixedTarget(CostTarget):
    """1x1 convs slow (20 per MAC, where Linears cost 1), dense kxk cheap up to 32 channels and slow above."""

    name = "cost-model-mixed"

    def cost(self, m: nn.Conv2d) -> float:
        if m.groups > 1:
            return 1.0
        if m.kernel_size[0] == 1:
            return 20.0
        return 0.1 if m.out_channels <= 32 else 4.0


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


def _inputs(model: str, specs, tmp_path) -> Inputs:
    cfg = override(RunConfig(model=model), {"latency.merge_forms": "auto"})
    return Inputs(cfg, tmp_path, None, SearchSpace(model, tuple(specs)), None, 10, 32, CPU)


def test_a_group_no_form_speeds_up_is_left_out_of_the_space(tmp_path):
    # test_convnext's stages have 24, 32, 48 and 64 channels: on MixedTarget its DW + 1x1 form is slower than
    # the block (a 1x1 conv costs 20x a Linear MAC) everywhere, the dense 7x7 faster only up to 32 channels
    timer, specs = _timer("test_convnext", MixedTarget)
    reduced, plan = merge_forms(_inputs("test_convnext", specs, tmp_path), timer)
    chosen = {name.split(":")[0]: g["chosen"] for name, g in plan.groups.items()}
    assert chosen == {"s0": "dense", "s1": "dense", "s2": None, "s3": None}, plan.summary()
    assert set(reduced.space.names) == {s.name for s in specs if s.stage < 2} and set(plan.dropped) == {
        s.name for s in specs if s.stage >= 2}
    assert timer.forms == plan.forms and json.loads((tmp_path / "merge_forms.json").read_text())["groups"]
    again, _ = merge_forms(_inputs("test_convnext", specs, tmp_path), timer)  # resumed: read, not timed again
    assert again.space.names == reduced.space.names


def test_no_block_faster_in_any_form_is_one_line_error(tmp_path):
    # on the CPU-like target mobilenetv2's dense kxk costs 4x per MAC and its chain keeps every conv
    timer, specs = _timer("mobilenetv2_050", CostTarget)
    with pytest.raises(UpdpError, match="no block of mobilenetv2_050 is faster merged, in any form") as e:
        merge_forms(_inputs("mobilenetv2_050", specs, tmp_path), timer)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("ratios, want", [
    ({"dw_pw": 0.80, "dense": 0.70}, "dense"),  # clearly faster than the default: switch
    ({"dw_pw": 0.80, "dense": 0.795}, "dw_pw"),  # within the margin of the default: keep the default
    ({"dw_pw": 0.995, "dense": 1.2}, None),  # saves less than the margin: not worth pruning
    ({"dw_pw": 1.3, "dense": 0.95}, "dense"),  # the default form slows it down, the other does not
    ({}, None),  # every form failed to time
])
def test_choice_rule(ratios, want):
    assert choose(ratios, "dw_pw") == want


def test_every_form_choice_is_timed_for_real_on_onnxruntime():
    timer, specs = _timer("test_convnext", "onnxruntime")
    plan = plan_forms(timer, specs, rounds=3)
    assert plan.backend == "onnxruntime" and plan.context["rounds"] == 3
    for g in plan.groups.values():
        assert set(g["ratios"]) == {"dw_pw", "dense"} and all(0.2 < r < 2 for r in g["ratios"].values())
        assert g["chosen"] == choose(g["ratios"], g["default"])


def test_plans_are_timed_in_their_chosen_forms_and_cached_apart():
    timer, specs = _timer("test_convnext", GpuLikeTarget)
    plan = PruningPlan("test_convnext", {specs[0].name})
    model = GpuLikeTarget()
    in_default_form = model.figure(timer.merged(plan))
    assert timer.measure_many([plan])[0].median_ms == pytest.approx(in_default_form)
    key_default = timer.key(plan)
    timer.forms = {specs[0].name: "dense"}
    in_dense_form = model.figure(timer.merged(plan))
    assert in_dense_form != pytest.approx(in_default_form)  # the plan is merged in another form...
    assert timer.measure_many([plan])[0].median_ms == pytest.approx(in_dense_form)  # ...and figured in it
    assert timer.key(plan) != key_default  # and cached apart


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
