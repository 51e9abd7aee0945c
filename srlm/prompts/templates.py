"""Prompt templates kept as text files, with ``{name}`` placeholders.

A config names a template either by a bundled name (``judge_additive``, ``self_instruct``) or by
a path to any text file, so that the judge wording (which the paper found matters a great deal)
can be swapped without touching code. Placeholders are replaced literally, so braces elsewhere in
the template or in the filled-in text are safe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

BUNDLED = Path(__file__).parent
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
JUDGE_TEMPLATE = "judge_additive"
"""The judge prompt every judging command and the loop use unless told otherwise (the paper's additive rubric)."""


@dataclass(frozen=True)
class PromptTemplate:
    text: str
    source: str

    @property
    def fields(self) -> set[str]:
        return set(_PLACEHOLDER.findall(self.text))

    def require(self, *names: str) -> "PromptTemplate":
        missing = [n for n in names if n not in self.fields]
        if missing:
            raise ValueError(f"{self.source}: template lacks placeholder(s) {', '.join('{' + n + '}' for n in missing)}")
        return self

    def fill(self, **values: str) -> str:
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), self.text)


def load_template(name_or_path: str, *required: str) -> PromptTemplate:
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = BUNDLED / f"{name_or_path}.txt"
    if not path.exists():
        bundled = ", ".join(sorted(p.stem for p in BUNDLED.glob("*.txt")))
        raise FileNotFoundError(f"prompt template '{name_or_path}' not found (a file path, or one of: {bundled})")
    return PromptTemplate(path.read_text(encoding="utf-8").rstrip("\n"), str(path)).require(*required)
