"""The report's figures, drawn with matplotlib (Agg: files only) into ``run_dir/plots/*.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from srlm.evaluation.run_data import IFEVAL_KEYS, REWARD_KEYS, model_label, num, series


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _finish_axes(axes_titles, xs, labels, **tick_kwargs) -> None:
    """Model names under the ticks, a title, a legend and a light grid on each of two line plots."""
    for ax, title in axes_titles:
        ax.set_xticks(xs, labels, **tick_kwargs)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)


def plot_scores(path: Path, t: int, scores: Optional[tuple[list[float], int]], histogram: dict) -> bool:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if scores is not None and scores[0]:
        values, unscored = scores
        integral = all(float(v).is_integer() for v in values)
        bins = [b - 0.5 for b in range(7)] if integral else [i * 0.25 for i in range(21)]
        ax.hist(values, bins=bins, color="#4c72b0", edgecolor="white")
        n = len(values) + unscored
    else:
        labels = [str(b) for b in range(6)]
        heights = [num(histogram.get(b)) or 0 for b in labels]
        ax.bar([int(b) for b in labels], heights, color="#4c72b0")
        unscored = int(num(histogram.get("none")) or 0)
        n = int(sum(heights)) + unscored
    ax.set_xlabel("judge score")
    ax.set_ylabel("candidates")
    ax.set_title(f"Iteration {t}: judge scores (n={n}, unscored={unscored})", fontsize=10)
    _save(plt, fig, path)
    return True


def plot_reward(path: Path, evals: list[tuple[str, dict]]) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    labels = [model_label(name) for name, _ in evals]
    for key, label, percent in REWARD_KEYS:
        ax = left if percent else right
        ys = [num(counts.get(key)) for _, counts in evals]
        ys = [float("nan") if y is None else (100 * y if percent else y) for y in ys]
        ax.plot(range(len(labels)), ys, marker="o", label=label)
    _finish_axes(((left, "agreement with humans (%)"), (right, "rank correlation")), range(len(labels)), labels)
    _save(plt, fig, path)


def plot_dpo(path: Path, t: int, rows: list[dict]) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, columns, title in ((left, ("loss", "val/loss"), "DPO loss"),
                               (right, ("rewards/accuracies", "val/rewards/accuracies"), "reward accuracy")):
        for column in columns:
            xs, ys = series(rows, column)
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=column)
        ax.set_xlabel("step")
        ax.set_title(f"Iteration {t}: {title}", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_curve(path: Path, rows: list[dict]) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    labels = [r["label"] for r in rows]
    xs = range(len(labels))
    for key, label in IFEVAL_KEYS:
        ys = [num(r["ifeval"].get(key)) for r in rows]
        left.plot(xs, [float("nan") if y is None else 100 * y for y in ys], marker="o", label=label[7:])
    ys = [num(r["reward"].get("pairwise_accuracy")) for r in rows]
    right.plot(xs, [float("nan") if y is None else 100 * y for y in ys], marker="o", label="pairwise accuracy")
    right.axhline(50, color="grey", lw=0.8, ls="--", label="chance")
    _finish_axes(((left, "IFEval accuracy (%), checked by code"), (right, "judge agreement with human rankings (%)")),
                 list(xs), labels, fontsize=8)
    _save(plt, fig, path)


def draw(fn, path: Path, notes: list[str], *args) -> bool:
    """Draw one plot; a failure (bad data, no matplotlib) becomes a note, not a crashed report."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fn(path, *args)
        return True
    except Exception as err:  # noqa: BLE001 - a report must survive any one broken plot
        notes.append(f"plot {path.name} skipped: {type(err).__name__}: {err}")
        return False
