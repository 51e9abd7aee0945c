"""Typed records and their jsonl files.

Every data file srlm reads or writes is JSON Lines: one object per line. The record kinds:

- ``SFTExample`` ``{"prompt", "response"}``: an instruction-following (IFT) example, or an
  evaluation (EFT) example whose prompt is a filled judge prompt and whose response is a
  justification ending in ``Score: N``.
- ``JudgeExample`` ``{"question", "answer", "judgement"}``: an EFT example before the judge
  template is applied; ``judgement`` is the justification ending in ``Score: N``. Kept unfilled so
  that a different judge template can be used without rewriting the data.
- ``RankedPrompt`` ``{"id", "prompt", "replies": [{"text", "rank"}]}``: a question with several
  human-ranked replies (rank 0 = best); the reward-modelling eval set.
- ``PreferencePair`` ``{"prompt", "chosen", "rejected", ...}``: a DPO example; other fields kept.

Reading validates every line and raises ``RecordError`` naming the file, line and field. Writing
a whole file is atomic (temp file + rename); streams are appended and flushed line by line. Paths
may start with ``seed:`` to name a file shipped in ``srlm/data/seed`` (``resolve_path``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence


class RecordError(ValueError):
    """A data file has a line that is not a valid record."""

    def __init__(self, path: str | os.PathLike, line: int, field: str | None, message: str):
        self.path, self.line, self.field = str(path), line, field
        where = f"{path}:{line}" + (f": field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")


@dataclasses.dataclass
class SFTExample:
    prompt: str
    response: str
    id: str | None = None


@dataclasses.dataclass
class JudgeExample:
    question: str
    answer: str
    judgement: str
    id: str | None = None


@dataclasses.dataclass
class Reply:
    text: str
    rank: int


@dataclasses.dataclass
class RankedPrompt:
    id: str
    prompt: str
    replies: list[Reply]


@dataclasses.dataclass
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    id: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        if self.id is not None:
            out["id"] = self.id
        out.update(self.extra)
        return out


def _text(obj: dict, key: str, path, line: int, *, optional: bool = False) -> str | None:
    if key not in obj or obj[key] is None:
        if optional:
            return None
        raise RecordError(path, line, key, "missing required field")
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(path, line, key, f"expected a string, got {type(value).__name__}")
    if not optional and not value.strip():
        raise RecordError(path, line, key, "empty")
    return value


def _id(obj: dict, path, line: int) -> str | None:
    value = obj.get("id")
    if value is None:
        return None
    if not isinstance(value, (str, int)):
        raise RecordError(path, line, "id", f"expected a string or integer, got {type(value).__name__}")
    return str(value)


def parse_sft(obj: dict, path, line: int) -> SFTExample:
    return SFTExample(_text(obj, "prompt", path, line), _text(obj, "response", path, line), _id(obj, path, line))


def parse_judge(obj: dict, path, line: int) -> JudgeExample:
    return JudgeExample(
        _text(obj, "question", path, line),
        _text(obj, "answer", path, line),
        _text(obj, "judgement", path, line),
        _id(obj, path, line),
    )


def parse_ranked(obj: dict, path, line: int) -> RankedPrompt:
    rid = _id(obj, path, line)
    if rid is None:
        raise RecordError(path, line, "id", "missing required field")
    prompt = _text(obj, "prompt", path, line)
    replies = obj.get("replies")
    if not isinstance(replies, list) or len(replies) < 2:
        raise RecordError(path, line, "replies", "expected a list of at least 2 replies")
    out = []
    for i, reply in enumerate(replies):
        if not isinstance(reply, dict):
            raise RecordError(path, line, f"replies[{i}]", "expected an object")
        text = _text(reply, "text", path, line)
        rank = reply.get("rank")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise RecordError(path, line, f"replies[{i}].rank", "expected a non-negative integer")
        out.append(Reply(text, rank))
    return RankedPrompt(rid, prompt, out)


def parse_preference(obj: dict, path, line: int) -> PreferencePair:
    prompt = _text(obj, "prompt", path, line)
    chosen = _text(obj, "chosen", path, line)
    rejected = _text(obj, "rejected", path, line)
    if chosen == rejected:
        raise RecordError(path, line, "rejected", "identical to 'chosen': a pair needs two different responses")
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "chosen", "rejected", "id")}
    return PreferencePair(prompt, chosen, rejected, _id(obj, path, line), extra)


SEED_DIR = Path(__file__).parent / "seed"


def resolve_path(path: str | Path) -> Path:
    """``seed:name`` -> the file shipped in ``srlm/data/seed``; any other path as given (``~`` expanded)."""
    text = str(path)
    if text.startswith("seed:"):
        return SEED_DIR / text[len("seed:"):]
    return Path(text).expanduser()


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line; malformed JSON is a RecordError.

    A last line without its newline (a write cut short by a kill) is skipped, not an error:
    streams are resumed from the complete lines.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("r", encoding="utf-8") as f:
        lines = f.read().split("\n")
    partial_tail = len(lines) > 0 and lines[-1] != ""
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            if partial_tail and number == len(lines):
                return  # torn final write; the stream resumes from here
            raise RecordError(path, number, None, f"malformed JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(obj, dict):
            raise RecordError(path, number, None, f"expected a JSON object, got {type(obj).__name__}")
        yield number, obj




def read_records(path: str | os.PathLike, parse) -> list:
    """Read every line of ``path`` with a ``parse_*`` function; errors name file, line and field."""
    return [parse(obj, path, number) for number, obj in iter_jsonl(path)]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [obj for _, obj in iter_jsonl(path)]


def _plain(record: Any) -> dict:
    if hasattr(record, "to_json"):
        return record.to_json()
    if dataclasses.is_dataclass(record):
        return {k: v for k, v in dataclasses.asdict(record).items() if v is not None}
    return record


@contextlib.contextmanager
def _atomic(path: str | os.PathLike):
    """A text file opened for writing that replaces ``path`` only when the block ends cleanly (temp file in the
    same folder, fsync, rename); on any error the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> int:
    """Write a whole file atomically: a temp file in the same folder, fsync, then rename."""
    count = 0
    with _atomic(path) as f:
        for record in records:
            f.write(json.dumps(_plain(record), ensure_ascii=False) + "\n")
            count += 1
    return count


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write one JSON document atomically."""
    with _atomic(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


class JsonlAppender:
    """Append records to a stream, one flushed line each, so that a kill loses at most a torn line.

    On open, a torn last line (no trailing newline) left by an earlier kill is cut off, so the
    file again holds only complete records.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                with self.path.open("r+b") as f:
                    f.truncate(cut)
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, record: Any) -> None:
        self._f.write(json.dumps(_plain(record), ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def write_many(self, records: Sequence[Any]) -> None:
        for record in records:
            self._f.write(json.dumps(_plain(record), ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
