"""Chat prompts answered greedily by the FP model and by INT4 exports (reloaded with the reference backend).

    python scripts/chat_compare.py --model smollm2 \
        --exports runs/compare/quarot-gptq-s0/int4 runs/compare/lsr-gptq-s0/int4 \
        --prompts "What is the capital of France?" "Name three primary colors." --max-new-tokens 32 \
        --labels "QuaRot + GPTQ" "lsr + GPTQ" --out benchmarks/chat_smollm2.md

The prompt goes through each tokenizer's chat template (``add_generation_prompt=True``); decoding is greedy
(``do_sample=False``) with HF ``generate`` and its KV cache, which the INT4 model supports as is: its decoder linears
quantize activations per token, so a cached step computes what a full forward would. Prints and writes a markdown
table: one row per model, one column per prompt.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lsr.export import load_quantized
from lsr.generation import generate
from lsr.models import load_tokenizer
from lsr.models.loading import load_model


def answer(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy reply of `model` to `prompt` as the user's turn of a chat (`lsr.generation.generate`, which also
    gives a model that quantizes its KV cache a `QuantizedKVCache`)."""
    return generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, echo=False).text.strip()


def export_label(path: str, model: torch.nn.Module) -> str:
    section = getattr(model, "lsr_export", {}) or {}
    recipe = (section.get("recipe") or {}).get("name", "?")
    weights = ((section.get("recipe") or {}).get("weights") or {}).get("method", "?")
    return f"INT4 {path} ({recipe}, {weights})"


def markdown(prompts: list[str], max_new_tokens: int, answers: list[tuple[str, list[str]]]) -> str:
    def escape(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = [f"Chat template, greedy, at most {max_new_tokens} new tokens.", "",
             "| model | " + " | ".join(escape(p) for p in prompts) + " |", "|---|" + "---|" * len(prompts)]
    lines += [f"| {escape(name)} | " + " | ".join(escape(t) for t in texts) + " |" for name, texts in answers]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="the FP model (hub id, local directory or smollm2)")
    parser.add_argument("--exports", nargs="*", default=[], help="directories written by lsr export / lsr run")
    parser.add_argument("--prompts", nargs="+", default=["What is the capital of France?"])
    parser.add_argument("--labels", nargs="*", default=[], help="names of the exports' rows (default: path, recipe)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args()

    answers = []
    if args.labels and len(args.labels) != len(args.exports):
        parser.error("--labels: one per export")
    labels = args.labels or [None] * len(args.exports)
    candidates = [("FP " + args.model, None), *zip(labels, args.exports, strict=True)]
    for name, path in candidates:
        start = time.perf_counter()
        if path is None:
            model, tokenizer = load_model(args.model)
        else:
            model, tokenizer = load_quantized(path, backend="reference"), load_tokenizer(path)
            name = name or export_label(path, model)
        texts = [answer(model, tokenizer, prompt, args.max_new_tokens) for prompt in args.prompts]
        print(f"{name} ({time.perf_counter() - start:.0f}s): {texts}", flush=True)
        answers.append((name, texts))
        del model
    table = markdown(args.prompts, args.max_new_tokens, answers)
    print("\n" + table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
