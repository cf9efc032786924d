"""The `lsr` entry point: LightningCLI (fit / validate / test / predict) plus lsr's own subcommands.

    lsr fit --config configs/smollm2.yaml        learn the smoothing scales block by block
    lsr validate --config configs/smollm2.yaml   perplexity (--model.variant fp | rotated | fake_quant)
    lsr run --config configs/smollm2.yaml        the main job: fit, then FP vs W4A4 perplexity in one table
    lsr export SOURCE OUT_DIR                    real INT4 (W4A4) compressed-tensors export (see lsr/export)
    lsr eval OUT_DIR                             perplexity (and lm-eval tasks) of an exported INT4 model
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from lsr.data.module import LsrDataModule
from lsr.learn.module import LsrModule


class LsrCLI(LightningCLI):
    """LightningCLI with the model name linked into the data module's tokenizer."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model", "data.tokenizer")


def build_cli(args: list[str] | None = None, run: bool = True) -> LsrCLI:
    return LsrCLI(
        LsrModule,
        LsrDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def main(argv: list[str] | None = None) -> None:
    words = sys.argv[1:] if argv is None else list(argv)
    if words and words[0] == "run":
        from lsr.pipeline import main_job

        main_job(words[1:])
        return
    if words and words[0] in ("export", "eval"):
        from lsr.export.cli import eval_main, export_main

        (export_main if words[0] == "export" else eval_main)(words[1:])
        return
    build_cli(argv)


if __name__ == "__main__":
    main()
