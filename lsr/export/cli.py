"""`lsr export` and `lsr eval`: argparse front ends (dispatched from `lsr.cli.main`).

    lsr export runs/smollm2-lsr exports/smollm2-w4a4 [--weight_quantizer gptq] [--embeddings_8bit] [--overwrite]
    lsr export smollm2 exports/smollm2-quarot --method quarot
    lsr eval exports/smollm2-w4a4 --data.source embedded-wiki --data.seq_len 512 --data.max_eval_windows 32
"""

from __future__ import annotations

import argparse
import json
import time

from lsr.export.config import CalibrationData, ExportConfig, GPTQOptions


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lsr export", description="Export a real INT4 (W4A4) compressed-tensors model.")
    p.add_argument("source", help="refined checkpoint directory (lsr fit output), model name/directory, or smollm2")
    p.add_argument("out_dir", help="output directory (refused if it exists, unless --overwrite)")
    p.add_argument("--method", default="quarot", help="preset for a plain model: quarot | smoothrot | quantile")
    p.add_argument("--weight_quantizer", choices=("rtn", "gptq"), default="rtn")
    p.add_argument("--gptq.damp", dest="damp", type=float, default=0.01)
    p.add_argument("--gptq.act_order", dest="act_order", action="store_true")
    p.add_argument("--gptq.block_size", dest="block_size", type=int, default=128)
    p.add_argument("--gptq.no_true_sequential", dest="true_sequential", action="store_false")
    p.add_argument("--embeddings_8bit", action="store_true", help="int8 weight-only embedding (per row) and lm_head")
    p.add_argument("--storage_dtype", choices=("float16", "bfloat16"), default="float16")
    p.add_argument("--data.source", dest="data_source", default="embedded-wiki")
    p.add_argument("--data.seq_len", dest="seq_len", type=int, default=512)
    p.add_argument("--data.num_calibration", dest="num_calibration", type=int, default=16)
    p.add_argument("--data.seed", dest="seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p


def export_main(argv: list[str]) -> None:
    from lsr.export import export_model
    from lsr.export.sizes import size_report

    args = _export_parser().parse_args(argv)
    config = ExportConfig(
        weight_quantizer=args.weight_quantizer,
        gptq=GPTQOptions(damp=args.damp, act_order=args.act_order, block_size=args.block_size,
                         true_sequential=args.true_sequential),
        embeddings_8bit=args.embeddings_8bit, storage_dtype=args.storage_dtype, method=args.method,
        data=CalibrationData(source=args.data_source, seq_len=args.seq_len, num_calibration=args.num_calibration,
                             seed=args.seed),
        overwrite=args.overwrite,
    )
    start = time.perf_counter()
    try:
        result = export_model(args.source, args.out_dir, config)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"lsr export: {err}") from err
    sizes = size_report(result.path)
    print(f"exported {args.source} -> {result.path} in {time.perf_counter() - start:.1f}s "
          f"(method {result.lsr['method']['name']}, weights {args.weight_quantizer})")
    print(f"decoder linears: {sizes['decoder_linear_bytes'] / 2**20:.2f} MiB on disk, "
          f"{sizes['decoder_linear_ratio']:.4f}x FP16; directory {sizes['directory_bytes'] / 2**20:.2f} MiB")


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lsr eval", description="Evaluate an exported INT4 model (perplexity, lm-eval).")
    p.add_argument("path", help="directory written by `lsr export`")
    p.add_argument("--data.source", dest="data_source", default="embedded-wiki")
    p.add_argument("--data.seq_len", dest="seq_len", type=int, default=512)
    p.add_argument("--data.max_eval_windows", "--max_eval_windows", dest="max_eval_windows", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--backend", choices=("auto", "reference", "triton", "fp8"), default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval tasks (needs lm-eval)")
    p.add_argument("--include_path", default=None, help="directory of local lm-eval task files")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: examples per task")
    p.add_argument("--no_perplexity", action="store_true")
    p.add_argument("--json", dest="json_out", default=None, help="write the results to this JSON file")
    return p


def eval_main(argv: list[str]) -> None:
    from lsr.data.module import LsrDataModule
    from lsr.export import load_quantized
    from lsr.export.evaluate import LmEvalUnavailable, perplexity, run_lm_eval
    from lsr.models import load_tokenizer

    args = _eval_parser().parse_args(argv)
    try:
        model = load_quantized(args.path, backend=args.backend, device=args.device)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"lsr eval: {err}") from err
    tokenizer = load_tokenizer(args.path)
    results: dict = {"path": args.path, "backend": args.backend}
    if not args.no_perplexity:
        dm = LsrDataModule(tokenizer, source=args.data_source, seq_len=args.seq_len,
                           max_eval_windows=args.max_eval_windows)
        windows = dm.eval_windows()
        start = time.perf_counter()
        ppl = perplexity(model, windows, batch_size=args.batch_size, device=args.device)
        results["perplexity"] = {"value": ppl, "source": args.data_source, "seq_len": args.seq_len,
                                 "windows": int(windows.shape[0])}
        print(f"perplexity {ppl:.4f} on {windows.shape[0]} x {args.seq_len} tokens of {args.data_source} "
              f"({time.perf_counter() - start:.1f}s)")
    tasks = [t for t in args.tasks.split(",") if t]
    if tasks:
        try:
            results["tasks"] = run_lm_eval(model, tokenizer, tasks, include_path=args.include_path, limit=args.limit,
                                           max_length=args.seq_len, device=args.device)
            for task, metrics in results["tasks"].items():
                print(task, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        except LmEvalUnavailable as err:
            print(f"skipping zero-shot tasks {tasks}: {err}")
            results["tasks"] = {"skipped": str(err)}
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(results, handle, indent=2, default=str)
