"""What each `lsr` subcommand does, given its parsed configs (see `lsr.cli`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lsr.data.config import DataConfig
from lsr.export.config import ExportConfig
from lsr.metrics import perplexity
from lsr.models.loading import EMBEDDED_MODELS, ModelConfig, load_model
from lsr.recipe import Recipe


def fit(cfg: dict, *, model: ModelConfig, recipe: Recipe, data: DataConfig, trainer: dict, **_) -> None:
    from lsr.learn import fit as fit_recipe

    start = time.perf_counter()
    fit_recipe(model, recipe, data, cfg["output_dir"], batch_size=cfg["batch_size"], trainer=trainer,
               log_dir=cfg["log_dir"], linear_errors=cfg["linear_errors"])
    print(f"refined checkpoint: {cfg['output_dir']} ({time.perf_counter() - start:.0f}s)")


def validate(cfg: dict, *, model: ModelConfig, recipe: Recipe, data: DataConfig, **_) -> float:
    from lsr.pipeline import apply_checkpoint, prepare_model

    lm, tokenizer = load_model(model.name, dtype=model.torch_dtype)
    if cfg["variant"] == "rotated":
        prepare_model(lm, recipe)
    elif cfg["variant"] == "fake_quant":
        apply_checkpoint(lm, cfg["output_dir"])
    ppl = perplexity(lm, data.eval_windows(tokenizer), batch_size=data.batch_size, log=print)
    print(f"val/ppl {ppl} ({cfg['variant']}, {data.describe()})")
    return ppl


def _fp_label(model: ModelConfig) -> str:
    return "FP32 (dequantized GGUF)" if model.name in EMBEDDED_MODELS else f"FP ({model.dtype})"


def run(cfg: dict, *, model: ModelConfig, recipe: Recipe, data: DataConfig, export: ExportConfig, trainer: dict,
        **_) -> dict:
    """The main job: FP perplexity -> fit -> W4A4 fake-quant perplexity -> INT4 export -> reload -> perplexity."""
    from lsr.export import load_quantized, write_export
    from lsr.learn import fit as fit_recipe

    total = time.perf_counter()
    out = Path(cfg["output_dir"])
    export_dir = Path(cfg["export_dir"] or out / "int4")
    if export_dir.exists() and not export.overwrite:
        raise FileExistsError(f"{export_dir} exists; pass --export.overwrite true to replace it")
    rows: list[tuple[str, float, float]] = []

    print(f"[1/4] FP perplexity ({model.name})", flush=True)
    start = time.perf_counter()
    lm, tokenizer = load_model(model.name, dtype=model.torch_dtype)
    windows = data.eval_windows(tokenizer)
    fp_ppl = perplexity(lm, windows, batch_size=data.batch_size, log=print)
    rows.append((_fp_label(model), fp_ppl, time.perf_counter() - start))
    del lm

    print(f"[2/4] fit: recipe {recipe.name}", flush=True)
    start = time.perf_counter()
    result, tokenizer = fit_recipe(model, recipe, data, out, batch_size=cfg["batch_size"], trainer=trainer,
                                   log_dir=cfg["log_dir"], linear_errors=cfg["linear_errors"])
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ppl = perplexity(result.model, windows, batch_size=data.batch_size, log=print, label="fake-quant perplexity")
    name = recipe.name + (f", {recipe.kv_cache.label}" if recipe.kv_cache is not None else "")
    rows.append((f"W4A4 fake-quant ({name})", ppl, fit_seconds + time.perf_counter() - start))

    print(f"[3/4] INT4 export -> {export_dir}", flush=True)
    start = time.perf_counter()
    write_export(result, export_dir, export.with_overrides(overwrite=True), tokenizer)
    print("[4/4] reload the INT4 export and evaluate", flush=True)
    int4 = load_quantized(export_dir, backend="reference")
    int4_ppl = perplexity(int4, windows, batch_size=data.batch_size, log=print, label="INT4 perplexity")
    rows.append((f"W4A4 INT4 export, reloaded ({name})", int4_ppl, time.perf_counter() - start))

    import torch

    from lsr.export.sizes import directory_bytes

    size = directory_bytes(export_dir) / 2**20
    lines = [
        f"model: {model.name}   recipe: {recipe.name}   data: {data.describe()}   threads: {torch.get_num_threads()}",
        "",
        "| model | perplexity | gap to FP | wall time (s) |",
        "|---|---|---|---|",
        *(f"| {n} | {p:.3f} | {100 * (p / fp_ppl - 1):+.1f} % | {s:.0f} |" for n, p, s in rows),
        f"\nINT4 export: {export_dir} ({size:.1f} MB on disk); total wall time {time.perf_counter() - total:.0f}s",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    (out / "result.md").write_text(table + "\n")
    summary = {"rows": [{"model": n, "ppl": p, "seconds": s} for n, p, s in rows],
               "total_seconds": time.perf_counter() - total}
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    return summary


def export(cfg: dict, *, recipe: Recipe, data: DataConfig, export: ExportConfig, **_) -> None:
    from lsr.checkpoint import is_checkpoint
    from lsr.export import export_model
    from lsr.export.sizes import size_report

    start = time.perf_counter()
    source = cfg["source"]
    result = export_model(source, cfg["out_dir"], export, recipe=None if is_checkpoint(source) else recipe,
                          data=data, batch_size=cfg["batch_size"])
    sizes = size_report(result.path)
    print(f"exported {source} -> {result.path} in {time.perf_counter() - start:.1f}s "
          f"(recipe {result.lsr['recipe']['name']}, weights {result.lsr['weight_quantizer']['name']}, "
          f"scheme {result.lsr['scheme']})")
    print(f"decoder linears: {sizes['decoder_linear_bytes'] / 2**20:.2f} MiB on disk, "
          f"{sizes['decoder_linear_ratio']:.4f}x FP16; directory {sizes['directory_bytes'] / 2**20:.2f} MiB")


def eval(cfg: dict, *, data: DataConfig, **_) -> dict:  # noqa: A001 - the subcommand's name
    from lsr.export import load_quantized
    from lsr.export.evaluate import LmEvalUnavailable, run_lm_eval
    from lsr.models import load_tokenizer

    model = load_quantized(cfg["path"], backend=cfg["backend"], device=cfg["device"])
    tokenizer = load_tokenizer(cfg["path"])
    results: dict = {"path": cfg["path"], "backend": cfg["backend"]}
    if not cfg["no_perplexity"]:
        windows = data.eval_windows(tokenizer)
        start = time.perf_counter()
        ppl = perplexity(model, windows, batch_size=data.batch_size, device=cfg["device"], log=print)
        results["perplexity"] = {"value": ppl, "source": data.evaluated_source, "seq_len": data.seq_len,
                                 "windows": int(windows.shape[0])}
        print(f"perplexity {ppl:.4f} on {windows.shape[0]} x {data.seq_len} tokens of {data.evaluated_source} "
              f"({time.perf_counter() - start:.1f}s)")
    tasks = [t for t in cfg["tasks"].split(",") if t]
    if tasks:
        try:
            results["tasks"] = run_lm_eval(model, tokenizer, tasks, include_path=cfg["include_path"],
                                           limit=cfg["limit"], max_length=data.seq_len, device=cfg["device"])
            for task, metrics in results["tasks"].items():
                print(task, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        except LmEvalUnavailable as err:
            print(f"skipping zero-shot tasks {tasks}: {err}")
            results["tasks"] = {"skipped": str(err)}
    if cfg["json"]:
        Path(cfg["json"]).write_text(json.dumps(results, indent=2, default=str))
    return results


def generate(cfg: dict, **_) -> dict:
    """Stream a reply from the export (or its FP / fake-quant source) and report tokens/s and KV-cache bytes."""
    from dataclasses import asdict

    from lsr.export import load_quantized
    from lsr.export.loader import read_config
    from lsr.generation import generate as run_generation
    from lsr.models import load_tokenizer

    path = Path(cfg["path"]).expanduser()
    _, _, section, _ = read_config(path)
    if cfg["variant"] == "int4":
        model = load_quantized(path, backend=cfg["backend"], device=cfg["device"])
        if (path / "generation_config.json").is_file():  # the source's (end-of-turn token, ...)
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(path)
    else:
        model = _source_model(section, cfg["variant"]).to(cfg["device"])
    tokenizer = load_tokenizer(str(path))
    kv = section.get("kv_cache") or {}
    cache = "float KV cache" if cfg["variant"] == "fp" else f"KV{kv.get('bits', 16)}" + (", R3" if kv.get("r3") else "")
    print(f"lsr generate: {cfg['variant']} model of {path} ({cache})", flush=True)
    report = run_generation(model, tokenizer, cfg["prompt"], max_new_tokens=cfg["max_new_tokens"], chat=cfg["chat"],
                            temperature=cfg["temperature"], device=cfg["device"])
    print(report.summary())
    result = {**asdict(report), "variant": cfg["variant"], "path": str(path),
              "decode_tokens_per_second": report.decode_tokens_per_second, "cache_ratio": report.cache_ratio}
    if cfg["json"]:
        Path(cfg["json"]).write_text(json.dumps(result, indent=2))
    return result


def _source_model(section: dict, variant: str):
    """The export's source model in float (``fp``), or rebuilt as the fake-quant model of its recipe."""
    from lsr.export.prepare import prepare_export

    source = section.get("source") or {}
    if variant == "fp":
        if not source.get("model"):
            raise ValueError("the export does not record its source model (lsr.source.model)")
        return load_model(source["model"])[0]
    if source.get("refined"):
        return prepare_export(source["refined"], check=False)[0].model
    recipe = Recipe.from_dict(section["recipe"])
    model, tokenizer = load_model(source["model"])
    return prepare_export(model, recipe, tokenizer=tokenizer, check=False)[0].model
