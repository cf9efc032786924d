"""Compare W4A4 recipes × weight methods on one model: perplexity of the reloaded INT4 export on several texts.

    python scripts/compare_methods.py --config configs/smollm2.yaml --recipes quarot smoothrot quantile lsr \
        --weights rtn gptq gptaq --eval-sources embedded-wiki python-stdlib --eval-windows 64 \
        --headline quarot:gptq lsr:gptq --seeds 0 1 2 --out benchmarks/compare_smollm2 [-- lsr fit overrides]

A KV-cache setting given as an override (``-- --recipe.kv_cache.bits 4``) applies to every row (run directories get
``-kv4``), and so does the R4 layout (``-- --recipe.rotate.r4 block-diagonal``: ``-r4block``); run once per setting
with its own ``--out`` for KV16 / KV8 / KV4 (or R4) tables side by side.

Rows: FP, then every recipe × weight method: the preset ``{recipe}-{method}`` where there is one, else
``Recipe.from_name(recipe, weights={"method": method})`` (the config's recipe, its overrides included, when it names
that preset), fitted with `lsr.learn.fit` into
``RUNS/{recipe}-{method}-s{seed}`` (a finished checkpoint is reused), fake-quant perplexity, INT4 export to
``{run}/int4``, reloaded with the reference backend, INT4 perplexity (the headline number). Every row is evaluated on
the same windows: ``--eval-windows`` × the config's seq_len of each source. ``--headline`` rows run for every seed
(seed s sets rotate.seed and data.seed: R1's signs and the calibration offsets) and show mean ± sample std over the
seeds; the other rows run for the first seed only.

After every row OUT.json is rewritten; a rerun with the same model, data, evaluation and threads reuses every row whose
recipe is the one it would run now (each row records its recipe): a config naming a preset with overrides
(``-- --recipe.name lsr-gptq --recipe.learn.epochs 6``) re-runs that preset's rows only, into a run directory of its
own, and the table notes the overrides. A row that failed is retried; a row that raises records its error and the
script goes on. Writes OUT.md (printed too) and OUT.png (block errors
of each recipe's first seed); ``--only-table`` re-renders both from OUT.json without running anything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from lsr.checkpoint import is_checkpoint, load_checkpoint
from lsr.cli import build_config, parse, trainer_kwargs
from lsr.data.config import DataConfig
from lsr.export import ExportConfig, load_quantized, write_export
from lsr.learn import fit
from lsr.learn.report import block_error_curves, full_layer_mean_error, plot_block_errors
from lsr.metrics import perplexity
from lsr.models import load_tokenizer
from lsr.models.loading import ModelConfig, load_model
from lsr.recipe import PRESETS, Recipe, merge

Key = tuple[str, str | None, int | None]  # (recipe, weight method, seed); FP is ("FP", None, None)
FP: Key = ("FP", None, None)


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2.yaml")
    parser.add_argument("--recipes", nargs="+", default=["quarot", "smoothrot", "quantile", "lsr"],
                        help="base presets")
    parser.add_argument("--weights", nargs="+", default=["rtn", "gptq"], help="weight methods (recipe weights.method)")
    parser.add_argument("--eval-sources", nargs="+", default=["embedded-wiki", "python-stdlib"])
    parser.add_argument("--eval-windows", type=int, default=None, help="default: the config's data.max_eval_windows")
    parser.add_argument("--headline", nargs="*", default=[], metavar="RECIPE:METHOD",
                        help="rows run for every seed")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", default="benchmarks/compare_smollm2", help="writes OUT.json, OUT.md, OUT.png")
    parser.add_argument("--runs", default="runs/compare", help="refined checkpoints and exports; finished ones reused")
    parser.add_argument("--only-table", action="store_true", help="re-render OUT.md and OUT.png from OUT.json")
    parser.add_argument("--fake-quant", action="store_true",
                        help="also the fake-quant perplexity on the first text (the INT4 rows are the headline)")
    args, rest = parser.parse_known_args()
    for item in args.headline:
        base, _, method = item.partition(":")
        if base not in args.recipes or method not in args.weights:
            parser.error(f"--headline {item!r}: expected RECIPE:METHOD with RECIPE in --recipes, METHOD in --weights")
    return args, [r for r in rest if r != "--"]


def plan(args: argparse.Namespace) -> list[Key]:
    """FP, then every recipe × method: all seeds for headline rows, the first seed for the others."""
    headline = {tuple(item.split(":", 1)) for item in args.headline}
    return [FP] + [(base, method, seed) for base in args.recipes for method in args.weights
                   for seed in (args.seeds if (base, method) in headline else args.seeds[:1])]


def recipe_for(base: str, method: str, seed: int, config_recipe: dict) -> Recipe:
    """The preset ``{base}-{method}`` when there is one (its learning is set up for that weight method), else `base`
    with ``weights.method``; the config's recipe overrides apply when the config names that preset."""
    name = f"{base}-{method}" if f"{base}-{method}" in PRESETS else base
    if name == config_recipe["name"]:
        recipe = merge(build_config(Recipe, config_recipe), {"weights": {"method": method}})
    else:
        recipe = Recipe.from_name(name, weights={"method": method})
    if config_recipe.get("kv_cache") is not None:  # a KV-cache setting (-- --recipe.kv_cache.bits 4) applies to all
        recipe = merge(recipe, {"kv_cache": config_recipe["kv_cache"]})
    if recipe.rotate is None:
        return recipe
    r4 = (config_recipe.get("rotate") or {}).get("r4", recipe.rotate.r4)  # so does the R4 layout
    return replace(recipe, rotate=replace(recipe.rotate, seed=seed, r4=r4))


def preset_of(recipe: Recipe) -> Recipe | None:
    """The preset `recipe` was resolved from, with its rotation (seed, R4) and KV cache: what it is without other
    overrides (None for a recipe that names no preset)."""
    if recipe.name not in PRESETS:
        return None
    preset = PRESETS[recipe.name]
    return replace(preset, rotate=recipe.rotate if preset.rotate is not None else None, kv_cache=recipe.kv_cache)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    return {k: v for key, value in data.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def overrides(recipe: dict) -> list[str]:
    """``field=value`` for every field of a row's recipe (`Recipe.to_dict`) that differs from its preset's."""
    preset = preset_of(Recipe.from_dict(recipe))
    if preset is None:
        return ["custom recipe"]
    base, own = _flat(preset.to_dict()), _flat(recipe)
    return [f"{k}={own.get(k)}" for k in sorted(set(base) | set(own)) if base.get(k) != own.get(k)]


def run_tag(recipe: Recipe) -> str:
    """``""`` for a preset with a float cache and a full R4, else ``-r4block``, ``-kv4`` (``sym``, ``g{group}``,
    ``c{clip}``, ``-nor3`` where not the default) and, for a preset with other overrides, ``-`` and a digest of the
    recipe: run directories of different recipes never collide."""
    kv = recipe.kv_cache
    tag = "-r4block" if recipe.rotate is not None and recipe.rotate.r4 == "block-diagonal" else ""
    if kv is not None:
        tag += f"-kv{kv.bits}" + ("sym" if kv.symmetric else "") + (f"g{kv.group_size}" if kv.group_size else "")
        tag += (f"c{kv.clip_ratio:g}" if kv.clip_ratio != 0.95 else "") + ("" if kv.r3 else "-nor3")
    if preset_of(recipe) != recipe:
        tag += "-" + hashlib.sha1(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return tag


def key_of(row: dict) -> Key:
    return row["recipe"], row["weights"], row["seed"]


def label(key: Key) -> str:
    return "FP" if key == FP else f"{key[0]} {key[1]} seed {key[2]}"


def evaluate(model: torch.nn.Module, windows: dict[str, torch.Tensor], batch_size: int, label: str) -> dict:
    return {source: perplexity(model, w, batch_size=batch_size, log=print, label=f"{label} on {source}")
            for source, w in windows.items()}


def run_fp(model: ModelConfig, windows: dict[str, torch.Tensor], batch_size: int) -> dict:
    start = time.perf_counter()
    lm, _ = load_model(model.name, dtype=model.torch_dtype, with_tokenizer=False)
    ppl = evaluate(lm, windows, batch_size, "FP perplexity")
    return {"recipe": "FP", "weights": None, "seed": None, "ppl": ppl, "eval_s": time.perf_counter() - start}


def run_row(key: Key, cfg: dict, model: ModelConfig, data: DataConfig, trainer: dict,
            windows: dict[str, torch.Tensor], runs: Path, fake_quant: bool = False) -> dict:
    """Fit, fake-quant perplexity, INT4 export, reload, INT4 perplexity; an exception is recorded in the row."""
    base, method, seed = key
    row: dict[str, Any] = {"recipe": base, "weights": method, "seed": seed}
    try:
        recipe = recipe_for(base, method, seed, cfg["recipe"])
        run_dir = runs / f"{base}-{method}-s{seed}{run_tag(recipe)}"
        row["run"], row["recipe_config"] = str(run_dir), recipe.to_dict()
        done = load_checkpoint(run_dir).completed_blocks if is_checkpoint(run_dir) else 0
        start = time.perf_counter()
        result, tokenizer = fit(model, recipe, replace(data, seed=seed), run_dir, batch_size=cfg["batch_size"],
                                trainer=trainer, log_dir=str(Path("lightning_logs") / "compare"))
        row["fit_s"] = time.perf_counter() - start
        row["fit_reused"] = done == len(result.records)
        row["fit_resumed_at_block"] = done if 0 < done < len(result.records) else None
        row["full_layer_mean_error"] = full_layer_mean_error(result.records)
        curves = block_error_curves(result.records, f"{base}-{method}")
        row["curves"] = {k: v for k, v in curves.items()
                         if k.endswith("(final)") or (recipe.learn is not None and k.endswith("(init)"))}
        start = time.perf_counter()
        if fake_quant:  # fake quant ≈ INT4 up to float rounding (tests/test_export.py): one text is enough
            first = dict(list(windows.items())[:1])
            row["fake_quant_ppl"] = evaluate(result.model, first, data.batch_size, "fake-quant perplexity")
        write_export(result, run_dir / "int4", ExportConfig(overwrite=True), tokenizer)
        del result
        int4 = load_quantized(run_dir / "int4", backend="reference")
        row["int4_ppl"] = evaluate(int4, windows, data.batch_size, "INT4 perplexity")
        row["eval_s"] = time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 - recorded in the row; the other rows still run
        traceback.print_exc()
        row["error"] = f"{type(err).__name__}: {err}"
    return row


def calibration_settings(data: DataConfig) -> dict:
    """The data settings of a run (evaluation texts are ``eval_sources``; ``eval_source`` is not used here)."""
    return {k: v for k, v in asdict(data).items() if k != "eval_source"}


PER_ROW_SETTINGS = ("recipe", "extra")  # each row records its own recipe (``recipe_config``)


def previous_rows(path: Path, settings: dict) -> dict[Key, dict]:
    """Rows of an earlier run with the same model, data, evaluation and threads (its recipe may differ: each row is
    checked with `reusable`); an earlier file with other settings is kept as .old."""
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text())
    def shared(s: dict) -> dict:
        return {k: v for k, v in s.items() if k not in PER_ROW_SETTINGS}
    if shared(doc.get("settings", {})) != shared(settings):
        backup = path.with_name(path.name + ".old")
        path.replace(backup)
        print(f"{path} was written with other settings: kept as {backup}, starting over")
        return {}
    rows = {key_of(r): r for r in doc["rows"]}
    for row in rows.values():
        if "recipe_config" in row:  # read with today's defaults for recipe fields added after the row was written
            row["recipe_config"] = Recipe.from_dict(row["recipe_config"]).to_dict()
        elif row.get("run") and is_checkpoint(run := Path(row["run"])):  # rows from before rows recorded a recipe
            row["recipe_config"] = load_checkpoint(run).recipe.to_dict()
    return rows


def reusable(row: dict, key: Key, config_recipe: dict) -> bool:
    """A finished row of the recipe this run would use for `key` (the recipe each row records)."""
    if "error" in row:
        return False
    return key == FP or row.get("recipe_config") == recipe_for(*key, config_recipe).to_dict()


def save(path: Path, settings: dict, rows: dict[Key, dict], order: list[Key]) -> dict:
    ordered = [rows[k] for k in order if k in rows] + [r for k, r in rows.items() if k not in order]
    doc = {"settings": settings, "rows": ordered}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return doc


def values(rows: list[dict], get: Callable[[dict], float]) -> list[float]:
    """`get` of every row that has that value."""
    out = []
    for row in rows:
        try:
            out.append(float(get(row)))
        except (KeyError, TypeError):
            pass
    return out


def cell(values: list[float], spec: str, std_spec: str | None = None) -> str:
    """One value, or mean ± sample std of several; "—" for none."""
    if not values:
        return "—"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), std_spec or spec)}"


RECIPE_ORDER = ("quarot", "smoothrot", "quantile", "lsr")
METHOD_ORDER = ("rtn", "gptq", "gptaq")


def table_order(recipe: str, method: str) -> tuple:
    """Rows by recipe (from no learning to lsr), then weight method (rtn, gptq, gptaq); others after, by name."""
    def rank(value: str, order: tuple[str, ...]) -> tuple[int, str]:
        return (order.index(value), "") if value in order else (len(order), value)
    return rank(recipe, RECIPE_ORDER), rank(method, METHOD_ORDER)


def render(doc: dict) -> str:
    """The markdown table of a results document (rows of one recipe × method aggregated over their seeds)."""
    s, rows = doc["settings"], doc["rows"]
    sources, first = s["eval_sources"], s["eval_sources"][0]
    fp = next((r for r in rows if key_of(r) == FP and "ppl" in r), None)
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if key_of(r) != FP:
            groups.setdefault((r["recipe"], r["weights"]), []).append(r)
    changed = {key: group_overrides(group) for key, group in groups.items()}
    data = s["data"]
    kv = s["recipe"].get("kv_cache")
    kv_text = "KV cache in float (KV16)" if kv is None else (
        f"KV{kv['bits']} cache ({'symmetric' if kv['symmetric'] else 'asymmetric'}, per token per "
        f"{'head' if kv['group_size'] is None else str(kv['group_size']) + ' values'}, clip {kv['clip_ratio']}, "
        f"{'with' if kv['r3'] else 'without'} R3)")
    lines = [
        f"model: {s['model']['name']} ({s['model']['dtype']}); W4A4 (weights 4-bit per output channel, activations "
        f"4-bit per token on every linear input); {kv_text}; calibration: {data['num_calibration']}×{data['seq_len']} "
        "windows "
        f"of {data['source']}; eval: {s['eval_windows'] or 'all'}×{data['seq_len']} windows of each source; threads: "
        f"{s['threads']}; Python {s['python']}, torch {s['torch']}; each row runs its preset (lsr/recipe.py PRESETS)"
        + (", overrides below" if any(changed.values()) else ""),
        "",
        "| recipe | weights | seeds | " + " | ".join(f"INT4 ppl ({src})" for src in sources)
        + f" | fake-quant ppl ({first}) | gap to FP ({first}) | full-layer mean error | fit s | eval s |",
        "|---" * (len(sources) + 8) + "|",
    ]
    if fp is not None:
        ppl = " | ".join(f"{fp['ppl'][src]:.2f}" for src in sources)
        lines.append(f"| FP | — | — | {ppl} | — | — | — | — | {fp['eval_s']:.0f} |")
    errors, marks = [], set()
    for (base, method), group in sorted(groups.items(), key=lambda item: table_order(*item[0])):
        ok = [r for r in group if "error" not in r]  # a failed row counts for nothing, so n is the same everywhere
        failed = [r for r in group if "error" in r]
        errors += [f"- {base} {method} seed {r['seed']}: {r['error']}" for r in failed]
        seeds = ", ".join(str(r["seed"]) for r in ok) or "—"
        if failed:
            seeds += f" ({', '.join(str(r['seed']) for r in failed)} failed)"
        mark = ""
        if any(r.get("fit_reused") for r in ok):
            mark = "*"
        elif any(r.get("fit_resumed_at_block") for r in ok):
            mark = "†"
        marks.add(mark)
        gaps = values(ok, lambda r: 100 * (r["int4_ppl"][first] / fp["ppl"][first] - 1)) if fp else []
        cells = [base, method, seeds,
                 *(cell(values(ok, lambda r, src=src: r["int4_ppl"][src]), ".2f") for src in sources),
                 cell(values(ok, lambda r: r["fake_quant_ppl"][first]), ".2f"),
                 cell(gaps, "+.1f", ".1f") + (" %" if gaps else ""),
                 cell(values(ok, lambda r: r["full_layer_mean_error"]), ".4f"),
                 cell(values(ok, lambda r: r["fit_s"]), ".0f") + mark,
                 cell(values(ok, lambda r: r["eval_s"]), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "FP row: the float model's perplexity. Several seeds: mean ± sample std over them (n = number of "
              "seeds; failed seeds are left out, see Errors). gap to FP: INT4 perplexity over FP's. eval s: "
              "fake-quant perplexity, INT4 export, reload and INT4 perplexity."]
    if "*" in marks:
        lines.append("\\* a finished refined checkpoint was reused: fit s is the time to load it.")
    if "†" in marks:
        lines.append("† a killed fit was resumed: fit s covers its remaining blocks only.")
    notes = [f"- {base} {method}: {', '.join(items)}" for (base, method), items in
             sorted(changed.items(), key=lambda item: table_order(*item[0])) if items]
    if notes:
        lines += ["", "Overrides of the presets:", *notes]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines)


def group_overrides(group: list[dict]) -> list[str]:
    """The overrides of the preset in a row group's recipe (its first row that has one recorded)."""
    for row in group:
        if "error" not in row and "recipe_config" in row:
            return overrides(row["recipe_config"])
    return []


def write_outputs(doc: dict, out: str) -> None:
    table = render(doc)
    print("\n" + table)
    Path(f"{out}.md").write_text(table + "\n")
    curves: dict[str, list] = {}
    for row in doc["rows"]:  # rows are in seed order: the first seed of each recipe × method
        for name, points in row.get("curves", {}).items():
            curves.setdefault(name, points)
    if curves:
        plot_block_errors(curves, Path(f"{out}.png"), "relative block error ‖Yq − Y‖² / ‖Y‖²")


def main() -> None:
    args, rest = parse_args()
    json_path = Path(f"{args.out}.json")
    if args.only_table:
        write_outputs(json.loads(json_path.read_text()), args.out)
        return
    _, cfg = parse(["fit", "--config", args.config, *rest])
    model, data = build_config(ModelConfig, cfg["model"]), build_config(DataConfig, cfg["data"])
    n_windows = args.eval_windows or data.max_eval_windows
    settings = json.loads(json.dumps({
        "config": args.config, "model": asdict(model), "data": calibration_settings(data),
        "recipe": cfg["recipe"],
        "batch_size": cfg["batch_size"], "threads": torch.get_num_threads(), "eval_sources": args.eval_sources,
        "eval_windows": n_windows, "python": platform.python_version(), "torch": torch.__version__, "extra": rest,
    }))
    rows = previous_rows(json_path, settings)
    tokenizer = load_tokenizer(model.name)
    windows = {src: replace(data, eval_source=src, max_eval_windows=n_windows).eval_windows(tokenizer)
               for src in args.eval_sources}
    trainer = trainer_kwargs(cfg)
    order = plan(args)
    for key in order:
        if key in rows and reusable(rows[key], key, cfg["recipe"]):
            print(f"{label(key)}: reusing the row in {json_path}")
            continue
        print(f"\n=== {label(key)} ===", flush=True)
        if key == FP:
            rows[key] = run_fp(model, windows, data.batch_size)
        else:
            rows[key] = run_row(key, cfg, model, data, trainer, windows, Path(args.runs), args.fake_quant)
        save(json_path, settings, rows, order)
    write_outputs(save(json_path, settings, rows, order), args.out)


if __name__ == "__main__":
    main()
