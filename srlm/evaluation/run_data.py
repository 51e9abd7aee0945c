"""What a run folder holds, read into plain rows for the report: all of it optional.

- ``manifest.json``: per-phase counts (``iter_t/prompts``, ``iter_t/candidates``,
  ``iter_t/judgements`` with a score ``histogram``, ``iter_t/pairs``, ``iter_t/train``), reward
  metrics of each model (``eval/m1``, ``eval/iter_t`` = the model iteration t trained, M_{t+1}),
  IFEval (``ifeval/<model>``) and head-to-head results (``h2h/iter_t``: win/tie/loss of M_{t+1});
- ``iter_t/judgements.jsonl``: the judge's ``score`` per candidate (float or null);
- ``iter_t/dpo/lightning_logs/version_*/metrics.csv``: the DPO round's logged loss and rewards.

Readers take a ``notes`` list: whatever is missing or unreadable is skipped with a note there, so a
report never fails because a phase has not run yet.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Optional

from srlm.data.records import read_jsonl

REWARD_KEYS = (  # key, label, shown as percent
    ("pairwise_accuracy", "pairwise acc.", True),
    ("exact_match", "exact match", True),
    ("five_best", "5-best", True),
    ("spearman", "Spearman", False),
    ("kendall_tau", "Kendall tau", False),
)
IFEVAL_KEYS = (  # key, label (fractions, shown as percent)
    ("prompt_level_strict", "IFEval prompt strict"),
    ("inst_level_strict", "IFEval inst. strict"),
    ("prompt_level_loose", "IFEval prompt loose"),
    ("inst_level_loose", "IFEval inst. loose"),
)
_ITER = re.compile(r"^iter_(\d+)(?:/|$)")


def num(value: Any) -> Optional[float]:
    """A finite-or-infinite float from a manifest or CSV cell; None for booleans, blanks, text and NaN."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out else None  # NaN -> None


def counts_of(phases: dict, key: str) -> dict:
    """The ``counts`` of one manifest phase (an empty dict when the phase or its counts are missing)."""
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
    scores = [s for s in (num(r.get("score")) for r in rows) if s is not None]
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
                rows += [{k: num(v) for k, v in row.items() if k} for row in csv.DictReader(f)]
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
    w, t, l = (num(counts.get(k)) for k in ("win", "tie", "loss"))
    if w is None or t is None or l is None:
        return None
    n = num(counts.get("n"))
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


def model_order(name: str) -> tuple:
    """Base, SFT baseline, then M1, M2, ...: the order of the learning curve."""
    if name in ("base", "sft"):
        return (0, ("base", "sft").index(name), "")
    label = model_label(name)
    m = re.fullmatch(r"M(\d+)", label)
    return (1, int(m.group(1)), "") if m else (2, 0, name)


def learning_curve(phases: dict) -> list[dict]:
    """One row per evaluated model, in curve order: ``{name, label, ifeval: {...}, reward: {...}}``."""
    names = {key.split("/")[1] for key in phases if key.startswith(("eval/", "ifeval/"))}
    rows = []
    for name in sorted(names, key=model_order):
        rows.append({"name": name, "label": model_label(name), "ifeval": counts_of(phases, f"ifeval/{name}"),
                     "reward": counts_of(phases, f"eval/{name}")})
    return rows
