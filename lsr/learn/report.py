"""Per-layer error reports: a printed table, JSON, markdown, and a PNG of per-layer error by method."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from lsr.learn.engine import BlockResult


def block_mean_error(result: BlockResult, after: bool = True) -> float:
    errors = result.linear_error_after if after else result.linear_error_before
    return sum(errors.values()) / max(len(errors), 1)


def full_layer_mean_error(results: list[BlockResult], after: bool = True) -> float:
    """Mean relative output error over all linears of all blocks (seed-004's "full-layer mean error")."""
    errors = [e for r in results for e in (r.linear_error_after if after else r.linear_error_before).values()]
    return sum(errors) / max(len(errors), 1)


def markdown_table(results: list[BlockResult]) -> str:
    names = list(results[0].linear_error_after) if results else []
    head = "| block | init | block MSE init | block MSE final | " + " | ".join(names) + " | mean |"
    rows = [head, "|" + "---|" * (len(names) + 5)]
    for r in results:
        cells = " | ".join(f"{r.linear_error_after.get(n, float('nan')):.4f}" for n in names)
        rows.append(
            f"| {r.index} | {r.init} | {r.loss_init:.4g} | {r.loss_final:.4g} | {cells} | {block_mean_error(r):.4f} |"
        )
    rows.append(f"\nfull-layer mean error: before learning {full_layer_mean_error(results, False):.4f}, "
                f"after {full_layer_mean_error(results):.4f}")
    return "\n".join(rows)


def plot_per_layer_error(per_method: dict[str, list[BlockResult]], path: Path) -> None:
    """One line per method: mean relative linear error of each block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, results in per_method.items():
        ax.plot([r.index for r in results], [block_mean_error(r) for r in results], marker="o", ms=3, label=name)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("mean relative output error of its linears")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: list[BlockResult], directory: Path, method: str) -> str:
    """Print and save (JSON, markdown, PNG) the per-layer error table of one run. Returns the markdown."""
    directory.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    print(f"\nper-layer relative output error ({method}, W4A4 fake quant)\n{table}")
    (directory / "per_layer_error.md").write_text(f"# {method}\n\n{table}\n")
    payload = {
        "method": method,
        "full_layer_mean_error_before": full_layer_mean_error(results, False),
        "full_layer_mean_error": full_layer_mean_error(results),
        "blocks": [asdict(r) for r in results],
    }
    (directory / "per_layer_error.json").write_text(json.dumps(payload, indent=2))
    plot_per_layer_error({method: results}, directory / "per_layer_error.png")
    return table
