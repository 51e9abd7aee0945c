"""A run's report: ``run_dir/report.md``, ``learning_curve.json`` and PNG plots in ``run_dir/plots/``.

Built from what the loop left behind (``srlm.evaluation.run_data`` reads it, ``srlm.evaluation.plots``
draws it). Whatever is missing or unreadable is skipped with a note in the report; writing a report
never fails because a phase has not run yet.

    python main.py report --run_dir runs/loop
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from srlm.data.records import write_json
from srlm.evaluation.plots import draw, plot_curve, plot_dpo, plot_reward, plot_scores
from srlm.evaluation.run_data import (IFEVAL_KEYS, REWARD_KEYS, counts_of, find_iterations, last, learning_curve,
                                      model_label, model_order, num, read_manifest, read_scores, read_training_log,
                                      series, win_rates)

# Published reward-modelling figures (Llama 2 70B, EFT eval split; Yuan et al. 2024), for scale.
PAPER_REWARD = {
    "SFT": (0.651, 0.101, 0.396, 0.253, 0.233),
    "M1": (0.787, 0.131, 0.415, 0.279, 0.253),
    "M2": (0.804, 0.143, 0.443, 0.331, 0.315),
    "M3": (0.817, 0.143, 0.432, 0.349, 0.324),
}
CURVE_REWARD_KEYS = (("pairwise_accuracy", "judge pairwise acc.", True), ("spearman", "judge Spearman", False),
                     ("kendall_tau", "judge Kendall", False))


# -- formatting ----------------------------------------------------------------------------------
def _fmt(value: Any, percent: bool = False, digits: int = 3) -> str:
    number = num(value)
    if number is None:
        return "–" if value is None else str(value)
    if percent:
        return f"{100 * number:.1f}%"
    return str(int(number)) if float(number).is_integer() and not isinstance(value, float) else f"{number:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _dropped(counts: dict) -> Optional[int]:
    values = [v for k, v in counts.items() if k.startswith("dropped_") and num(v) is not None]
    return int(sum(values)) if values else None


# -- the report ----------------------------------------------------------------------------------
def _iteration_section(run_dir: Path, phases: dict, t: int, plots: Path, notes: list[str], images: list[str]) -> list[str]:
    prompts, candidates = counts_of(phases, f"iter_{t}/prompts"), counts_of(phases, f"iter_{t}/candidates")
    judgements, pairs = counts_of(phases, f"iter_{t}/judgements"), counts_of(phases, f"iter_{t}/pairs")
    train, reward = counts_of(phases, f"iter_{t}/train"), counts_of(phases, f"eval/iter_{t}")
    h2h = win_rates(counts_of(phases, f"h2h/iter_{t}"))
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
    anchor = pairs.get("anchor") if isinstance(pairs.get("anchor"), dict) else None
    if anchor:  # anchored rejection (self_reward.rejected_from)
        rows += [[f"pairs with rejected answers from {anchor.get('rejected_from')}",
                  f"{_fmt(anchor.get('pairs_rejecting_anchor'))} of {_fmt(pairs.get('pairs'))}"],
                 ["anchor's score histogram (judged by this iteration's model)",
                  ", ".join(f"{k}: {v}" for k, v in (anchor.get("histogram") or {}).items()) or "–"]]
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
    if (scores is not None and scores[0]) or any(num(v) for v in histogram.values()):
        name = f"judge_scores_iter_{t}.png"
        if draw(plot_scores, plots / name, notes, t, scores, histogram):
            images.append(name)
            lines += [f"![judge scores, iteration {t}](plots/{name})", ""]
    else:
        lines += [f"_No judge scores for iteration {t}: histogram skipped._", ""]
    if series(dpo_rows, "loss")[0] or series(dpo_rows, "rewards/accuracies")[0]:
        name = f"dpo_iter_{t}.png"
        if draw(plot_dpo, plots / name, notes, t, dpo_rows):
            images.append(name)
            lines += [f"![DPO curves, iteration {t}](plots/{name})", ""]
    else:
        lines += [f"_No DPO metrics.csv for iteration {t}: curves skipped._", ""]
    return lines


def _reward_section(phases: dict, plots: Path, notes: list[str], images: list[str]) -> list[str]:
    evals = sorted(((key.split("/", 1)[1], counts_of(phases, key)) for key in phases if key.startswith("eval/")),
                   key=lambda item: model_order(item[0]))
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
    if draw(plot_reward, plots / "reward_metrics.png", notes, evals):
        images.append("reward_metrics.png")
        lines += ["![reward metrics across models](plots/reward_metrics.png)", ""]
    return lines


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
    if draw(plot_curve, plots / "learning_curve.png", notes, rows):
        images.append("learning_curve.png")
        lines += ["![learning curve](plots/learning_curve.png)", ""]
    return lines


def _h2h_section(phases: dict) -> list[str]:
    lines = ["## Head to head (instruction following, both orders)", ""]
    rows = []
    for key in sorted(k for k in phases if k.startswith("h2h/")):
        counts = counts_of(phases, key)
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
    m1 = counts_of(phases, "m1")
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
