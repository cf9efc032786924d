"""The online R4 Hadamard as a checkpoint tensor, the way vLLM and compressed-tensors load it.

vLLM (``compressed_tensors/transform/{linear,module}.py``) gives every linear that an online transform targets a
submodule named ``f"{group}_{location}"`` (``R4_input``) and loads its ``weight`` from the checkpoint: ±1 entries,
model dtype, divided by sqrt(n) after loading, applied as ``x · W`` for ``inverse: false`` (or HadaCore, ignoring the
tensor, for ``type: hadamard``). All layers share one tensor (``SharedWeightParameter``), so the export stores it
once, under the first targeted module's name, as compressed-tensors' own serialisation does for shared transform
weights. Without it vLLM would run on uninitialised memory, so lsr refuses an export (format 4) that lacks it.
"""

from __future__ import annotations

import torch

from lsr.hadamard import decompose, hadamard_signs

R4_GROUP = "R4"
R4_LOCATION = "input"


def r4_tensor_name(module_name: str) -> str:
    """``model.layers.0.mlp.down_proj`` → ``model.layers.0.mlp.down_proj.R4_input.weight``."""
    return f"{module_name}.{R4_GROUP}_{R4_LOCATION}.weight"


def r4_kind(size: int) -> str:
    """compressed-tensors / vLLM ``type`` of the R4 scheme: ``hadamard`` (Sylvester, vLLM's HadaCore) for a power of
    two, where it is lsr's matrix exactly; ``lsr-hadamard`` otherwise (vLLM: a dense GEMM with the stored tensor)."""
    m, _ = decompose(size)
    return "hadamard" if m == 1 else "lsr-hadamard"


def r4_tensor(size: int, dtype: torch.dtype) -> torch.Tensor:
    """The stored R4: ``H_m ⊗ S_{2^k}`` with ±1 entries (unnormalised, not transposed), in ``dtype``."""
    return hadamard_signs(size, dtype=dtype).contiguous()


def check_r4_tensor(name: str, tensor: torch.Tensor, size: int) -> None:
    """ValueError unless ``tensor`` is exactly lsr's ±1 R4 of ``size`` (what vLLM will multiply by)."""
    if not tensor.dtype.is_floating_point or tuple(tensor.shape) != (size, size):
        raise ValueError(f"tensor {name} is {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, "
                         f"expected a float [{size}, {size}] Hadamard matrix")
    if not torch.equal(tensor, r4_tensor(size, tensor.dtype)):
        raise ValueError(f"tensor {name} is not lsr's ±1 Hadamard H_m ⊗ S_2^k of size {size} (m, k = "
                         f"{decompose(size)}): a consumer loading it would not compute what lsr quantized")

