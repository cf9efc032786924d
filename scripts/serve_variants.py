"""The W4A4 / W4A16 / W4A8 exports of one quantized model: vLLM contract and perplexity of each reload.

    python scripts/serve_variants.py [--source quarot-gptq | runs/smollm2-lsr] [--r4 full block-diagonal]
        [--seq_len 512] [--eval_windows 32]

The source (a preset recipe without learning applied to the plain model, or a refined checkpoint of `lsr fit`) is
prepared once; each scheme is written from the same int4 weights, checked against what vLLM loads
(`lsr.export.vllm_contract`), reloaded with `lsr.load_quantized` (reference backend, integer products) and
evaluated; with several ``--r4`` layouts (a preset source only) each is prepared and exported. Rows "as vLLM
quantizes" reload the same directory with what a consumer of ``quantization_config`` alone does: weight scales in
the model dtype (float16) and, for W4A4, the plain absmax activation scale (no clip ratio).
Writes benchmarks/serve_variants_<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from lsr.checkpoint import is_checkpoint
from lsr.data.config import DataConfig
from lsr.export import ExportConfig, load_quantized, prepare_export, round_like_export, write_export
from lsr.export.quantized_linear import QuantizedLinear
from lsr.export.sizes import directory_bytes
from lsr.export.vllm_contract import check_vllm_contract
from lsr.metrics import perplexity
from lsr.models import load_model, load_tokenizer
from lsr.recipe import Recipe

SCHEMES = ("w4a4", "w4a16", "w4a8")
MIB = 2**20


def as_vllm_quantizes(model: torch.nn.Module) -> torch.nn.Module:
    """Weight scales rounded to float16 (vLLM loads them in the model dtype) and activation clip 1 (no
    compressed-tensors field holds lsr's clip ratios), in place."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.weight_scale.copy_(module.weight_scale.half().float())
            module.act_clip = 1.0
    return model


def _ppl(model, windows, batch_size: int, label: str) -> float:
    start = time.perf_counter()
    value = perplexity(model, windows, batch_size=batch_size)
    print(f"  {label}: perplexity {value:.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    return value


def prepare(args, r4: str, calib, tokenizer):
    """The source with R4 laid out as ``r4``: a preset is applied with ``rotate.r4``; a refined checkpoint keeps its
    own (learned scales are tied to it) and is refused for another layout."""
    if is_checkpoint(args.source):
        prepared, tokenizer = prepare_export(args.source)
        own = prepared.recipe.rotate.r4 if prepared.recipe.rotate is not None else None
        if own != r4:
            raise SystemExit(f"{args.source} was fitted with rotate.r4={own!r}; refit it for --r4 {r4}")
        return prepared, tokenizer
    model, _ = load_model(args.model)
    recipe = Recipe.from_name(args.source, rotate={"r4": r4})
    return prepare_export(model, recipe, calibration=calib, tokenizer=tokenizer)[0], tokenizer


def run(args, r4: str, work: Path, windows, calib, tokenizer) -> list[dict]:
    prepared, tokenizer = prepare(args, r4, calib, tokenizer)
    rows = []
    for scheme in SCHEMES:
        config = ExportConfig(scheme=scheme, overwrite=True)
        path = work / f"{prepared.recipe.name}-{r4}-{scheme}"
        write_export(prepared, path, config, tokenizer)
        contract = check_vllm_contract(path)
        classes = sorted({c for n, c in contract.schemes.items() if c != "unquantized"})
        print(f"[{scheme}] {path}: vLLM {classes}; notes: {contract.notes}", flush=True)
        r4_types = sorted({f"{kind} {size}" for _, kind, size, _ in contract.transforms.values()})
        row = {"scheme": scheme, "r4": r4, "r4_transform": r4_types, "vllm_schemes": classes,
               "directory_mib": directory_bytes(path) / MIB}
        if args.fake_quant:
            twin = round_like_export(copy.deepcopy(prepared.model), config)
            row["ppl_fake_quant"] = _ppl(twin, windows, args.batch_size, f"{scheme} fake-quant twin")
            del twin
        model = load_quantized(path, backend="reference")
        row["ppl_reloaded"] = _ppl(model, windows, args.batch_size, f"{scheme} reloaded (lsr)")
        row["ppl_as_vllm"] = _ppl(as_vllm_quantizes(model), windows, args.batch_size, f"{scheme} as vLLM quantizes")
        del model
        gc.collect()
        rows.append(row)
    return rows


def table(rows: list[dict], fp: float | None) -> str:
    lines = ["| export | R4 | R4 transform (type, matrix size) | vLLM scheme | directory MiB | ppl reloaded (lsr) | "
             "ppl as vLLM quantizes | ppl fake-quant |", "|---|---|---|---|---|---|---|---|"]
    if fp is not None:
        lines.append(f"| FP32 original | — | — | — | — | {fp:.3f} | — | — |")
    for r in rows:
        fake = r.get("ppl_fake_quant")
        lines.append(f"| {r['scheme'].upper()} | {r['r4']} | {', '.join(r['r4_transform'])} | "
                     f"{', '.join(r['vllm_schemes'])} | {r['directory_mib']:.1f} | {r['ppl_reloaded']:.3f} | "
                     f"{r['ppl_as_vllm']:.3f} | {f'{fake:.3f}' if fake else '—'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="quarot-gptq", help="a refined checkpoint directory or a preset without "
                   "learning (applied to --model)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data_source", default="embedded-wiki")
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--eval_windows", type=int, default=32)
    p.add_argument("--num_calibration", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--r4", nargs="+", default=["full"], choices=["full", "block-diagonal"],
                   help="R4 layouts (rotate.r4) to prepare the source with, each exported in every scheme")
    p.add_argument("--fake_quant", action="store_true", help="also evaluate each scheme's fake-quant twin")
    p.add_argument("--no_fp", action="store_true", help="skip the FP32 original's perplexity")
    p.add_argument("--work_dir", default=None, help="where the exports go (default: a temporary directory)")
    p.add_argument("--out", default=None, help="default benchmarks/serve_variants_<model>")
    args = p.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    data = DataConfig(source=args.data_source, seq_len=args.seq_len, num_calibration=args.num_calibration,
                      max_eval_windows=args.eval_windows)
    windows = data.eval_windows(tokenizer)
    calib = data.calibration_windows(tokenizer)
    settings = {"source": args.source, "r4": args.r4, "model": args.model, "data": args.data_source,
                "seq_len": args.seq_len,
                "eval_windows": int(windows.shape[0]), "calibration_windows": args.num_calibration,
                "runtime": "lsr reference backend (CPU)"}
    print("settings:", json.dumps(settings), flush=True)
    fp = None if args.no_fp else _ppl(load_model(args.model)[0], windows, args.batch_size, "FP32 original")
    with tempfile.TemporaryDirectory(prefix="lsr-serve-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = [row for r4 in args.r4 for row in run(args, r4, work, windows, calib, tokenizer)]
    text = table(rows, fp)
    print("\n" + text)
    out = Path(args.out or f"benchmarks/serve_variants_{args.model}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "ppl_fp32": fp, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(f"# Export schemes of {args.model} ({args.source})\n\nSettings: "
                                      + ", ".join(f"{k}={v}" for k, v in settings.items()) + f"\n\n{text}\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
