"""The short table printed at the end of `matekd train`."""

from __future__ import annotations

from typing import Any

from matekd_ds import deployment, distributed


def _main(dev: dict[str, dict[str, float]]) -> str:
    return " / ".join(f"{m['main']:.4f}" for m in dev.values())


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def summary_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = [("model", "params", f"dev {metrics['metric']}", "train throughput")]
    teacher = metrics.get("teacher")
    if teacher is not None:
        tf = metrics.get("teacher_finetune")
        teacher_speed = f"{tf['steps']} ft steps in {tf['train_seconds']:.0f}s" if tf else "(given)"
        rows.append(("teacher", _millions(teacher["params"]), _main(teacher["dev"]), teacher_speed))
    best = metrics["best"]
    student_metric = f"{_main(metrics['final'])} (best {_main(best['dev'])} @ step {best['step']})"
    t = metrics["throughput"]
    speed = f"{t['samples_per_s']:.0f} samples/s, {t['tokens_per_s']:.0f} tokens/s"
    rows.append((f"student ({method_label(metrics)})", _millions(metrics["student"]["params"]), student_metric, speed))
    return rows


def method_label(metrics: dict[str, Any]) -> str:
    """The method as the table names it: "matekd, random tokens" for the random-token arm."""
    random = metrics.get("perturbation") == "random"
    return f"{metrics['method']}, random tokens" if random else metrics["method"]


def adversary_line(metrics: dict[str, Any]) -> str | None:
    """matekd.adversary_probe: the last generator phase's divergences and weight change."""
    records = metrics.get("adversary")
    if not records:
        return None
    last = records[-1]
    return (f"adversary after step {last['step']} ({len(records)} generator phases): divergence on its samples "
            f"{last['div_trained']:.4g} vs {last['div_warm']:.4g} on the warm generator's; weight change "
            f"{last['weight_change']:.3g} (largest tensor {last['weight_change_max']:.3g})")


def print_summary(metrics: dict[str, Any], run_dir: str) -> None:
    if not distributed.is_main():
        return
    rows = summary_rows(metrics)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]

    def line(r):
        return "  ".join(c.ljust(w) for c, w in zip(r, widths))

    print()
    print(line(rows[0]))
    print("  ".join("-" * w for w in widths))
    for row in rows[1:]:
        print(line(row))
    if adversary_line(metrics):
        print(adversary_line(metrics))
    if metrics.get("deployment"):  # what the student is for: size, CPU latency, accuracy kept
        print()
        print("\n".join(deployment.format_lines(metrics["deployment"])))
    print(f"\nrun directory: {run_dir}  (student/, metrics.json, logs/; {metrics['wall_seconds']:.0f}s wall)")
