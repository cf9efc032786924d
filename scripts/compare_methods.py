"""Compare FP and W4A4 recipes on one model and data, in one run, on one code path (`lsr.learn.fit`).

    python scripts/compare_methods.py --config configs/smollm2.yaml [--recipes quarot lsr lsr-gptq] \
        [--out benchmarks/compare_smollm2] [-- any `lsr fit` option, e.g. --trainer.limit_train_batches 2]

Every recipe is a preset resolved with the config's model, data, batch size and trainer; its refined checkpoint
goes to ``--runs/{recipe}`` (a finished one is reused). Prints one table (W4A4 fake-quant perplexity, gap to FP,
full-layer mean error, wall time, thread count) and writes JSON, markdown and a PNG of the relative block error
per recipe (init and final).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lsr.cli import build_config, parse, trainer_kwargs
from lsr.data.config import DataConfig
from lsr.learn import fit
from lsr.learn.report import block_error_curves, full_layer_mean_error, plot_block_errors
from lsr.metrics import perplexity
from lsr.models.loading import ModelConfig, load_model
from lsr.recipe import PRESETS, Recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2.yaml")
    parser.add_argument("--recipes", nargs="+", default=["fp", "quarot", "smoothrot", "quantile", "lsr"],
                        help=f"fp and presets: {', '.join(PRESETS)}")
    parser.add_argument("--out", default="benchmarks/compare_smollm2")
    parser.add_argument("--runs", default="runs/compare", help="refined checkpoints; a finished one is reused")
    args, rest = parser.parse_known_args()
    rest = [r for r in rest if r != "--"]

    _, cfg = parse(["fit", "--config", args.config, *rest])
    model, data = build_config(ModelConfig, cfg["model"]), build_config(DataConfig, cfg["data"])
    trainer = trainer_kwargs(cfg)
    rows, curves = [], {}
    fp_ppl = float("nan")
    for name in args.recipes:
        start = time.perf_counter()
        if name == "fp":
            lm, tokenizer = load_model(model.name, dtype=model.torch_dtype)
            fp_ppl = perplexity(lm, data.eval_windows(tokenizer), batch_size=data.batch_size)
            rows.append({"recipe": "FP", "ppl": fp_ppl, "error": float("nan"), "seconds": time.perf_counter() - start})
            print(f"FP: ppl {fp_ppl:.3f}", flush=True)
            continue
        recipe = build_config(Recipe, cfg["recipe"]) if name == cfg["recipe"]["name"] else Recipe.from_name(name)
        result, tokenizer = fit(model, recipe, data, Path(args.runs) / name, batch_size=cfg["batch_size"],
                                trainer=trainer, log_dir=str(Path("lightning_logs") / "compare"))
        ppl = perplexity(result.model, data.eval_windows(tokenizer), batch_size=data.batch_size)
        curves.update({k: v for k, v in block_error_curves(result.records, name).items()
                       if k.endswith("(final)") or (recipe.learn is not None and k.endswith("(init)"))})
        rows.append({"recipe": name, "ppl": ppl, "error": full_layer_mean_error(result.records),
                     "seconds": time.perf_counter() - start})
        print(f"{name}: ppl {ppl:.3f}", flush=True)

    lines = [
        f"model: {model.name}; W4A4 (weights 4-bit per output channel, activations 4-bit per token on every linear "
        f"input); data: {data.describe()}; threads: {torch.get_num_threads()}",
        "",
        "| recipe | W4A4 perplexity | gap to FP | full-layer mean error | wall time (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        gap = f"{100 * (r['ppl'] / fp_ppl - 1):+.1f} %" if r["recipe"] != "FP" and fp_ppl == fp_ppl else "—"
        err = f"{r['error']:.4f}" if r["error"] == r["error"] else "—"
        lines.append(f"| {r['recipe']} | {r['ppl']:.2f} | {gap} | {err} | {r['seconds']:.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    settings = {"model": model.name, "data": data.describe(), "threads": torch.get_num_threads(), "extra": rest}
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    if curves:
        plot_block_errors(curves, out.with_suffix(".png"), "relative block error ‖Yq − Y‖² / ‖Y‖²")


if __name__ == "__main__":
    main()
