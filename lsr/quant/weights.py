"""`QuantizedWeight`: one linear's symmetric integer weight, as RTN and GPTQ produce it and the export stores it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """Codes ``q`` (int8 ``[N, K]``) and float32 scales ``scale`` ``[N, G]`` (``G = 1``: one scale per output
    channel, the export's layout; ``G > 1``: contiguous groups of ``K / G``)."""

    q: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, shape: torch.Size) -> QuantizedWeight:
        """From `lsr.quant.rtn.quantize` / `gptq_quantize` output (grouped layout, symmetric)."""
        rows = shape[0]
        scale = scale.reshape(1, 1).expand(rows, 1) if scale.numel() == 1 else scale.reshape(rows, -1)
        return cls(q.reshape(shape).to(torch.int8), scale.float().contiguous())

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.q.shape
        groups = self.scale.shape[1]
        return (self.q.float().reshape(rows, groups, cols // groups) * self.scale[..., None]).reshape(rows, cols)
