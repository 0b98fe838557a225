"""What a needle evaluation leaves behind: the tables, needle.json and the needle.png heatmap.

The heatmap follows the DeepSeek-V3 report's Figure 8: x the context length in tokens, y the
needle's depth in percent (0 at the top), colour the score on a red-yellow-green scale fixed to
[0, 1], each cell annotated with its value; two panels side by side, exact retrieval and answer
probability (`dsv3_jax.eval.needle` defines both). Every file is written atomically.
"""

from __future__ import annotations

import json
import os

from dsv3_jax.files import atomic_file

JSON_FILE, PNG_FILE = "needle.json", "needle.png"
PANELS = (("exact", "exact retrieval"), ("answer_prob", "answer probability"))


def format_table(result: dict, score: str, title: str) -> str:
    """result[score] ([length][depth]) as text: a row per depth, a column per length."""
    lengths, depths = result["lengths"], result["depths"]
    width = max(8, *(len(str(n)) + 2 for n in lengths))
    lines = [f"{title} (mean over {result['trials']} trial(s))",
             "depth \\ length" + "".join(f"{n:>{width}}" for n in lengths)]
    for j, depth in enumerate(depths):
        row = "".join(f"{result[score][i][j]:>{width}.3f}" for i in range(len(lengths)))
        lines.append(f"{_percent(depth):>14}{row}")
    return "\n".join(lines)


def format_tables(result: dict) -> str:
    return "\n\n".join(format_table(result, score, title) for score, title in PANELS)


def _percent(depth: float) -> str:
    return f"{100 * depth:g}%"


def checkpoint_name(result: dict) -> str:
    path = (result.get("checkpoint") or "").rstrip("/\\")
    return os.path.basename(path) or path or "model"


def write_json(result: dict, path: str) -> None:
    with atomic_file(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


def plot_heatmap(result: dict, path: str) -> bool:
    """Writes the two-panel heatmap to `path` (PNG); False, writing nothing, when matplotlib is
    not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    import numpy as np

    lengths, depths = result["lengths"], result["depths"]
    fig = Figure(figsize=(2.0 + 2 * max(4.0, 0.9 * len(lengths)), 1.5 + 0.5 * len(depths)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(PANELS), squeeze=False)[0]
    for ax, (score, title) in zip(axes, PANELS):
        grid = np.asarray(result[score], np.float64).T  # [depth][length]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [_percent(d) for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(title)
        for j in range(len(depths)):
            for i in range(len(lengths)):
                ax.text(i, j, f"{grid[j, i]:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.05)
    fig.suptitle(f"needle in a haystack: {checkpoint_name(result)} "
                 f"({result['trials']} trial(s) per cell)")
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    return True


def write_results(result: dict, output_dir: str) -> tuple[str, str | None]:
    """needle.json and needle.png in output_dir (created); returns their paths, None for a PNG
    skipped because matplotlib is missing (an older needle.png there is removed: it would not
    match the new needle.json)."""
    os.makedirs(output_dir, exist_ok=True)
    json_path, png_path = os.path.join(output_dir, JSON_FILE), os.path.join(output_dir, PNG_FILE)
    write_json(result, json_path)
    if plot_heatmap(result, png_path):
        return json_path, png_path
    if os.path.lexists(png_path):
        os.remove(png_path)
    return json_path, None
