"""dev_curves.png: per report row, each method's dev curve (mean ± std over seeds) and the teacher."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any


def plot_curves(tasks: dict[str, Any], methods: list[str], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[experiment] matplotlib is not installed (pip install -e '.[bench]'): no dev-curve plot")
        return False
    cols = min(4, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, task) in zip(axes.flat, tasks.items()):
        for method in methods:
            entry = task["methods"].get(method)
            if not entry or not entry["curves"]:
                continue
            steps = [s for s, _ in entry["curves"][0]]
            aligned = [c for c in entry["curves"] if [s for s, _ in c] == steps]
            mean = [statistics.mean(c[i][1] for c in aligned) for i in range(len(steps))]
            std = [statistics.stdev(c[i][1] for c in aligned) if len(aligned) > 1 else 0.0 for i in range(len(steps))]
            ax.plot(steps, mean, marker="o", markersize=3, label=method)
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        if task["teacher"] is not None:
            ax.axhline(task["teacher"], color="grey", linestyle="--", linewidth=1, label="teacher")
        ax.set_title(name)
        ax.set_xlabel("student step")
        ax.set_ylabel(f"dev {task['metric'] or ''}")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
