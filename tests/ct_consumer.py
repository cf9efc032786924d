"""A consumer of an lsr export that uses no lsr code: transformers + compressed-tensors on CPU.

transformers loads the checkpoint and decompresses the int4 weights (``CompressedTensorsConfig(dequantize=True)``)
but does not apply ``transform_config``; compressed-tensors' ``apply_transform_config`` does, given only the online
entries (the ``weight_*`` ones are already fused into the stored weights and must not be applied twice). The
matrices of online transforms are copied in from the checkpoint, the tensors vLLM loads. lsr's Kronecker type
(``lsr-hadamard``) is registered here with a NaN placeholder matrix, so a transform left without its stored tensor
poisons the logits instead of passing silently. Activations are not quantized (compressed-tensors' fake quantizer
uses another scale rule).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from compressed_tensors.transform import TransformConfig, TransformFactory, apply_transform_config
from compressed_tensors.transform.factory.base import TransformBase
from compressed_tensors.transform.factory.hadamard import HadamardFactory
from safetensors import safe_open
from torch.nn import Parameter

KRONECKER_TYPE = "lsr-hadamard"


@TransformFactory.register(KRONECKER_TYPE)
class StoredHadamardFactory(HadamardFactory):
    """``HadamardFactory`` whose matrix is a NaN placeholder of the right size, to be overwritten by the stored one."""

    def _create_weight(self, size: int, device, construct_device, precision) -> Parameter:
        return Parameter(torch.full((size, size), float("nan"), dtype=precision, device=device), requires_grad=False)


def online_only(config: TransformConfig) -> TransformConfig:
    """``config`` without its offline (fused) entries; groups left with nothing to apply are dropped."""
    groups = {}
    for name, scheme in config.config_groups.items():
        online = [args for args in scheme.apply if args.is_online()]
        if online:
            groups[name] = scheme.model_copy(update={"apply": online})
    return TransformConfig(config_groups=groups)


def stored_transforms(path: Path, config: TransformConfig) -> dict[str, torch.Tensor]:
    """Every ``<module>.{group}_{location}.weight`` tensor of the checkpoint for the online entries of ``config``."""
    names = {f"{group}_{args.location}" for group, scheme in config.config_groups.items() for args in scheme.apply}
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                parts = key.rsplit(".", 2)
                if len(parts) == 3 and parts[2] == "weight" and parts[1] in names:
                    out[key] = handle.get_tensor(key)
    return out


def load_with_compressed_tensors(path: str | Path, dtype: torch.dtype = torch.float32):
    """The export at ``path`` as a transformers model with decompressed weights and its online transforms applied
    with compressed-tensors, their matrices copied from the checkpoint. Returns ``(model, copied tensor names)``."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    config = online_only(TransformConfig.model_validate(qc.get("transform_config") or {"config_groups": {}}))
    apply_transform_config(model, config)
    stored = stored_transforms(path, config)
    copied: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, TransformBase):
            continue
        matches = [t for t in stored.values() if t.shape == module.weight.shape]
        source = stored.get(f"{name}.weight", matches[0] if matches else None)
        if source is None:
            raise ValueError(f"no stored tensor for transform {name} ({list(module.weight.shape)})")
        group = name.rsplit(".", 1)[1].split("_")[0]
        if config.config_groups[group].type == "hadamard" and not torch.equal(
                source.to(module.weight.dtype), module.weight.detach()):
            raise ValueError(f"{name}: the stored matrix is not compressed-tensors' (and vLLM HadaCore's) hadamard")
        with torch.no_grad():
            module.weight.copy_(source.to(module.weight.dtype))
        copied.add(name)
    return model.eval(), copied
