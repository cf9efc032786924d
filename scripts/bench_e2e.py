#!/usr/bin/env python
"""LLaMA-3-8B-shaped end-to-end prefill and decode on a CUDA GPU: bf16 vs every decoder linear as W4A4.

A LLaMA-3-8B-shaped model (random weights, no hub; ``--layers`` to shrink it): prefill and decode tokens/s, bf16
vs every decoder linear replaced by ``lsr.kernels.w4a4_linear`` (down_proj with the online Hadamard, its weight
pre-rotated), and weight memory. Prefill is the decoder stack's GPU time replayed from a CUDA graph; the decode step
is captured in a CUDA graph with a static KV cache. Results print as markdown and go to ``--out`` as JSON.

``--compile-report`` runs ``python -m lsr.kernels.compile_check`` (no GPU needed). Everything else needs CUDA.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
from _bench_utils import add_common_args, bench, compile_report, device_meta, require_cuda, save_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, "e2e_h100.json")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32 = LLaMA-3-8B)")
    p.add_argument("--prefill-len", type=int, default=2048, help="prompt tokens per prefill")
    p.add_argument("--decode-batch", default="1,16", help="comma-separated decode batch sizes")
    p.add_argument("--context", type=int, default=1024, help="KV-cache length at which decode is timed")
    return p.parse_args(argv)


class W4A4Linear(torch.nn.Module):
    """Drop-in for a bias-free ``nn.Linear``: int4 weights, ``w4a4_linear`` forward."""

    def __init__(self, lin: torch.nn.Linear, hadamard: bool, backend: str = "auto") -> None:
        super().__init__()
        from lsr.hadamard import hadamard_transform
        from lsr.kernels import quantize_weight_int4

        w = lin.weight.detach().float()
        if hadamard:  # the online x·H is undone by folding H into the weight: (xH)(WH)^T = x W^T
            w = hadamard_transform(w)
        packed, scale = quantize_weight_int4(w)
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.bias = None if lin.bias is None else torch.nn.Parameter(lin.bias.detach().clone())
        self.hadamard, self.backend = hadamard, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lsr.kernels import w4a4_linear

        return w4a4_linear(x, self.packed, self.scale, hadamard=self.hadamard, backend=self.backend, bias=self.bias)


def _to_w4a4(model: torch.nn.Module) -> int:
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    count = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in names:
                lin = getattr(parent, name, None)
                if isinstance(lin, torch.nn.Linear):
                    setattr(parent, name, W4A4Linear(lin, hadamard=name == "down_proj"))
                    del lin
                    count += 1
        torch.cuda.empty_cache()
    return count


def _weight_bytes(model: torch.nn.Module) -> dict[str, float]:
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    layers = sum(
        t.numel() * t.element_size() for t in list(model.model.layers.parameters()) + list(model.model.layers.buffers())
    )
    return {"all_GB": total / 1e9, "decoder_layers_GB": layers / 1e9}


def _static_cache(config, batch: int, max_len: int):
    from transformers import StaticCache

    try:
        return StaticCache(config=config, max_cache_len=max_len)
    except TypeError:  # older transformers
        return StaticCache(config=config, max_batch_size=batch, max_cache_len=max_len, device="cuda",
                           dtype=torch.bfloat16)  # fmt: skip


def _decode_step(model, tok, cache, cpos, ppos) -> Callable[[], object]:
    def step():
        return model(input_ids=tok, past_key_values=cache, cache_position=cpos, position_ids=ppos, use_cache=True)

    return step


@torch.no_grad()
def _measure(model, config, args: argparse.Namespace, label: str) -> dict:

    out: dict = {"weights": _weight_bytes(model), "memory_allocated_GB": torch.cuda.memory_allocated() / 1e9}
    vocab = config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prefill_len), device="cuda")
    prefill = lambda: model.model(input_ids=ids, use_cache=False)  # decoder stack; lm_head is the same in both
    # GPU time of the whole forward, replayed from a CUDA graph (no host launch gaps); eager events if capture fails
    t, mode = bench(lambda i: prefill(), 1, args.warmup_ms, max(args.rep_ms, 500))
    out["prefill"] = {"tokens": args.prefill_len, "ms": t, "timing": mode,
                      "tokens_per_s": args.prefill_len / (t * 1e-3)}  # fmt: skip
    print(f"[{label}] prefill {args.prefill_len} tokens: {t:.2f} ms, {args.prefill_len / t * 1e3:.0f} tok/s")
    out["decode"] = []
    for batch in (int(b) for b in args.decode_batch.split(",")):
        ctx = args.context
        cache = _static_cache(config, batch, ctx + 8)
        prompt = torch.randint(0, vocab, (batch, ctx), device="cuda")
        pos = torch.arange(ctx, device="cuda")
        model(input_ids=prompt, past_key_values=cache, cache_position=pos, use_cache=True)
        tok = torch.randint(0, vocab, (batch, 1), device="cuda")
        cpos = torch.tensor([ctx], device="cuda")
        ppos = cpos.view(1, 1).expand(batch, 1)

        step = _decode_step(model, tok, cache, cpos, ppos)
        rec = {"batch": batch, "context": ctx}
        try:
            ms, mode = bench(lambda i, step=step: step(), 1, args.warmup_ms, max(args.rep_ms, 500))
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {e}"
            print(f"[{label}] decode batch {batch} failed: {rec['error']}", file=sys.stderr)
            out["decode"].append(rec)
            continue
        rec.update(ms_per_step=ms, timing=mode, tokens_per_s=batch / (ms * 1e-3))
        out["decode"].append(rec)
        print(f"[{label}] decode batch {batch} @ctx {ctx}: {ms:.3f} ms/step ({mode}), {batch / ms * 1e3:.0f} tok/s")
        del cache
        torch.cuda.empty_cache()
    return out


def bench_e2e(args: argparse.Namespace, results: dict) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    e2e = results.setdefault("e2e", {"layers": args.layers})
    e2e["bf16"] = _measure(model, config, args, "bf16")
    t0 = time.time()
    e2e["replaced_linears"] = _to_w4a4(model)
    e2e["convert_s"] = time.time() - t0
    torch.cuda.empty_cache()
    e2e["w4a4"] = _measure(model, config, args, "w4a4")
    b, q = e2e["bf16"], e2e["w4a4"]
    e2e["prefill_speedup"] = q["prefill"]["tokens_per_s"] / b["prefill"]["tokens_per_s"]
    e2e["decoder_weight_ratio"] = q["weights"]["decoder_layers_GB"] / b["weights"]["decoder_layers_GB"]


def markdown(results: dict) -> str:
    lines: list[str] = []
    e2e = results.get("e2e")
    if e2e and "w4a4" in e2e:
        lines.append(f"| e2e ({e2e['layers']} layers) | bf16 | W4A4 | ratio |")
        lines.append("|---|---|---|---|")
        b, q = e2e["bf16"], e2e["w4a4"]
        lines.append(f"| prefill tok/s | {b['prefill']['tokens_per_s']:.0f} | {q['prefill']['tokens_per_s']:.0f} | "
                     f"{e2e['prefill_speedup']:.2f} |")  # fmt: skip
        for db, dq in zip(b["decode"], q["decode"], strict=False):
            if "tokens_per_s" in db and "tokens_per_s" in dq:
                lines.append(f"| decode tok/s (batch {db['batch']}) | {db['tokens_per_s']:.0f} | "
                             f"{dq['tokens_per_s']:.0f} | {dq['tokens_per_s'] / db['tokens_per_s']:.2f} |")  # fmt: skip
        lines.append(f"| decoder weights GB | {b['weights']['decoder_layers_GB']:.2f} | "
                     f"{q['weights']['decoder_layers_GB']:.2f} | {e2e['decoder_weight_ratio']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compile_report:
        return compile_report(args)
    if not require_cuda("bench_e2e.py"):
        return 2
    results: dict = {"meta": device_meta()}
    try:
        bench_e2e(args, results)
    finally:
        save_json(args.out, results)
    print()
    print(markdown(results))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
