"""Bytes on disk of an export, by part, read from the safetensors header (no tensor data loaded)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from safetensors import safe_open

from lsr.export import format as fmt

DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}


def safetensors_header(file: str | Path) -> dict[str, dict]:
    """``{name: {"dtype", "shape", "data_offsets"}}`` of a safetensors file."""
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def directory_bytes(path: str | Path) -> int:
    """Total size of the regular files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def size_report(path: str | Path) -> dict:
    """Bytes of the decoder linears (packed weights + scales + shapes + biases) against their FP16 size, of the
    embedding and lm_head, of everything else, and of the whole directory."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    header = safetensors_header(path / fmt.WEIGHTS_FILE)
    decoder_modules = {name.rsplit(".", 1)[0] for name in header if name.endswith(".weight_packed")
                       and fmt.matches_any(name.rsplit(".", 1)[0], fmt.W4A4_TARGETS)}
    parts = {"decoder_linear_bytes": 0, "decoder_linear_fp16_bytes": 0, "embedding_bytes": 0, "lm_head_bytes": 0,
             "other_bytes": 0}
    shapes = safe_open(str(path / fmt.WEIGHTS_FILE), framework="pt", device="cpu")
    for name, info in header.items():
        start, end = info["data_offsets"]
        module = name.rsplit(".", 1)[0]
        nbytes = end - start
        if module in decoder_modules:
            parts["decoder_linear_bytes"] += nbytes
            if name.endswith(".weight_shape"):
                rows, cols = shapes.get_tensor(name).tolist()
                parts["decoder_linear_fp16_bytes"] += 2 * rows * cols
            elif name.endswith(".bias"):
                parts["decoder_linear_fp16_bytes"] += 2 * info["shape"][0]
        elif module.endswith("embed_tokens"):
            parts["embedding_bytes"] += nbytes
        elif module.endswith("lm_head"):
            parts["lm_head_bytes"] += nbytes
        else:
            parts["other_bytes"] += nbytes
    parts["decoder_linear_ratio"] = parts["decoder_linear_bytes"] / max(1, parts["decoder_linear_fp16_bytes"])
    parts["weights_file_bytes"] = (path / fmt.WEIGHTS_FILE).stat().st_size
    parts["directory_bytes"] = directory_bytes(path)
    parts["embeddings"] = config.get("lsr", {}).get("unquantized", {})
    return parts
