"""Blocks, pruned forms and exact merging (the pruner core)."""
from updp.core.plan import PruningPlan
from updp.pruner.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from updp.pruner.discovery import Discovery, find_blocks
from updp.pruner.merge import merge_model
from updp.pruner.models import create_model, default_input_size
from updp.pruner.norms import plain_batchnorm, sync_batchnorm
from updp.pruner.plan import apply_plan, parse_plan, progressive_blocks, set_lambda
from updp.pruner.schedule import LambdaSchedule
from updp.pruner.spec import BlockSpec

__all__ = [
    "BlockSpec", "Checkpoint", "Discovery", "LambdaSchedule", "PruningPlan", "apply_plan",
    "create_model", "default_input_size", "find_blocks", "load_checkpoint", "merge_model",
    "parse_plan", "plain_batchnorm", "progressive_blocks", "save_checkpoint", "set_lambda", "sync_batchnorm",
]
