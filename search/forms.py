"""The merge planner: which merged form each block takes on the target, and which blocks no form speeds up.

Every merged form of a family computes the same function (``BlockFamily.forms``: ConvNeXt's DW + 1x1
or one dense 7x7; a conv chain's one dense kxk or its folded convs kept in a row), but which runs
fastest depends on the target: a CPU runtime runs a depthwise conv and a 1x1 cheaply and a dense kxk
slowly, a GPU often the other way round (DepthShrinker and LayerMerge gain from the dense form there).
A form that is fastest in MACs can be slowest in milliseconds.

One interleaved pass times the unpruned model and, for each group of identical blocks (same stage,
family and shape: ``block_groups``) and each form, the model with every block of the group merged in
that form. Timing a whole group, not one block, gives a saving several times this machine's noise,
and in its real context (the same fusions and memory traffic as in a plan). A group's saving must be
at least ``MARGIN`` of the whole model's latency to count (a ratio to the baseline below
1 - MARGIN): one interleaved pass on a shared 2-core CPU measures a ratio to about that. A group no
form saves that much is "not worth pruning on this target" and leaves the search space; otherwise
it keeps its family's default form unless another form is faster than it by more than ``MARGIN``.
The choice is saved as the run's ``merge_forms.json`` and every merge of the run (latency table,
fitted model, final model) uses it.
"""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from updp.core.errors import UpdpError
from updp.core.fileio import read_json_as, write_json
from updp.latency.table import ratio
from updp.pruner import merge_model
from updp.pruner.registry import family_for
from updp.pruner.spec import BlockSpec
from updp.search.timing import PlanTimer, block_groups

MODES = ("auto", "default")
MARGIN = 0.01  # a saving, or a form's advantage, smaller than 1 % of the model's latency is taken for noise


@dataclass
class FormPlan:
    """Per group of identical blocks: its blocks, each form's measured ratio to the baseline, the chosen form.

    ``chosen`` is None for a group no form makes faster ("not worth pruning on this target").
    """

    backend: str
    device: str
    groups: dict[str, dict] = field(default_factory=dict)  # group -> {"family", "blocks", "ratios", "default",
    #                                                         "chosen", "errors"}
    context: dict = field(default_factory=dict)

    @property
    def forms(self) -> dict[str, str]:
        """block -> the form it takes (blocks of dropped groups are not named)."""
        return {b: g["chosen"] for g in self.groups.values() if g["chosen"] for b in g["blocks"]}

    @property
    def dropped(self) -> list[str]:
        return [b for g in self.groups.values() if not g["chosen"] for b in g["blocks"]]

    def speedup_vs_default(self, group: str) -> float | None:
        """How much faster the group's chosen form is than its family's default (ratio of ratios)."""
        g = self.groups[group]
        chosen, default = g["ratios"].get(g["chosen"] or ""), g["ratios"].get(g["default"])
        return None if chosen is None or default is None else default / chosen

    def summary(self) -> str:
        """One line for the report: the form of each group, and what was left out."""
        parts = []
        for name, g in self.groups.items():
            ratios = ", ".join(f"{f} {r:.3f}x" for f, r in g["ratios"].items())
            parts.append(f"{name}: {g['chosen'] or 'not worth pruning on this target'} ({ratios} of the baseline)")
        return "; ".join(parts)

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FormPlan":
        return read_json_as(cls, path, "merge forms")


def choose(ratios: dict[str, float], default: str, margin: float = MARGIN) -> str | None:
    """The form a group takes given each form's ratio to the baseline; None when none saves ``margin``."""
    if not ratios:
        return None
    best = min(ratios, key=ratios.get)
    if ratios[best] >= 1.0 - margin:
        return None
    if default in ratios and ratios[default] < 1.0 - margin and ratios[default] - ratios[best] <= margin:
        return default
    return best


def plan_forms(timer: PlanTimer, specs: Sequence[BlockSpec], rounds: int = 20) -> FormPlan:
    """Time every form of every group of ``specs`` on ``timer``'s target in one interleaved pass.

    Raises:
        UpdpError: the baseline could not be timed.
    """
    groups = block_groups(specs)
    members: dict[str, list[str]] = defaultdict(list)
    for block, group in groups.items():
        members[group].append(block)
    modules = dict(timer.base.named_modules())
    variants: list[tuple[str, str]] = []
    models = [timer.base]
    info: dict[str, dict] = {}
    for group, blocks in members.items():
        family = family_for(modules[blocks[0]])
        info[group] = {"family": family.name, "blocks": blocks, "ratios": {}, "default": family.forms[0],
                       "chosen": None, "errors": {}}
        for form in family.forms:
            variants.append((group, form))
            models.append(merge_model(timer.base, blocks, {b: form for b in blocks}))
    base, *results = timer.measure_models(models, rounds)
    if not base.ok:
        raise UpdpError(f"the baseline latency of {timer.model_name} could not be measured ({base.error})")
    for (group, form), result in zip(variants, results):
        if result.ok:
            info[group]["ratios"][form] = ratio(result, base)
        else:
            info[group]["errors"][form] = result.error or "no timed runs"
    for g in info.values():
        g["chosen"] = choose(g["ratios"], g["default"])
    context = {k: v for k, v in base.context.items() if k != "round_medians_ms"}
    return FormPlan(timer.backend_name, timer.device, info, {**context, "rounds": rounds,
                                                             "input_shape": list(timer.cfg.input_shape),
                                                             "batch_size": timer.cfg.batch_size,
                                                             "precision": timer.cfg.precision})
