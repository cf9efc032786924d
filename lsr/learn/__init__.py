"""Blockwise learning with Lightning (one LightningModule per decoder block), `quantize_` and `fit`."""

from lsr.learn.block import BlockModule, LearnScales
from lsr.learn.fit import fit, quantize_

__all__ = ["BlockModule", "LearnScales", "fit", "quantize_"]
