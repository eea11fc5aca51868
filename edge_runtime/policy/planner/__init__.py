"""Policy layer: size a model on the meta device, budget the tier's VRAM, predict what offloading
costs, and place every block. It decides only: no tensor moves here and no backend is imported.

    layout = layout_from_config(config, CsmForConditionalGeneration, dtype=torch.bfloat16)
    budget = compute_budget(profile, layout)
    result = plan(layout, profile, budget, CostModel())
    print(result.table())
"""

from edge_runtime.policy.planner.budget import MAX_SENTENCE_CHARS, Budget, compute_budget, request_tokens
from edge_runtime.policy.planner.configs import (CODEC_ACTIVATION_COPIES, SPEECH_CHARS_PER_S, TEXT_TOKENS_PER_CHAR,
                                                 build_on_meta, layout_from_config)
from edge_runtime.policy.planner.cost import BlockCost, CostModel, block_cost
from edge_runtime.policy.planner.layout import Block, ComponentLayout, ModelLayout
from edge_runtime.policy.planner.precision import plan
from edge_runtime.policy.planner.plan import BlockPlacement, Plan, PlanError
from edge_runtime.policy.planner.sizing import describe_model

__all__ = [
    "CODEC_ACTIVATION_COPIES", "MAX_SENTENCE_CHARS", "SPEECH_CHARS_PER_S", "TEXT_TOKENS_PER_CHAR",
    "Block", "BlockCost", "BlockPlacement", "Budget", "ComponentLayout", "CostModel", "ModelLayout",
    "Plan", "PlanError", "block_cost", "build_on_meta", "compute_budget", "describe_model",
    "layout_from_config", "plan", "request_tokens",
]
