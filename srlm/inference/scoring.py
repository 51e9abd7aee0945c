"""Reading the judge's score out of its own output.

The judge is asked to end with ``Score: <points>``. ``parse_score`` must only ever see the text
the judge generated: the rubric it was shown also contains ``Score: <points>``, and parsing the
echoed prompt is a known replication bug. Callers pass generated text only.

Accepted forms (case-insensitive, markdown emphasis allowed around label and number):
``Score: 4``, ``score: 4/5``, ``Score: 4.5``, ``**Score:** 4``, ``Score - 3``, ``Score = 4``,
``Score is 4``, ``Score: 4 points``, ``Final score: 3``, ``Score: 4 out of 5``. ``score`` counts
as a label after ``:`` or ``=``; after ``is`` or a dash only when a number follows (so prose like
"the score is based on..." is not a label).

Rules:
- When ``score`` appears several times as a label, the LAST label decides; if that last label is
  not followed by a number (e.g. an echoed ``Score: <points>``) the result is None rather than
  falling back to an earlier one, since the judge's final word is then not a score.
- A denominator (``4/5``, ``4 out of 5``) must equal ``max_score``; other scales (``8/10``) are
  NOT rescaled but rejected (None): the rubric fixes the scale, so another scale means the judge
  did not follow it.
- A range (``3-4``) is ambiguous: None.
- Values outside ``[0, max_score]`` give None.
"""

from __future__ import annotations

import math
import re
from typing import Optional

_NUM = r"\d+(?:\.\d+)?"
# "score" used as a label: ':' or '=' always; "is" or a dash only when a number follows, so that
# prose such as "the score is based on..." or "score-based" after the real score is not a label.
SCORE_LABEL = re.compile(
    r"\bscore\b[*_]*(?:\s*[:=]|\s*(?:\bis\b|[-\u2013\u2014])(?=[*_\s]*\d))[*_\s]*", re.IGNORECASE
)
_VALUE = re.compile(
    rf"(?P<num>{_NUM})[*_]*"
    rf"(?:\s*(?:/|\bout\s+of\b)\s*(?P<den>{_NUM})|(?P<range>\s*(?:-|\u2013|\bto\b)\s*\d))?",
    re.IGNORECASE,
)


def parse_score(judge_output: str, *, max_score: int = 5) -> Optional[float]:
    """The score in the judge's own output, or None when absent, malformed or out of range."""
    labels = list(SCORE_LABEL.finditer(judge_output or ""))
    if not labels:
        return None
    m = _VALUE.match(judge_output, labels[-1].end())
    if m is None or m.group("range"):
        return None
    value = float(m.group("num"))
    if m.group("den") is not None and float(m.group("den")) != max_score:
        return None  # another scale: not rescaled, see the module docstring
    if not 0 <= value <= max_score:
        return None
    return value


def before_score(judge_output: str) -> str:
    """The judge's text before the first score label it wrote (all of it when it wrote none)."""
    first = SCORE_LABEL.search(judge_output or "")
    return (judge_output or "")[:first.start()] if first else (judge_output or "")


def score_bin(score: float) -> int:
    """Integer bin of a (possibly averaged) score, rounding half up: 3.5 -> 4, 3.49 -> 3."""
    return int(math.floor(score + 0.5))
