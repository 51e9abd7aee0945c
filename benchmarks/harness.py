"""The benchmark harness: sizes, memory sampling, step clocks, result rows, ratios and the printed table.

Nothing here knows a section; ``run.py`` runs the sections (``generation.py``, ``judging.py``,
``sft.py``, ``dpo.py``, ``memory.py``) with it.
"""

from __future__ import annotations

import gc
import math
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

LN2 = math.log(2.0)


@dataclass
class Sizes:
    """What each section runs; ``--quick`` shrinks what is cheap to shrink without changing the shape of the work."""

    gen_prompts: int = 8
    gen_samples: int = 4
    gen_new_tokens: int = 128
    gen_baseline_prompts: int = 8
    """Prompts the sequential baseline runs (each with gen_samples calls); tokens/s is a rate, so a subset is fair."""
    judge_items: int = 32
    """(question, reply) items judged: whole eval groups are taken until at least this many."""
    judge_new_tokens: int = 128
    peer_judge_items: int = 59
    """Items the vLLM peer section judges (whole eval groups), the same in quick runs: a peer's start-up is
    paid once, and fewer items would measure little but it."""
    judge_batch: int = 8
    sft_steps: int = 11
    """Optimizer steps; the first is warm-up and not timed."""
    dpo_steps: int = 8
    """Optimizer steps = one epoch over 2 x dpo_steps pairs, all timed with every reference pass (see section_dpo)."""
    dpo_shortest: bool = False
    """Take the shortest pairs (quick runs) instead of the first ones in file order."""
    dpo_on_the_fly: bool = True
    """Also time srlm with a reference pass every step (what TRL does by default)."""

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(gen_baseline_prompts=1, judge_items=8, sft_steps=3, dpo_steps=2, dpo_shortest=True,
                   dpo_on_the_fly=False)


def rss_mb() -> Optional[float]:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


class PeakRSS:
    """Peak resident memory while a block runs (sampled every 20 ms) and its rise above the start, in MiB."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.start, self.peak = interval, None, None
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_mb())

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.start = self.peak = rss_mb()
        if self.start is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.start is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_mb())

    def to_json(self) -> dict:
        if self.start is None:
            return {"peak_mb": None, "delta_mb": None}
        return {"peak_mb": round(self.peak, 1), "delta_mb": round(self.peak - self.start, 1)}


@dataclass
class Row:
    section: str
    what: str
    baseline: Optional[float] = None
    srlm: Optional[float] = None
    ratio: Optional[float] = None
    target: str = ""
    met: Optional[bool] = None
    note: str = ""


@dataclass
class Result:
    """What one section hands back to the parent."""

    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, *args, **kwargs) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        return row


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def at_least(r: Optional[float], target: float) -> Optional[bool]:
    return None if r is None else r >= target


def say(section: str, message: str) -> None:
    print(f"[{section}] {message}", flush=True)


def have_trl() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def quiet() -> Iterator[None]:
    """Hush library chatter (progress bars, deprecation notes) around a measured block."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def lightning_clock():
    import lightning as L

    class StepClock(L.Callback):
        """End time, loss and token counts of every training step."""

        def __init__(self):
            self.start: Optional[float] = None
            self.ends: list[float] = []
            self.losses: list[float] = []
            self.real: list[int] = []
            self.total: list[int] = []

        def on_train_start(self, trainer, module):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.ends.append(time.perf_counter())
            self.losses.append(float(outputs["loss"]))
            self.real.append(int(batch["attention_mask"].sum()))
            self.total.append(int(batch["input_ids"].numel()))

    return StepClock()


def hf_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.start: Optional[float] = None
            self.ends: list[float] = []
            self.losses: dict[int, float] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])

    return StepClock()


class RecordingCollator:
    """Wraps a collator and keeps each batch's real (attention-mask) and total token counts, in order."""

    def __init__(self, inner: Callable):
        self.inner, self.real, self.total = inner, [], []

    def __call__(self, examples):
        batch = self.inner(examples)
        mask = batch["attention_mask"]
        self.real.append(int(mask.sum()))
        self.total.append(int(mask.numel()))
        return batch


def timed_steps(ends: list[float]) -> float:
    """Seconds from the end of step 1 (warm-up) to the end of the last step."""
    if len(ends) < 2:
        raise RuntimeError(f"only {len(ends)} steps ran: need at least 2 (the first is not timed)")
    return ends[-1] - ends[0]


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.4g}" if abs(value) < 10 else f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def table(rows: list[Row]) -> str:
    header = ["section", "what", "baseline", "srlm", "ratio", "target", "met", "note"]
    body = [[r.section, r.what, fmt(r.baseline), fmt(r.srlm), (fmt(r.ratio) + "x") if r.ratio is not None else "-",
             r.target or "-", fmt(r.met) if r.met is not None else "-", r.note] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    sep = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(b) for b in body])


def version(package: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
