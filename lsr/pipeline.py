"""`lsr run`: the main job on one config, end to end, with one result table.

FP perplexity → `fit` (calibrate + learn the scales block by block) → W4A4 fake-quant perplexity → `export` (real
INT4 compressed-tensors directory) → reload with `load_quantized` (exact integer path) → INT4 perplexity.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lightning import Trainer

from lsr.export import export_model, load_quantized
from lsr.export.evaluate import perplexity
from lsr.learn.module import LsrModule


def validate_perplexity(trainer: Trainer, module: LsrModule, datamodule) -> float:
    """`trainer.validate` on the eval windows; returns the perplexity."""
    return float(trainer.validate(module, datamodule, verbose=False)[0]["val/ppl"])


def _size_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) / 2**20


def main_job(argv: list[str]) -> dict:
    from lsr.cli import build_cli

    cli = build_cli(argv, run=False)
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    rows: list[tuple[str, float, float]] = []

    start = time.perf_counter()
    fp = LsrModule(model=module.model_name, method=module.method, variant="fp")
    fp_ppl = validate_perplexity(trainer, fp, datamodule)
    rows.append(("FP32 (dequantized GGUF)" if module.model_name == "smollm2" else "FP", fp_ppl,
                 time.perf_counter() - start))
    del fp

    start = time.perf_counter()
    trainer.fit(module, datamodule)
    fit_time = time.perf_counter() - start
    start = time.perf_counter()
    rows.append((f"W4A4 fake-quant ({module.method.name})", validate_perplexity(trainer, module, datamodule),
                 fit_time + time.perf_counter() - start))

    start = time.perf_counter()
    export_dir = Path(module.output_dir) / "int4"
    export_model(str(module.output_dir), export_dir, overwrite=True)
    int4 = load_quantized(export_dir, backend="reference")
    int4_ppl = perplexity(int4, datamodule.eval_windows(), batch_size=datamodule.batch_size)
    rows.append((f"W4A4 INT4 export, reloaded ({module.method.name})", int4_ppl, time.perf_counter() - start))

    lines = [
        f"model: {module.model_name}   method: {module.method.name}   data: {datamodule.source} "
        f"(calibration {datamodule.num_calibration}×{datamodule.seq_len}, eval windows "
        f"{datamodule.max_eval_windows or 'all'}×{datamodule.seq_len})",
        "",
        "| model | perplexity | gap to FP | wall time (s) |",
        "|---|---|---|---|",
    ]
    for name, ppl, seconds in rows:
        lines.append(f"| {name} | {ppl:.3f} | {100 * (ppl / fp_ppl - 1):+.1f} % | {seconds:.0f} |")
    lines.append(f"\nINT4 export: {export_dir} ({_size_mb(export_dir):.1f} MB on disk)")
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(module.output_dir)
    (out / "result.md").write_text(table + "\n")
    result = {"rows": [{"model": n, "ppl": p, "seconds": s} for n, p, s in rows]}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result
