"""A run's report: ``run_dir/report.md`` and PNG plots in ``run_dir/plots/``.

Reads what the loop left behind, all of it optional:

- ``manifest.json``: per-phase counts (``iter_t/prompts``, ``iter_t/candidates``,
  ``iter_t/judgements`` with a score ``histogram``, ``iter_t/pairs``, ``iter_t/train``), reward
  metrics of each model (``eval/m1``, ``eval/iter_t`` = the model iteration t trained, M_{t+1}) and
  head-to-head results (``h2h/iter_t``: win/tie/loss of M_{t+1});
- ``iter_t/judgements.jsonl``: the judge's ``score`` per candidate (float or null);
- ``iter_t/dpo/lightning_logs/version_*/metrics.csv``: the DPO round's logged loss and rewards.

Whatever is missing or unreadable is skipped with a note in the report; writing a report never
fails because a phase has not run yet.

    python main.py report --run_dir runs/loop
"""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path
from typing import Any, Optional

from srlm.data.records import read_jsonl, write_json

REWARD_KEYS = (  # key, label, shown as percent
    ("pairwise_accuracy", "pairwise acc.", True),
    ("exact_match", "exact match", True),
    ("five_best", "5-best", True),
    ("spearman", "Spearman", False),
    ("kendall_tau", "Kendall tau", False),
)
# Published reward-modelling figures (Llama 2 70B, EFT eval split; Yuan et al. 2024), for scale.
PAPER_REWARD = {
    "SFT": (0.651, 0.101, 0.396, 0.253, 0.233),
    "M1": (0.787, 0.131, 0.415, 0.279, 0.253),
    "M2": (0.804, 0.143, 0.443, 0.331, 0.315),
    "M3": (0.817, 0.143, 0.432, 0.349, 0.324),
}
_ITER = re.compile(r"^iter_(\d+)(?:/|$)")


# -- reading -------------------------------------------------------------------------------------
def _num(value: Any) -> Optional[float]:
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out else None  # NaN -> None


def _counts(phases: dict, key: str) -> dict:
    entry = phases.get(key)
    counts = entry.get("counts") if isinstance(entry, dict) else None
    return counts if isinstance(counts, dict) else {}


def read_manifest(run_dir: Path, notes: list[str]) -> dict:
    path = run_dir / "manifest.json"
    if not path.exists():
        notes.append("no manifest.json: phase counts, reward metrics and win rates are unavailable")
        return {}
    try:
        phases = json.loads(path.read_text(encoding="utf-8")).get("phases", {})
    except (OSError, ValueError, AttributeError) as err:
        notes.append(f"manifest.json could not be read ({err})")
        return {}
    return phases if isinstance(phases, dict) else {}


def find_iterations(run_dir: Path, phases: dict) -> list[int]:
    found = {int(m.group(1)) for key in phases for m in [_ITER.match(key.split("/", 1)[-1]), _ITER.match(key)] if m}
    if run_dir.is_dir():
        found |= {int(m.group(1)) for p in run_dir.iterdir() if p.is_dir() and (m := _ITER.match(p.name))}
    return sorted(found)


def read_scores(path: Path, notes: list[str]) -> Optional[tuple[list[float], int]]:
    """``(parsed scores, number unscored)`` from a judgements file, or None when it is missing/unreadable."""
    if not path.exists():
        return None
    try:
        rows = read_jsonl(path)
    except (OSError, ValueError) as err:
        notes.append(f"{path} could not be read ({err})")
        return None
    scores = [s for s in (_num(r.get("score")) for r in rows) if s is not None]
    return scores, len(rows) - len(scores)


def _version(path: Path) -> int:
    m = re.search(r"version_(\d+)", str(path))
    return int(m.group(1)) if m else -1


def read_training_log(log_dir: Path, notes: list[str]) -> list[dict[str, Optional[float]]]:
    """Rows of every ``version_*/metrics.csv`` under ``log_dir`` (oldest version first); empty cells are None."""
    rows: list[dict[str, Optional[float]]] = []
    for path in sorted(log_dir.glob("version_*/metrics.csv"), key=_version):
        try:
            with path.open(newline="", encoding="utf-8") as f:
                rows += [{k: _num(v) for k, v in row.items() if k} for row in csv.DictReader(f)]
        except (OSError, ValueError, csv.Error) as err:
            notes.append(f"{path} could not be read ({err})")
    return rows


def series(rows: list[dict], column: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows where both the step and ``column`` are present."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        value = row.get(column)
        if value is not None:
            step = row.get("step")
            xs.append(step if step is not None else float(i))
            ys.append(value)
    return xs, ys


def last(rows: list[dict], column: str) -> Optional[float]:
    values = series(rows, column)[1]
    return values[-1] if values else None


def win_rates(counts: dict) -> Optional[tuple[float, float, float, Optional[int]]]:
    """(win %, tie %, loss %, n) from ``{win, tie, loss, n}`` given as percentages or as counts out of n."""
    w, t, l = (_num(counts.get(k)) for k in ("win", "tie", "loss"))
    if w is None or t is None or l is None:
        return None
    n = _num(counts.get("n"))
    total = w + t + l
    if n and abs(total - n) < 1e-6 and abs(total - 100.0) > 1e-6:  # counts, not percentages
        w, t, l = (100.0 * v / n for v in (w, t, l))
    return w, t, l, int(n) if n is not None else None


def model_label(name: str) -> str:
    """``base`` -> ``M0 (base)``, ``sft`` -> ``SFT``, ``m1`` -> ``M1``, ``iter_t`` -> ``M{t+1}`` (the model
    iteration t trained), others unchanged."""
    if name in ("base", "sft"):
        return {"base": "M0 (base)", "sft": "SFT"}[name]
    if re.fullmatch(r"m\d+", name):
        return name.upper()
    m = _ITER.match(name)
    return f"M{int(m.group(1)) + 1}" if m and name == m.group(0).rstrip("/") else name


def _model_order(name: str) -> tuple:
    """Base, SFT baseline, then M1, M2, ...: the order of the learning curve."""
    if name in ("base", "sft"):
        return (0, ("base", "sft").index(name), "")
    label = model_label(name)
    m = re.fullmatch(r"M(\d+)", label)
    return (1, int(m.group(1)), "") if m else (2, 0, name)


# -- formatting ----------------------------------------------------------------------------------
def _fmt(value: Any, percent: bool = False, digits: int = 3) -> str:
    number = _num(value)
    if number is None:
        return "–" if value is None else str(value)
    if percent:
        return f"{100 * number:.1f}%"
    return str(int(number)) if float(number).is_integer() and not isinstance(value, float) else f"{number:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _dropped(counts: dict) -> Optional[int]:
    values = [v for k, v in counts.items() if k.startswith("dropped_") and _num(v) is not None]
    return int(sum(values)) if values else None


# -- plots ---------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


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
        heights = [_num(histogram.get(b)) or 0 for b in labels]
        ax.bar([int(b) for b in labels], heights, color="#4c72b0")
        unscored = int(_num(histogram.get("none")) or 0)
        n = int(sum(heights)) + unscored
    ax.set_xlabel("judge score")
    ax.set_ylabel("candidates")
    ax.set_title(f"Iteration {t}: judge scores (n={n}, unscored={unscored})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_reward(path: Path, evals: list[tuple[str, dict]]) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    labels = [model_label(name) for name, _ in evals]
    for key, label, percent in REWARD_KEYS:
        ax = left if percent else right
        ys = [_num(counts.get(key)) for _, counts in evals]
        ys = [float("nan") if y is None else (100 * y if percent else y) for y in ys]
        ax.plot(range(len(labels)), ys, marker="o", label=label)
    for ax, title in ((left, "agreement with humans (%)"), (right, "rank correlation")):
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the report ----------------------------------------------------------------------------------
def _iteration_section(run_dir: Path, phases: dict, t: int, plots: Path, notes: list[str], images: list[str]) -> list[str]:
    prompts, candidates = _counts(phases, f"iter_{t}/prompts"), _counts(phases, f"iter_{t}/candidates")
    judgements, pairs = _counts(phases, f"iter_{t}/judgements"), _counts(phases, f"iter_{t}/pairs")
    train, reward = _counts(phases, f"iter_{t}/train"), _counts(phases, f"eval/iter_{t}")
    h2h = win_rates(_counts(phases, f"h2h/iter_{t}"))
    dpo_rows = read_training_log(run_dir / f"iter_{t}" / "dpo" / "lightning_logs", notes)
    histogram = judgements.get("histogram") if isinstance(judgements.get("histogram"), dict) else {}
    unparsed = judgements.get("unscored", histogram.get("none"))
    rows = [
        ["prompts kept", _fmt(prompts.get("kept"))],
        ["prompts dropped", _fmt(_dropped(prompts))],
        ["prompt requests", _fmt(prompts.get("requests"))],
        ["candidates", _fmt(candidates.get("candidates"))],
        ["empty candidates", _fmt(candidates.get("empty"))],
        ["judge samples unparsed", _fmt(judgements.get("unparsed_samples"))],
        ["candidates unscored", _fmt(unparsed)],
        ["preference pairs", _fmt(pairs.get("pairs", train.get("pairs")))],
        ["pairs dropped (tied scores)", _fmt(pairs.get("dropped_tie"))],
        ["chosen / rejected length (chars, ratio)", "–" if pairs.get("length_ratio") is None else
         f"{_fmt(pairs.get('chosen_chars'))} / {_fmt(pairs.get('rejected_chars'))} ({_fmt(pairs.get('length_ratio'))})"],
        ["pairs where length control chose a shorter answer", _fmt(pairs.get("length_controlled"))],
        ["judge score histogram", ", ".join(f"{k}: {v}" for k, v in histogram.items()) or "–"],
        ["DPO steps", _fmt(train.get("steps"))],
        ["DPO final loss", _fmt(last(dpo_rows, "loss"))],
        ["DPO final reward accuracy (train)", _fmt(last(dpo_rows, "rewards/accuracies"), percent=True)],
        ["DPO final reward accuracy (val)", _fmt(last(dpo_rows, "val/rewards/accuracies"), percent=True)],
        ["DPO final reward margin", _fmt(last(dpo_rows, "rewards/margins"))],
    ]
    meta = pairs.get("meta_judge") if isinstance(pairs.get("meta_judge"), dict) else None
    if meta:  # Meta-Rewarding's judge pairs (self_reward.meta_judge)
        rows += [["meta-judge: candidates with disagreeing judgements", _fmt(meta.get("disagreeing"))],
                 ["meta-judge: comparisons / order flips / ties", f"{_fmt(meta.get('comparisons'))} / {_fmt(meta.get('order_flips'))} / {_fmt(meta.get('ties'))}"],
                 ["meta-judge: no clear best/worst", _fmt(meta.get("no_clear_order"))],
                 ["judge pairs trained (before the share cap)",
                  f"{_fmt(meta.get('judge_pairs'))} ({_fmt(meta.get('judge_pairs_before_cap'))})"]]
    rows += [[f"M{t + 1} {label}", _fmt(reward.get(key), percent)] for key, label, percent in REWARD_KEYS]
    rows.append([f"M{t + 1} head to head: win / tie / loss",
                 "–" if h2h is None else f"{h2h[0]:.1f}% / {h2h[1]:.1f}% / {h2h[2]:.1f}% (n={_fmt(h2h[3])})"])
    lines = [f"## Iteration {t}: M{t} → M{t + 1}", ""] + _table(["", "value"], rows) + [""]

    scores = read_scores(run_dir / f"iter_{t}" / "judgements.jsonl", notes)
    if (scores is not None and scores[0]) or any(_num(v) for v in histogram.values()):
        name = f"judge_scores_iter_{t}.png"
        if _plot(plot_scores, plots / name, notes, t, scores, histogram):
            images.append(name)
            lines += [f"![judge scores, iteration {t}](plots/{name})", ""]
    else:
        lines += [f"_No judge scores for iteration {t}: histogram skipped._", ""]
    if series(dpo_rows, "loss")[0] or series(dpo_rows, "rewards/accuracies")[0]:
        name = f"dpo_iter_{t}.png"
        if _plot(plot_dpo, plots / name, notes, t, dpo_rows):
            images.append(name)
            lines += [f"![DPO curves, iteration {t}](plots/{name})", ""]
    else:
        lines += [f"_No DPO metrics.csv for iteration {t}: curves skipped._", ""]
    return lines


def _plot(fn, path: Path, notes: list[str], *args) -> bool:
    """Draw one plot; a failure (bad data, no matplotlib) becomes a note, not a crashed report."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fn(path, *args)
        return True
    except Exception as err:  # noqa: BLE001 - a report must survive any one broken plot
        notes.append(f"plot {path.name} skipped: {type(err).__name__}: {err}")
        return False


def _reward_section(phases: dict, plots: Path, notes: list[str], images: list[str]) -> list[str]:
    evals = sorted(((key.split("/", 1)[1], _counts(phases, key)) for key in phases if key.startswith("eval/")),
                   key=lambda item: _model_order(item[0]))
    evals = [(name, counts) for name, counts in evals if counts]
    lines = ["## Reward modelling (judge agreement with human rankings)", ""]
    if not evals:
        return lines + ["_No reward-modelling evaluation in the manifest (eval/...): section skipped._", ""]
    header = ["model"] + [label for _, label, _ in REWARD_KEYS] + ["prompts", "pairs", "unparsed"]
    rows = [[model_label(name)] + [_fmt(c.get(k), p) for k, _, p in REWARD_KEYS]
            + [_fmt(c.get("n_prompts")), _fmt(c.get("n_pairs")), _fmt(c.get("n_unparsed"))] for name, c in evals]
    lines += _table(header, rows) + [""]
    lines += ["Published (Llama 2 70B, EFT eval split), for scale:", ""]
    lines += _table(["model"] + [label for _, label, _ in REWARD_KEYS],
                    [[m] + [_fmt(v, p) for v, (_, _, p) in zip(vals, REWARD_KEYS)] for m, vals in PAPER_REWARD.items()])
    lines.append("")
    if _plot(plot_reward, plots / "reward_metrics.png", notes, evals):
        images.append("reward_metrics.png")
        lines += ["![reward metrics across models](plots/reward_metrics.png)", ""]
    return lines


IFEVAL_KEYS = (  # key, label (fractions, shown as percent)
    ("prompt_level_strict", "IFEval prompt strict"),
    ("inst_level_strict", "IFEval inst. strict"),
    ("prompt_level_loose", "IFEval prompt loose"),
    ("inst_level_loose", "IFEval inst. loose"),
)
CURVE_REWARD_KEYS = (("pairwise_accuracy", "judge pairwise acc.", True), ("spearman", "judge Spearman", False),
                     ("kendall_tau", "judge Kendall", False))


def learning_curve(phases: dict) -> list[dict]:
    """One row per evaluated model, in curve order: ``{name, label, ifeval: {...}, reward: {...}}``."""
    names = {key.split("/")[1] for key in phases if key.startswith(("eval/", "ifeval/"))}
    rows = []
    for name in sorted(names, key=_model_order):
        rows.append({"name": name, "label": model_label(name), "ifeval": _counts(phases, f"ifeval/{name}"),
                     "reward": _counts(phases, f"eval/{name}")})
    return rows


def plot_curve(path: Path, rows: list[dict]) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    labels = [r["label"] for r in rows]
    xs = range(len(labels))
    for key, label in IFEVAL_KEYS:
        ys = [_num(r["ifeval"].get(key)) for r in rows]
        left.plot(xs, [float("nan") if y is None else 100 * y for y in ys], marker="o", label=label[7:])
    ys = [_num(r["reward"].get("pairwise_accuracy")) for r in rows]
    right.plot(xs, [float("nan") if y is None else 100 * y for y in ys], marker="o", label="pairwise accuracy")
    right.axhline(50, color="grey", lw=0.8, ls="--", label="chance")
    for ax, title in ((left, "IFEval accuracy (%), checked by code"),
                      (right, "judge agreement with human rankings (%)")):
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curve_section(root: Path, phases: dict, plots: Path, notes: list[str], images: list[str]) -> list[str]:
    rows = learning_curve(phases)
    lines = ["## Learning curve", ""]
    if not rows:
        return lines + ["_No model evaluated yet (eval/..., ifeval/...): section skipped._", ""]
    header = ["model"] + [label for _, label in IFEVAL_KEYS] + [label for _, label, _ in CURVE_REWARD_KEYS]
    table = [[r["label"]] + [_fmt(r["ifeval"].get(k), True) for k, _ in IFEVAL_KEYS]
             + [_fmt(r["reward"].get(k), p) for k, _, p in CURVE_REWARD_KEYS] for r in rows]
    lines += _table(header, table) + [""]
    first = next((r["ifeval"] for r in rows if r["ifeval"]), {})
    if first:
        lines += [f"IFEval: {_fmt(first.get('n_prompts'))} prompts, greedy, at most "
                  f"{_fmt(first.get('max_new_tokens'))} new tokens, scored by IFEval's checkers. Judge: "
                  f"{_fmt(next((r['reward'].get('n_pairs') for r in rows if r['reward']), None))} human-ranked "
                  "reply pairs of held-out prompts.", ""]
    try:
        write_json(root / "learning_curve.json", rows)
    except OSError as err:
        notes.append(f"learning_curve.json not written: {err}")
    if _plot(plot_curve, plots / "learning_curve.png", notes, rows):
        images.append("learning_curve.png")
        lines += ["![learning curve](plots/learning_curve.png)", ""]
    return lines


def _h2h_section(phases: dict) -> list[str]:
    lines = ["## Head to head (instruction following, both orders)", ""]
    rows = []
    for key in sorted(k for k in phases if k.startswith("h2h/")):
        counts = _counts(phases, key)
        rates = win_rates(counts)
        if rates is None:
            continue
        name = key.split("/")[1]
        against = counts.get("against")
        who = f"{model_label(name)} vs {against}" if against else model_label(name)
        rows.append([who, f"{rates[0]:.1f}%", f"{rates[1]:.1f}%", f"{rates[2]:.1f}%", _fmt(rates[3])])
    if not rows:
        return lines + ["_No head-to-head results in the manifest (h2h/...): section skipped._", ""]
    return lines + _table(["model (left)", "win", "tie", "loss", "prompts"], rows) + [""]


def write_report(run_dir: str) -> Path:
    """Write ``run_dir/report.md`` and ``run_dir/plots/*.png`` from whatever the run has produced so far.

    Args:
        run_dir: the run folder (holding manifest.json and iter_t/ folders).

    Returns:
        The path of report.md.
    """
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    plots = root / "plots"
    notes: list[str] = []
    images: list[str] = []
    phases = read_manifest(root, notes)
    lines = [f"# Self-rewarding run: {root.name}", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} from `{root}`.", ""]
    m1 = _counts(phases, "m1")
    if m1:
        lines += ["## M1 (SFT on IFT + EFT)", ""] + _table(["", "value"], [[k, _fmt(v)] for k, v in m1.items()
                                                                         if not isinstance(v, (dict, list))]) + [""]
    lines += _curve_section(root, phases, plots, notes, images)
    iterations = find_iterations(root, phases)
    if not iterations:
        lines += ["_No self-rewarding iteration yet._", ""]
    for t in iterations:
        lines += _iteration_section(root, phases, t, plots, notes, images)
    lines += _reward_section(phases, plots, notes, images)
    lines += _h2h_section(phases)
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    out = root / "report.md"
    tmp = out.with_name(".report.md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(out)  # atomic: a reader never sees half a report
    print(f"wrote {out} and {len(images)} plot(s) in {plots}")
    return out
