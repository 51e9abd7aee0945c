"""IFEval's instruction checkers, its prompt files and its four accuracies (Zhou et al. 2023).

Google's instruction checkers (the PyPI package ``if-verifiable``, which ships them) decide whether
a response follows each verifiable instruction of an IFEval prompt:

- strict: the checker on the response as written;
- loose: the instruction counts as followed if the checker accepts any of IFEval's standard
  variants of the response: as written, first line removed, last line removed, both removed,
  each of these with ``*`` removed (markdown emphasis).

Prompt-level accuracy counts prompts whose instructions are all followed; instruction-level
accuracy counts instructions.

Checkers are built exactly as in IFEval's reference evaluation, with one difference: where a
checker draws an argument at random (``keywords:letter_frequency`` given "#" or "!", which are not
letters, draws a letter: dev prompts 1122 and 1129), the draw is seeded by the prompt, so verdicts
are reproducible; the reference leaves it unseeded. langdetect is seeded for the same reason.
Sentence counting needs NLTK's Punkt model, made available offline by ``srlm.metrics.offline_punkt``.
Generation and the ``ifeval`` command are in ``srlm.evaluation.ifeval``.
"""

from __future__ import annotations

import logging
import random
from typing import Iterable, Optional

from srlm.data.records import RecordError, iter_jsonl, resolve_path
from srlm.metrics.offline_punkt import ensure_punkt

log = logging.getLogger(__name__)

# -- the checkers ----------------------------------------------------------------------------------
def _registry() -> dict:
    """IFEval's instruction id -> checker class (Google's checkers, as shipped by ``if-verifiable``)."""
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return INSTRUCTION_DICT


def setup_checkers() -> None:
    ensure_punkt()
    import langdetect

    langdetect.DetectorFactory.seed = 0  # langdetect samples: without a seed a verdict can change between runs


def _kwargs(raw: dict) -> dict:
    return {k: v for k, v in raw.items() if v is not None}  # the HF copy of IFEval fills unused args with None


def build_checker(instruction_id: str, kwargs: dict, prompt: str, index: int = 0):
    """A checker ready to run, built as IFEval's reference evaluation builds it.

    A checker draws its arguments from ``random`` where the data leaves them out or gives one it
    cannot use (IFEval's ``keywords:letter_frequency`` with ``letter`` "#" or "!" draws a letter):
    the draw is seeded by the prompt and the instruction, so a verdict never changes between runs.
    The global random state is restored afterwards.
    """
    state = random.getstate()
    random.seed(f"{instruction_id}|{index}|{prompt}")  # a str seed hashes the same in every process
    try:
        checker = _registry()[instruction_id](instruction_id)
        checker.build_description(**_kwargs(kwargs))
        args = checker.get_instruction_args()
        if args and "prompt" in args:
            checker.build_description(prompt=prompt)
    finally:
        random.setstate(state)
    return checker


def loose_variants(response: str) -> list[str]:
    """IFEval's loose variants of a response: as is, ``*`` removed, first/last/both lines removed (and ``*``)."""
    from if_verifiable.common import get_loose_transformations

    return get_loose_transformations(response)


def check_response(item: dict, response: str) -> dict:
    """Strict and loose verdicts on one response to an IFEval prompt.

    Returns ``{"follow_instruction_list": [...], "follow_instruction_list_loose": [...], "skipped": [...]}``:
    one boolean per instruction of ``item["instruction_id_list"]``, in order (``None`` for an
    instruction whose checker could not run, e.g. with no Punkt model; its id is then in
    ``skipped``). An empty response follows nothing, as in the reference evaluation.
    """
    setup_checkers()
    variants = loose_variants(response)
    strict: list[Optional[bool]] = []
    loose: list[Optional[bool]] = []
    skipped: list[str] = []
    for index, instruction_id in enumerate(item["instruction_id_list"]):
        try:
            checker = build_checker(instruction_id, item["kwargs"][index], item["prompt"], index)
            s = bool(response.strip() and checker.check_following(response))
            lo = s or any(bool(v.strip() and checker.check_following(v)) for v in variants)
        except Exception as err:  # noqa: BLE001 - never lose a whole run to one checker
            log.warning("IFEval prompt %s: instruction %s skipped (%s: %s)", item.get("key"), instruction_id,
                        type(err).__name__, err)
            strict.append(None)
            loose.append(None)
            skipped.append(instruction_id)
            continue
        strict.append(s)
        loose.append(lo)
    return {"follow_instruction_list": strict, "follow_instruction_list_loose": loose, "skipped": skipped}


# -- data ------------------------------------------------------------------------------------------
def _parse_item(obj: dict, path, line: int) -> dict:
    for field in ("key", "prompt", "instruction_id_list", "kwargs"):
        if field not in obj or obj[field] is None:
            raise RecordError(path, line, field, "missing required field")
    key = obj["key"]
    if not isinstance(key, (int, str)) or isinstance(key, bool):
        raise RecordError(path, line, "key", f"expected an integer or string, got {type(key).__name__}")
    prompt = obj["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise RecordError(path, line, "prompt", "expected a non-empty string")
    ids, kwargs = obj["instruction_id_list"], obj["kwargs"]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise RecordError(path, line, "instruction_id_list", "expected a non-empty list of instruction ids")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise RecordError(path, line, "kwargs", f"expected a list of {len(ids)} objects, one per instruction")
    registry = _registry()
    for index, (instruction_id, kw) in enumerate(zip(ids, kwargs)):
        if instruction_id not in registry:
            raise RecordError(path, line, f"instruction_id_list[{index}]",
                              f"unknown IFEval instruction '{instruction_id}'")
        if not isinstance(kw, dict):
            raise RecordError(path, line, f"kwargs[{index}]", f"expected an object, got {type(kw).__name__}")
        try:
            build_checker(instruction_id, kw, prompt, index)
        except Exception as err:  # noqa: BLE001 - a wrong argument name or value
            raise RecordError(path, line, f"kwargs[{index}]",
                              f"invalid arguments for '{instruction_id}': {type(err).__name__}: {err}") from None
    return {"key": key, "prompt": prompt, "instruction_id_list": list(ids), "kwargs": list(kwargs)}


def load_ifeval(path: str, max_prompts: Optional[int] = None) -> list[dict]:
    """IFEval prompts ``{key, prompt, instruction_id_list, kwargs}`` from a jsonl (``seed:`` names a shipped file;
    ``id`` stands for a missing ``key``, as in srlm's constraint files; other fields are dropped).

    Every line is validated (fields, known instruction ids, arguments the checker accepts, unique
    keys); a bad line raises ``RecordError`` (a ValueError) naming the file, line and field.
    """
    resolved = resolve_path(path)
    items, lines = [], {}
    for number, obj in iter_jsonl(resolved):
        if obj.get("key") is None and obj.get("id") is not None:  # srlm's constraint files name it "id"
            obj = {**obj, "key": obj["id"]}
        item = _parse_item(obj, resolved, number)
        key = str(item["key"])
        if key in lines:
            raise RecordError(resolved, number, "key", f"duplicate key {item['key']!r} (first on line {lines[key]})")
        lines[key] = number
        items.append(item)
        if max_prompts is not None and len(items) >= max_prompts:
            break
    if not items:
        raise ValueError(f"{resolved}: no IFEval prompts")
    return items


# -- metrics ---------------------------------------------------------------------------------------
def _fraction(num: int, den: int) -> Optional[float]:
    return num / den if den else None


def ifeval_metrics(rows: Iterable[dict]) -> dict:
    """IFEval's four accuracies (fractions, None with nothing to count) from response rows.

    Each row has ``instruction_id_list``, ``follow_instruction_list`` and
    ``follow_instruction_list_loose`` (``None`` entries: skipped instructions, left out of every
    count; a prompt whose instructions were all skipped is left out of the prompt-level counts).
    ``by_group`` is the strict instruction-level accuracy per instruction group (the part of the id
    before ``:``), ``by_group_n`` the number of instructions in each.
    """
    n_rows = prompts = prompt_strict = prompt_loose = insts = inst_strict = inst_loose = skipped = 0
    groups: dict[str, list[int]] = {}
    for row in rows:
        n_rows += 1
        strict, loose = row["follow_instruction_list"], row["follow_instruction_list_loose"]
        kept = [(i, s, lo) for i, s, lo in zip(row["instruction_id_list"], strict, loose)
                if s is not None and lo is not None]
        skipped += len(row["instruction_id_list"]) - len(kept)
        if not kept:
            continue
        prompts += 1
        prompt_strict += all(s for _, s, _ in kept)
        prompt_loose += all(lo for _, _, lo in kept)
        for instruction_id, s, lo in kept:
            insts += 1
            inst_strict += bool(s)
            inst_loose += bool(lo)
            group = groups.setdefault(instruction_id.split(":")[0], [0, 0])
            group[0] += bool(s)
            group[1] += 1
    return {
        "prompt_level_strict": _fraction(prompt_strict, prompts),
        "inst_level_strict": _fraction(inst_strict, insts),
        "prompt_level_loose": _fraction(prompt_loose, prompts),
        "inst_level_loose": _fraction(inst_loose, insts),
        "n_prompts": prompts,
        "n_instructions": insts,
        "n_skipped": skipped,
        "n_rows": n_rows,
        "by_group": {g: c[0] / c[1] for g, c in sorted(groups.items())},
        "by_group_n": {g: c[1] for g, c in sorted(groups.items())},
    }


def format_table(metrics: dict) -> str:
    def pct(value) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    lines = [f"IFEval: {metrics.get('n_prompts')} prompts, {metrics.get('n_instructions')} instructions, "
             f"{metrics.get('n_skipped')} skipped, {metrics.get('n_truncated', 0)} responses truncated",
             f"  {'':<14} {'strict':>8} {'loose':>8}",
             f"  {'prompt-level':<14} {pct(metrics.get('prompt_level_strict')):>8} "
             f"{pct(metrics.get('prompt_level_loose')):>8}",
             f"  {'inst-level':<14} {pct(metrics.get('inst_level_strict')):>8} "
             f"{pct(metrics.get('inst_level_loose')):>8}"]
    for group, acc in (metrics.get("by_group") or {}).items():
        n = (metrics.get("by_group_n") or {}).get(group, "")
        lines.append(f"    {group:<26} {pct(acc):>7}  (n={n})")
    return "\n".join(lines)
