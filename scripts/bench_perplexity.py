"""FP perplexity of a model on the embedded eval split at seq_len 2048, and its evaluation throughput (tokens/s).

    python scripts/bench_perplexity.py [--model smollm2] [--seq_len 2048] [--max_windows N] [--rotated]

Prints a table and writes JSON next to --out. The protocol is QuaRot/GPTQ's: documents joined with "\\n\\n",
tokenized once, cut into non-overlapping windows; every token but each window's first is scored.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lsr.data.config import DataConfig
from lsr.metrics import perplexity
from lsr.models import load_model
from lsr.transforms import rotate_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--source", default="embedded-wiki")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--max_windows", type=int, default=None, help="default: the whole eval split")
    parser.add_argument("--rotated", action="store_true", help="also measure the Hadamard-rotated model")
    parser.add_argument("--out", default="benchmarks/perplexity_smollm2.json")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    data = DataConfig(source=args.source, seq_len=args.seq_len, max_eval_windows=args.max_windows)
    windows = data.eval_windows(tokenizer)
    rows = []
    variants = ["FP32 (dequantized GGUF)" if args.model == "smollm2" else "FP32"]
    if args.rotated:
        variants.append("rotated (R1, R2, R4)")
    for name in variants:
        if name.startswith("rotated"):
            rotate_model(model, seed=0)
        start = time.perf_counter()
        ppl = perplexity(model, windows)
        seconds = time.perf_counter() - start
        rows.append({"model": name, "ppl": ppl, "tokens": windows.numel(), "seconds": seconds,
                     "tokens_per_s": windows.numel() / seconds})
    print(f"\n{args.model} on {args.source} eval split: {len(windows)} windows × {args.seq_len} tokens, "
          f"{torch.get_num_threads()} CPU threads")
    print("\n| model | perplexity | tokens | seconds | tokens/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['ppl']:.4f} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "seq_len": args.seq_len, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
