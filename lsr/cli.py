"""The `lsr` command: one jsonargparse parser, typed configs shared by every subcommand, ``--config`` YAML files.

    lsr fit --config configs/smollm2.yaml        apply the recipe block by block (learning with Lightning)
    lsr validate --config configs/smollm2.yaml   perplexity (--variant fp | rotated | fake_quant)
    lsr run --config configs/smollm2.yaml        the main job: FP -> fit -> fake-quant -> INT4 export -> reload
    lsr export SOURCE OUT_DIR [--recipe.name quarot-gptq]   real INT4 compressed-tensors export
    lsr eval PATH                                perplexity (and lm-eval tasks) of an exported INT4 model
    lsr generate PATH --prompt "..."             stream a reply (INT4, or --variant fp | fake_quant), tokens/s and
                                                 KV-cache bytes per token per layer

A recipe is resolved from ``recipe.name`` (a preset) and the fields given beside it, which override the preset's.
Bad values end in one line naming the field, the value and what is accepted.
"""

from __future__ import annotations

import sys
from dataclasses import fields, is_dataclass
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from lsr.data.config import DataConfig
from lsr.export.config import ExportConfig
from lsr.export.prepare import EXPORT_CALIBRATION
from lsr.models.loading import ModelConfig
from lsr.recipe import PRESETS, Recipe

COMMANDS = ("fit", "validate", "run", "export", "eval", "generate")
Variant = Literal["fp", "rotated", "fake_quant"]
GenerateVariant = Literal["int4", "fp", "fake_quant"]
Backend = Literal["auto", "reference", "triton", "fp8"]


def _trainer_arguments(parser: ArgumentParser) -> None:
    from lightning import Trainer

    parser.add_class_arguments(
        Trainer, "trainer", instantiate=False, fail_untyped=False, sub_configs=True,
        skip={"max_epochs", "max_steps", "min_epochs", "min_steps", "max_time", "logger", "enable_checkpointing",
              "default_root_dir", "num_sanity_val_steps", "limit_val_batches", "val_check_interval",
              "check_val_every_n_epoch", "limit_test_batches", "limit_predict_batches", "fast_dev_run"},
    )


def _run_arguments(parser: ArgumentParser, recipe: Recipe, *, train: bool) -> None:
    parser.add_class_arguments(ModelConfig, "model")
    parser.add_class_arguments(Recipe, "recipe", default=recipe)
    parser.add_class_arguments(DataConfig, "data")
    parser.add_argument("--output_dir", type=str, default="runs/smollm2-lsr",
                        help="the refined checkpoint and its report (a killed run resumes here)")
    parser.add_argument("--batch_size", type=int, default=4, help="calibration windows per forward pass")
    if train:
        parser.add_argument("--log_dir", type=str, default="lightning_logs", help="TensorBoard logs")
        parser.add_argument("--linear_errors", type=bool, default=True,
                            help="score every linear before and after (TensorBoard, report); ~1/4 of a block's time")
        _trainer_arguments(parser)


def _subparser(command: str, recipe: Recipe) -> ArgumentParser:
    p = ArgumentParser(prog=f"lsr {command}", exit_on_error=True)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML config (several are merged in order)")
    if command in ("fit", "run"):
        _run_arguments(p, recipe, train=True)
    if command == "run":
        p.add_class_arguments(ExportConfig, "export")
        p.add_argument("--export_dir", type=str | None, default=None, help="default: OUTPUT_DIR/int4")
    if command == "validate":  # accepts the fit config whole (trainer settings are not used)
        _run_arguments(p, recipe, train=True)
        p.add_argument("--variant", type=Variant, default="fp",
                       help="fp, rotated (exact: same perplexity) or fake_quant (the refined checkpoint in output_dir)")
    if command == "export":
        p.add_argument("source", type=str, help="refined checkpoint directory (lsr fit output) or model name/path")
        p.add_argument("out_dir", type=str, help="output directory (refused if it exists, unless overwrite)")
        p.add_class_arguments(Recipe, "recipe", default=recipe)
        p.add_class_arguments(DataConfig, "data", default=EXPORT_CALIBRATION)
        p.add_class_arguments(ExportConfig, "export")
        p.add_argument("--batch_size", type=int, default=4)
    if command == "eval":
        p.add_argument("path", type=str, help="directory written by `lsr export`")
        p.add_class_arguments(DataConfig, "data", default=DataConfig(seq_len=512, max_eval_windows=32))
        p.add_argument("--backend", type=Backend, default="auto")
        p.add_argument("--device", type=str, default="cpu")
        p.add_argument("--tasks", type=str, default="", help="comma-separated lm-eval tasks (needs lm-eval)")
        p.add_argument("--include_path", type=str | None, default=None, help="directory of local lm-eval tasks")
        p.add_argument("--limit", type=int | None, default=None, help="lm-eval: examples per task")
        p.add_argument("--no_perplexity", type=bool, default=False)
        p.add_argument("--json", type=str | None, default=None, help="write the results to this JSON file")
    if command == "generate":
        p.add_argument("path", type=str, help="directory written by `lsr export`")
        p.add_argument("--prompt", type=str, required=True, help="the user's message")
        p.add_argument("--max_new_tokens", type=int, default=64)
        p.add_argument("--variant", type=GenerateVariant, default="int4",
                       help="int4 (the export, KV cache quantized as it records), fp (its source model) or "
                            "fake_quant (its source rebuilt with its recipe, in float)")
        p.add_argument("--backend", type=Backend, default="reference", help="INT4 linears (int4 only)")
        p.add_argument("--device", type=str, default="cpu")
        p.add_argument("--chat", type=bool, default=True, help="use the tokenizer's chat template when it has one")
        p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
        p.add_argument("--json", type=str | None, default=None, help="write the report to this JSON file")
    return p


def build_parser(recipe: Recipe | None = None) -> ArgumentParser:
    parser = ArgumentParser(prog="lsr", description=__doc__.split("\n\n")[0])
    commands = parser.add_subcommands(required=True, dest="command")
    for command in COMMANDS:
        commands.add_subcommand(command, _subparser(command, recipe or PRESETS["lsr"]))
    return parser


def _to_plain(value: Any) -> Any:
    if isinstance(value, Namespace):
        return {k: _to_plain(v) for k, v in vars(value).items()}
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    return value


def _recipe_fields(data: dict | None) -> dict:
    return {k: v for k, v in (data or {}).items() if k in {f.name for f in fields(Recipe)}}


def parse(argv: list[str]) -> tuple[str, dict]:
    """Parse `argv` into (command, plain config dict); the recipe is resolved from its preset ``recipe.name``."""
    probe = [a for a in argv if not a.startswith("--print_config")]  # printing waits for the preset's defaults
    cfg = build_parser().parse_args(probe)
    command = cfg.command
    name = cfg[command].get("recipe", Namespace(name=None)).name if "recipe" in cfg[command] else None
    if name is not None and name != "lsr":
        if name not in PRESETS and name != "custom":
            raise ValueError(f"recipe.name={name!r} is invalid: expected a preset ({', '.join(PRESETS)}) or custom")
        cfg = build_parser(PRESETS.get(name, Recipe())).parse_args(argv)
    elif len(probe) != len(argv):
        cfg = build_parser().parse_args(argv)
    return command, _to_plain(cfg[command])


def build_config(kind: type, data: dict | None) -> Any:
    """A dataclass from parsed values (recursively; checks run in ``__post_init__``)."""
    if data is None:
        return None
    if kind is Recipe:
        return Recipe.from_dict(_recipe_fields(data))
    values = {}
    for f in fields(kind):
        if f.name in data:
            v = data[f.name]
            values[f.name] = build_config(f.type, v) if is_dataclass(f.type) and isinstance(v, dict) else v
    return kind(**values)


def trainer_kwargs(cfg: dict) -> dict:
    """Trainer arguments that differ from Trainer's defaults, callbacks instantiated."""
    trainer = dict(cfg.get("trainer") or {})
    if trainer.get("callbacks"):
        from lightning import Callback

        p = ArgumentParser()
        p.add_argument("--callbacks", type=list[Callback] | None)
        trainer["callbacks"] = p.instantiate_classes(p.parse_object({"callbacks": trainer["callbacks"]})).callbacks
    import inspect

    from lightning import Trainer

    defaults = {k: v.default for k, v in inspect.signature(Trainer).parameters.items()}
    return {k: v for k, v in trainer.items() if k not in defaults or v != defaults[k]}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "lsr"
    try:
        command, cfg = parse(argv)
        from lsr import commands

        getattr(commands, command)(
            cfg, model=build_config(ModelConfig, cfg.get("model")), recipe=build_config(Recipe, cfg.get("recipe")),
            data=build_config(DataConfig, cfg.get("data")), export=build_config(ExportConfig, cfg.get("export")),
            trainer=trainer_kwargs(cfg) if command in ("fit", "run") else None,
        )
    except (ValueError, FileExistsError, FileNotFoundError, ModuleNotFoundError) as err:
        raise SystemExit(f"lsr {command}: error: {err}") from None


if __name__ == "__main__":
    main()
