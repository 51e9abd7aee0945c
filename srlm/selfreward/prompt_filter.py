"""Post-processing of self-instruction prompt generation: extract, filter, deduplicate.

The model continues the few-shot template (``srlm/prompts/self_instruct.txt``), a numbered list of
tasks, after the cue ``Task <k+1>:`` that follows the k examples shown (``steps.next_task_cue``).
``extract_new_prompt`` keeps the task it wrote (without a label or numbering it may repeat) and
drops what follows; ``PromptFilter.check`` then decides whether to keep it and says why not:

- ``empty``: nothing left after extraction.
- ``too_short`` / ``too_long``: fewer than ``min_chars`` / more than ``max_chars`` characters.
- ``not_a_task``: under half of the non-space characters are letters, or the text carries
  judge/template residue (``score:``, ``<question>``, ``<response>``, ``{examples}``, ...).
- ``echo``: a copy of one of the few-shot examples shown in *that* request: near-duplicate, or
  one normalised text containing the other (truncated or padded copy). Harvesting the shown
  examples as "new" prompts is a known replication bug.
- ``seed_duplicate``: near-duplicate of any seed prompt.
- ``duplicate``: near-duplicate of a prompt kept earlier.

Near-duplicate: equal after ``normalise_prompt``, or Jaccard similarity >= ``near_dup_threshold``
of word 3-gram sets; when either text has fewer than ``SHORT_TEXT_WORDS`` words (too few 3-grams
to be meaningful) the word sets are compared instead. Inverted indexes (3-gram -> prompts, and
word -> prompts for the few small ones) keep a check proportional to the prompts that share
something with it, so tens of thousands of prompts are fine.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

SHORT_TEXT_WORDS = 6
"""Texts with fewer words are compared as word sets rather than word 3-gram sets."""

REASONS = ("empty", "too_short", "too_long", "not_a_task", "echo", "seed_duplicate", "duplicate")

# Labels the model may put before its task: "New task:", "Task 3:", "**Prompt** -", "Example:".
_LABEL = re.compile(
    r"^\s*(?:[*_#>]+\s*)?(?:(?:new|next|another|my)\s+)?(?:task|prompt|instruction|question|example)"
    r"(?:\s*#?\d+)?\s*[*_]*\s*[:\-\u2013]\s*[*_]*\s*",
    re.IGNORECASE,
)
_NUMBERING = re.compile(r"^\s*(?:\(?\d{1,3}[.)]|[-*\u2022])\s+")
# A line that starts another block: the next example, or an answer the model went on to write.
_HEADER = re.compile(
    r"^\s*(?:[*_#>]+\s*)?(?:(?:new|next|another)\s+)?"
    r"(?:task|example|prompt|instruction|answer|response|output|solution|assistant|user)"
    r"(?:\s*#?\d+)?\s*[*_]*\s*[:\-\u2013]",
    re.IGNORECASE,
)
_QUOTES = {'"': '"', "\u201c": "\u201d", "'": "'", "\u00ab": "\u00bb", "`": "`"}
_RESIDUE = ("score:", "<question>", "</question>", "<response>", "</response>", "{examples}", "{question}",
            "{response}")


def _strip_quotes(text: str) -> str:
    if text and text[0] in _QUOTES:
        close = _QUOTES[text[0]]
        if len(text) > 1 and text.endswith(close):
            return text[1:-1].strip()
        if close not in text[1:]:  # an opening quote never closed: cut-off generation
            return text[1:].strip()
    return text


def extract_new_prompt(generated: str) -> Optional[str]:
    """The task in the model's reply: labels, numbering and wrapping quotes removed, first block only."""
    text = (generated or "").strip()
    for _ in range(4):  # "1. New task: "..." " peels in a few rounds
        before = text
        text = _NUMBERING.sub("", _LABEL.sub("", text, count=1), count=1)
        text = _strip_quotes(text.strip())
        if text == before:
            break
    lines: list[str] = []
    for line in text.splitlines():
        if not line.strip() or (lines and _HEADER.match(line)):
            if lines:
                break
            continue
        lines.append(line.rstrip())
    text = _strip_quotes("\n".join(lines).strip())
    return text or None


def normalise_prompt(text: str) -> str:
    """Lowercase, punctuation removed (apostrophes dropped, other symbols made spaces), whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    text = re.sub(r"['\u2019`]", "", text)
    text = re.sub(r"[\W_]+", " ", text)
    return " ".join(text.split())


@dataclass(frozen=True)
class _Shingled:
    norm: str
    words: tuple[str, ...]
    wset: frozenset
    tris: frozenset

    @property
    def short(self) -> bool:
        return len(self.words) < SHORT_TEXT_WORDS


def _shingle(text: str) -> _Shingled:
    norm = normalise_prompt(text)
    words = tuple(norm.split())
    tris = frozenset(zip(words, words[1:], words[2:])) if len(words) >= SHORT_TEXT_WORDS else frozenset()
    return _Shingled(norm, words, frozenset(words), tris)


def _jaccard(a: frozenset, b: frozenset) -> float:
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter) if inter else 0.0


def similarity(a: str | _Shingled, b: str | _Shingled) -> float:
    """Near-duplicate similarity in [0, 1] (see the module docstring)."""
    a = a if isinstance(a, _Shingled) else _shingle(a)
    b = b if isinstance(b, _Shingled) else _shingle(b)
    if a.norm == b.norm:
        return 1.0 if a.norm else 0.0
    if a.short or b.short:
        return _jaccard(a.wset, b.wset)
    return _jaccard(a.tris, b.tris)


class _NearDupIndex:
    """Texts indexed so that ``find`` compares a new text only with those sharing a 3-gram or word."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.items: list[_Shingled] = []
        self.exact: dict[str, int] = {}
        self.by_tri: dict[tuple, list[int]] = defaultdict(list)
        self.by_word: dict[str, list[int]] = defaultdict(list)
        # A short text has < SHORT_TEXT_WORDS distinct words, so by |A|/|B| >= Jaccard its word-set
        # matches have at most this many distinct words: only those need a word index.
        self.word_cap = math.floor((SHORT_TEXT_WORDS - 1) / threshold)

    def add(self, sh: _Shingled) -> None:
        if not sh.norm:
            return
        i = len(self.items)
        self.items.append(sh)
        self.exact.setdefault(sh.norm, i)
        for t in sh.tris:
            self.by_tri[t].append(i)
        if len(sh.wset) <= self.word_cap:
            for w in sh.wset:
                self.by_word[w].append(i)

    def find(self, sh: _Shingled) -> Optional[int]:
        """Index of a stored near-duplicate of ``sh``, or None."""
        if not sh.norm:
            return None
        if sh.norm in self.exact:
            return self.exact[sh.norm]
        if not sh.short:
            shared = Counter(i for t in sh.tris for i in self.by_tri.get(t, ()))
            for i, inter in shared.items():
                if inter / (len(sh.tris) + len(self.items[i].tris) - inter) >= self.threshold:
                    return i
        if len(sh.wset) <= self.word_cap:  # word-set comparisons: one side short
            for i in {i for w in sh.wset for i in self.by_word.get(w, ())}:
                other = self.items[i]
                if (sh.short or other.short) and _jaccard(sh.wset, other.wset) >= self.threshold:
                    return i
        return None


def _not_a_task(text: str) -> bool:
    chars = [c for c in text if not c.isspace()]
    if sum(c.isalpha() for c in chars) < 0.5 * len(chars):
        return True
    low = text.lower()
    if text.rstrip().endswith(":"):
        return True  # a lead-in ("The answer to the new task is:"), not a task
    return any(marker in low for marker in _RESIDUE)


def _contains(outer: str, inner: str) -> bool:
    """``inner`` occurs in ``outer`` on word boundaries and is at least three words long."""
    return inner.count(" ") >= 2 and f" {inner} " in f" {outer} "


class PromptFilter:
    """Keeps new prompts that are well-formed tasks and new; ``counts`` tallies every decision."""

    def __init__(self, seed_prompts: Iterable[str], min_chars: int = 10, max_chars: int = 600,
                 near_dup_threshold: float = 0.7):
        if not 0 < near_dup_threshold <= 1:
            raise ValueError(f"near_dup_threshold must be in (0, 1], got {near_dup_threshold}")
        self.min_chars, self.max_chars, self.threshold = min_chars, max_chars, near_dup_threshold
        self.seeds = _NearDupIndex(near_dup_threshold)
        for s in seed_prompts:
            self.seeds.add(_shingle(s))
        self.kept = _NearDupIndex(near_dup_threshold)
        self.counts: dict[str, int] = {"kept": 0, **{r: 0 for r in REASONS}}

    def reason(self, prompt: Optional[str], few_shot_examples: Sequence[str] = ()) -> Optional[str]:
        """Why ``prompt`` would be dropped, or None if it would be kept. Changes nothing."""
        text = (prompt or "").strip()
        if not text:
            return "empty"
        if len(text) < self.min_chars:
            return "too_short"
        if len(text) > self.max_chars:
            return "too_long"
        if _not_a_task(text):
            return "not_a_task"
        sh = _shingle(text)
        for example in few_shot_examples:
            ex = _shingle(example)
            if similarity(sh, ex) >= self.threshold or _contains(ex.norm, sh.norm) or _contains(sh.norm, ex.norm):
                return "echo"
        if self.seeds.find(sh) is not None:
            return "seed_duplicate"
        if self.kept.find(sh) is not None:
            return "duplicate"
        return None

    def check(self, prompt: Optional[str], few_shot_examples: Sequence[str] = ()) -> Optional[str]:
        """Drop reason or None; a kept prompt is remembered, so a later near-copy is a ``duplicate``."""
        why = self.reason(prompt, few_shot_examples)
        self.counts[why or "kept"] += 1
        if why is None:
            self.remember(prompt)
        return why

    def remember(self, prompt: str) -> None:
        """Mark a prompt as already kept without counting a decision (e.g. prompts from a resumed run)."""
        self.kept.add(_shingle(prompt.strip()))

    def __len__(self) -> int:
        return len(self.kept.items)
