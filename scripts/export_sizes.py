"""Real INT4 export of the embedded SmolLM2: bytes on disk and perplexity of the reloaded model vs fake quant.

    python scripts/export_sizes.py [--refined runs/smollm2-lsr] [--no_gptq] [--seq_len 512] [--eval_windows 32]

Exports the refined checkpoint (`lsr fit --config configs/smollm2.yaml`; method quarot on the plain model if it is
absent) with RTN and GPTQ weights, each with 16-bit and with int8 embeddings/lm_head, and prints one table:
decoder-linear bytes vs FP16 (target <= 0.27x), whole directory vs the FP16 model directory, perplexity of the
reloaded INT4 model (integer reference runtime) vs the fake-quant twin of the same settings (target diff < 0.5 %),
and the cost of the int8 embeddings. Also measures the numerical noise floor of the fake-quant model (the same twin
evaluated in float64 instead of float32). Writes benchmarks/export_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from lsr.data.module import LsrDataModule
from lsr.export import CalibrationData, ExportConfig, fake_quant_twin, load_quantized, prepare_export, write_export
from lsr.export.evaluate import perplexity
from lsr.export.prepare import calibration_windows, is_refined_dir
from lsr.export.sizes import directory_bytes, size_report
from lsr.models import load_model, load_tokenizer

MIB = 2**20


def _ppl(model, windows, batch_size: int, label: str) -> float:
    start = time.perf_counter()
    value = perplexity(model, windows, batch_size=batch_size)
    print(f"  {label}: perplexity {value:.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    return value


def _fp16_directory(model_name: str, work: Path, windows, batch_size: int) -> dict:
    """The original model saved in float16 (HF save_pretrained: tied embeddings stored once) and its FP perplexity."""
    model, tokenizer = load_model(model_name)
    ppl = _ppl(model, windows, batch_size, "FP32 original")
    target = work / "fp16"
    model.half().save_pretrained(target)
    tokenizer.save_pretrained(target)
    linears = sum(m.weight.numel() for layer in model.model.layers for m in layer.modules()
                  if isinstance(m, torch.nn.Linear))
    return {"directory_bytes": directory_bytes(target), "decoder_linear_bytes": 2 * linears, "ppl_fp32": ppl,
            "tied_embeddings": bool(model.config.tie_word_embeddings)}


def _variant(source: str, quantizer: str, work: Path, windows, calib, args) -> list[dict]:
    print(f"[{quantizer}] preparing (rotations, scales, {quantizer} weights)", flush=True)
    data = CalibrationData(source=args.data_source, seq_len=args.seq_len, num_calibration=args.num_calibration)
    config = ExportConfig(weight_quantizer=quantizer, data=data, overwrite=True)
    config8 = config.with_overrides(embeddings_8bit=True)
    start = time.perf_counter()
    prepared = prepare_export(source, config, calibration=calib if quantizer == "gptq" else None)
    prep_s = time.perf_counter() - start
    paths = {False: work / quantizer, True: work / f"{quantizer}-emb8"}
    write_export(prepared, paths[False], config)
    write_export(prepared, paths[True], config8)
    twin = fake_quant_twin(prepared, config)
    fake = _ppl(twin, windows, args.batch_size, f"{quantizer} fake-quant twin (float32)")
    noise = None
    if args.noise_floor and quantizer == "rtn":
        noise = _ppl(twin.double(), windows, args.batch_size, f"{quantizer} fake-quant twin (float64)")
    del twin, prepared
    gc.collect()
    rows = []
    for emb8, path in paths.items():
        model = load_quantized(path, backend="reference")
        ppl = _ppl(model, windows, args.batch_size, f"{quantizer} INT4 reloaded{' (int8 embeddings)' if emb8 else ''}")
        del model
        gc.collect()
        rows.append({"quantizer": quantizer, "embeddings_8bit": emb8, "sizes": size_report(path),
                     "ppl_int4": ppl, "ppl_fake_quant": None if emb8 else fake,
                     "ppl_fake_quant_float64": None if emb8 else noise, "prepare_s": prep_s})
    return rows


def _table(rows: list[dict], fp16: dict) -> str:
    head = ("| variant | decoder linears MiB | × FP16 | directory MiB | × FP16 dir | ppl fake-quant | ppl INT4 "
            "reloaded | Δ INT4 vs fake | Δ int8 emb |")
    lines = [head, "|" + "---|" * 9]
    lines.append(f"| FP16 model | {fp16['decoder_linear_bytes'] / MIB:.1f} | 1.000 | "
                 f"{fp16['directory_bytes'] / MIB:.1f} | 1.000 | {fp16['ppl_fp32']:.3f} (FP32) | — | — | — |")
    base = {r["quantizer"]: r["ppl_int4"] for r in rows if not r["embeddings_8bit"]}
    for r in rows:
        s = r["sizes"]
        name = r["quantizer"].upper() + (" + int8 emb/lm_head" if r["embeddings_8bit"] else " (16-bit emb/lm_head)")
        fake = r["ppl_fake_quant"]
        delta = f"{100 * (r['ppl_int4'] - fake) / fake:+.2f} %" if fake else "—"
        emb = f"{100 * (r['ppl_int4'] - base[r['quantizer']]) / base[r['quantizer']]:+.2f} %" \
            if r["embeddings_8bit"] else "—"
        lines.append(
            f"| {name} | {s['decoder_linear_bytes'] / MIB:.1f} | {s['decoder_linear_ratio']:.3f} | "
            f"{s['directory_bytes'] / MIB:.1f} | {s['directory_bytes'] / fp16['directory_bytes']:.3f} | "
            f"{f'{fake:.3f}' if fake else '—'} | {r['ppl_int4']:.3f} | {delta} | {emb} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refined", default="runs/smollm2-lsr")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--no_gptq", action="store_true")
    p.add_argument("--data_source", default="embedded-wiki")
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--eval_windows", type=int, default=32)
    p.add_argument("--num_calibration", type=int, default=16, help="GPTQ calibration windows")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--no_noise_floor", dest="noise_floor", action="store_false")
    p.add_argument("--work_dir", default=None, help="where the exports go (default: a temporary directory)")
    p.add_argument("--out", default="benchmarks/export_smollm2")
    args = p.parse_args()
    torch.manual_seed(0)

    refined = Path(args.refined)
    if is_refined_dir(refined):
        source, note = str(refined), f"refined checkpoint {refined}"
    else:
        source, note = args.model, f"no refined checkpoint at {refined}: method quarot (rotations only) on {args.model}"
    settings = {"source": note, "data": args.data_source, "seq_len": args.seq_len, "eval_windows": args.eval_windows,
                "gptq_calibration_windows": args.num_calibration, "runtime": "lsr.kernels reference backend (CPU)",
                "torch_threads": torch.get_num_threads()}
    print("settings:", json.dumps(settings), flush=True)
    tokenizer = load_tokenizer(args.model)
    windows = LsrDataModule(tokenizer, source=args.data_source, seq_len=args.seq_len,
                            max_eval_windows=args.eval_windows).eval_windows()
    settings["eval_windows"] = int(windows.shape[0])
    quantizers = ["rtn"] + ([] if args.no_gptq else ["gptq"])
    calib = None
    if "gptq" in quantizers:
        data = CalibrationData(source=args.data_source, seq_len=args.seq_len, num_calibration=args.num_calibration)
        calib = calibration_windows(tokenizer, ExportConfig(data=data))
    with tempfile.TemporaryDirectory(prefix="lsr-export-sizes-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        fp16 = _fp16_directory(args.model, work, windows, args.batch_size)
        rows = [row for q in quantizers for row in _variant(source, q, work, windows, calib, args)]
    table = _table(rows, fp16)
    noise = [r for r in rows if r.get("ppl_fake_quant_float64")]
    floor = ""
    if noise:
        r = noise[0]
        f32, f64 = r["ppl_fake_quant"], r["ppl_fake_quant_float64"]
        floor = (f"Numerical noise floor: the same RTN fake-quant twin in float64 instead of float32 gives "
                 f"{f64:.3f} ({100 * (f64 - f32) / f32:+.2f} %).")
    print("\n" + table + ("\n\n" + floor if floor else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "fp16": fp16, "variants": rows}, indent=2))
    md = [f"# INT4 export of SmolLM2-135M ({note})", "",
          "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "source"), "", table, ""]
    if floor:
        md += [floor, ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
