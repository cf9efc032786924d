"""Compare FP, quarot, smoothrot, quantile and lsr on one model and data, in one run, on one code path.

    python scripts/compare_methods.py --config configs/smollm2.yaml [--methods quarot lsr] [--out benchmarks/...]

Every method is a `MethodConfig` preset run through the same `LsrModule` (Lightning fit, then validate); the
data, quantizers and seeds come from the config. Prints one table (W4A4 perplexity, gap to FP, full-layer mean
error, wall time) and writes JSON, markdown and a PNG of per-layer error by method.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lightning import Trainer

from lsr.cli import build_cli
from lsr.learn.method import PRESETS, preset
from lsr.learn.module import LsrModule
from lsr.learn.report import full_layer_mean_error, plot_per_layer_error
from lsr.pipeline import validate_perplexity


def _trainer(log_dir: Path, name: str) -> Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    return Trainer(
        accelerator="cpu", devices=1, max_epochs=-1, enable_checkpointing=False, num_sanity_val_steps=0,
        check_val_every_n_epoch=1_000_000, log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, logger=TensorBoardLogger(log_dir, name=name),
    )


def _gptq_perplexity(refined: Path, datamodule) -> float:
    """W4A4 perplexity of a refined checkpoint with GPTQ weights (fake-quant twin of what `lsr export` writes)."""
    from lsr.export import ExportConfig, fake_quant_twin, prepare_export
    from lsr.export.evaluate import perplexity

    prepared = prepare_export(str(refined), ExportConfig(weight_quantizer="gptq"),
                              calibration=datamodule.calibration_windows(), for_export=False)
    return perplexity(fake_quant_twin(prepared), datamodule.eval_windows(), batch_size=datamodule.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2.yaml")
    parser.add_argument("--methods", nargs="+", default=["fp", *PRESETS])
    parser.add_argument("--out", default="benchmarks/compare_smollm2")
    parser.add_argument("--runs", default="runs/compare", help="refined checkpoints; a finished one is reused")
    parser.add_argument("--gptq", nargs="*", default=[], metavar="METHOD",
                        help="also evaluate these methods with GPTQ weights (on the same calibration windows)")
    args, rest = parser.parse_known_args()

    cli = build_cli(["--config", args.config, *rest], run=False)
    base, datamodule = cli.model, cli.datamodule
    settings = {k: getattr(datamodule, k) for k in ("source", "seq_len", "num_calibration", "max_eval_windows")}
    rows, per_layer = [], {}
    fp_ppl = None
    for name in args.methods:
        start = time.perf_counter()
        trainer = _trainer(Path("lightning_logs") / "compare", name)
        if name == "fp":
            module = LsrModule(model=base.model_name, variant="fp")
            ppl = validate_perplexity(trainer, module, datamodule)
            fp_ppl = ppl
            rows.append({"method": "FP", "ppl": ppl, "error": 0.0, "seconds": time.perf_counter() - start})
        else:
            method = preset(name, weight=base.method.weight, act=base.method.act, seed=base.method.seed,
                            **({"epochs": base.method.epochs, "lr": base.method.lr} if PRESETS[name].learn else {}))
            module = LsrModule(model=base.model_name, method=method, output_dir=f"{args.runs}/{name}",
                               batch_size=base.batch_size, resume=True)
            trainer.fit(module, datamodule)
            ppl = validate_perplexity(trainer, module, datamodule)
            per_layer[name] = module.engine.results
            rows.append({"method": name, "ppl": ppl, "error": full_layer_mean_error(module.engine.results),
                         "seconds": time.perf_counter() - start})
        print(f"{name}: ppl {ppl:.3f}", flush=True)
        if name in args.gptq:
            start = time.perf_counter()
            ppl = _gptq_perplexity(Path(args.runs) / name, datamodule)
            rows.append({"method": f"{name} + GPTQ", "ppl": ppl, "error": float("nan"),
                         "seconds": time.perf_counter() - start})
            print(f"{name} + GPTQ: ppl {ppl:.3f}", flush=True)

    fp_ppl = fp_ppl or float("nan")
    lines = [
        f"model: {base.model_name}; W4A4 RTN (weights {base.method.weight.bits}-bit per channel, activations "
        f"{base.method.act.bits}-bit per token, every linear input); data: {settings}",
        "",
        "| method | W4A4 perplexity | gap to FP | full-layer mean error | wall time (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        gap = f"{100 * (r['ppl'] / fp_ppl - 1):+.1f} %" if r["method"] != "FP" and fp_ppl == fp_ppl else "—"
        err = f"{r['error']:.4f}" if r["method"] != "FP" and r["error"] == r["error"] else "—"
        lines.append(f"| {r['method']} | {r['ppl']:.2f} | {gap} | {err} | {r['seconds']:.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    if per_layer:
        plot_per_layer_error(per_layer, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
