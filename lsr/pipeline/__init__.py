"""The block pipeline and the recipe steps that plug into it (no Lightning, no trainer)."""

from lsr.pipeline.apply import QuantizedModel, apply_checkpoint, apply_recipe, needs_calibration, prepare_model
from lsr.pipeline.runner import Block, BlockHook, BlockPipeline, BlockRecord

__all__ = [
    "Block",
    "BlockHook",
    "BlockPipeline",
    "BlockRecord",
    "QuantizedModel",
    "apply_checkpoint",
    "apply_recipe",
    "needs_calibration",
    "prepare_model",
]
