"""Per-block reports: TensorBoard charts against the block index, a markdown table, JSON and a PNG.

TensorBoard (one chart per quantity, init and final on the same chart):
``block_error`` (relative ``‖Yq − Y‖² / ‖Y‖²``: init, learned, final), ``linear_error/{q_proj, ...}`` (init and
final), ``full_layer_mean_error``; the learning curves ``train/relative_error`` and ``train/lr`` run over all blocks.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lsr.pipeline.runner import Block, BlockRecord


def full_layer_mean_error(records: list[BlockRecord], stage: str = "final") -> float:
    """Mean relative output error over all linears of all blocks (seed-004's "full-layer mean error")."""
    errors = [e for r in records for e in (r.linear_error_final if stage == "final" else r.linear_error_init).values()]
    return sum(errors) / len(errors) if errors else math.nan  # nan: not scored (linear_errors off)


class TensorBoardReport:
    """After each block, its errors on charts indexed by block (``on_block_end`` of the pipeline)."""

    def __init__(self, logger: Any) -> None:
        self.experiment = getattr(logger, "experiment", None)
        self.records: list[BlockRecord] = []

    def __call__(self, block: Block) -> None:
        self.records.append(block.record)
        if self.experiment is None:
            return
        r, i = block.record, block.index
        curves = {"init": r.error_init, "learned": r.error_learned, "final": r.error_final}
        self.experiment.add_scalars("block_error", {k: v for k, v in curves.items() if math.isfinite(v)}, i)
        for name, final in r.linear_error_final.items():
            values = {"final": final}
            if name in r.linear_error_init:
                values["init"] = r.linear_error_init[name]
            self.experiment.add_scalars(f"linear_error/{name}", values, i)
        self.experiment.add_scalar("full_layer_mean_error", full_layer_mean_error(self.records), i)
        for point, theta in block.log_scales.items():
            self.experiment.add_histogram(f"log_scales/{point}", theta.detach().cpu(), i)
        self.experiment.flush()


def markdown_table(records: list[BlockRecord]) -> str:
    """Per block: init, block errors and, when they were scored (``linear_errors``), each linear's error and their
    mean."""
    names = list(records[0].linear_error_final) if records else []
    columns = ["block", "init", "block error init", "learned", "final", *names, *(["mean"] if names else [])]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        errors = [r.linear_error_final.get(n, math.nan) for n in names]
        linear = [f"{e:.4f}" for e in errors + ([sum(errors) / len(errors)] if names else [])]
        cells = [str(r.index), r.init, f"{r.error_init:.4g}", f"{r.error_learned:.4g}", f"{r.error_final:.4g}", *linear]
        rows.append("| " + " | ".join(cells) + " |")
    if not names:
        rows.append("\nper-linear errors not scored (linear_errors: false)")
        return "\n".join(rows)
    before = full_layer_mean_error(records, "init")
    rows.append(f"\nfull-layer mean error: {full_layer_mean_error(records):.4f}"
                + (f" (before learning {before:.4f})" if any(r.linear_error_init for r in records) else ""))
    return "\n".join(rows)


def plot_block_errors(curves: dict[str, list[tuple[int, float]]], path: Path, ylabel: str) -> None:
    """One line per label: a per-block quantity against the block index (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    runs = list(dict.fromkeys(label.split(" (")[0] for label in curves))
    colors = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    for label, points in curves.items():
        if points:  # one colour per run; init dashed, learned dotted, final solid
            style = "--" if "(init)" in label else ":" if "(learned)" in label else "-"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", ms=2.5, label=label,
                    color=colors(runs.index(label.split(" (")[0]) % colors.N))
    ax.set_xlabel("decoder block")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def block_error_curves(records: list[BlockRecord], label: str) -> dict[str, list[tuple[int, float]]]:
    """``{label (init), label (learned), label (final)}`` relative block errors, those that were measured."""
    out = {}
    for stage in ("init", "learned", "final"):
        points = [(r.index, getattr(r, f"error_{stage}")) for r in records]
        points = [p for p in points if math.isfinite(p[1])]
        if points:
            out[f"{label} ({stage})"] = points
    return out


def write_report(records: list[BlockRecord], directory: Path, name: str) -> str:
    """Print and save (JSON, markdown, PNG) the per-block report of one run. Returns the markdown."""
    directory.mkdir(parents=True, exist_ok=True)
    table = markdown_table(records)
    print(f"\nper-block relative errors ({name}, W4A4 fake quant)\n{table}")
    (directory / "per_layer_error.md").write_text(f"# {name}\n\n{table}\n")
    payload = {"recipe": name, "full_layer_mean_error_init": full_layer_mean_error(records, "init"),
               "full_layer_mean_error": full_layer_mean_error(records), "blocks": [asdict(r) for r in records]}
    (directory / "per_layer_error.json").write_text(json.dumps(payload, indent=2))
    plot_block_errors(block_error_curves(records, name), directory / "per_layer_error.png",
                      "relative block error ‖Yq − Y‖² / ‖Y‖²")
    return table
