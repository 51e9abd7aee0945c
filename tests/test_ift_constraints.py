"""Checks on the hand-written IFT seed with verifiable instructions (IFEval's instruction families).

``ift_constraints.jsonl`` (training) and ``ift_constraints_heldout.jsonl`` (measuring only) hold
``{id, prompt, response, instruction_id_list, kwargs}`` records. Every response must pass Google's
strict checker for every one of its instructions, run through ``srlm.metrics.ifeval.check_response``
(the same code path as the IFEval evaluation). The prompts are our own: none may be an IFEval prompt,
and the held-out prompts are disjoint from the training ones.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from srlm.data import records
from srlm.data.datamodule import load_sft_file
from srlm.metrics.ifeval import check_response

SEED = Path(records.__file__).resolve().parent / "seed"
TRAIN = SEED / "ift_constraints.jsonl"
HELDOUT = SEED / "ift_constraints_heldout.jsonl"
FILES = {TRAIN: 120, HELDOUT: 40}
IFEVAL_PROMPT_FILES = [SHARED_DATA / "ifeval-dev.jsonl", SEED / "ifeval_dev.jsonl"]
FIELDS = {"id", "prompt", "response", "instruction_id_list", "kwargs"}


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _load(path: Path) -> list[dict]:
    return [obj for _, obj in records.iter_jsonl(path)]


def _registry() -> dict:
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return INSTRUCTION_DICT


ALL = [(path.name, rec) for path in FILES for rec in _load(path)]


@pytest.mark.parametrize("path", list(FILES), ids=lambda p: p.name)
def test_counts_fields_and_ids(path):
    rows = _load(path)
    assert len(rows) == FILES[path]
    registry = _registry()
    for rec in rows:
        assert set(rec) == FIELDS, rec.get("id")
        assert isinstance(rec["id"], str) and rec["prompt"].strip() and rec["response"].strip()
        ids, kwargs = rec["instruction_id_list"], rec["kwargs"]
        assert 1 <= len(ids) <= 2 and len(kwargs) == len(ids), rec["id"]
        assert len(set(ids)) == len(ids), rec["id"]
        for instruction_id, kw in zip(ids, kwargs):
            assert instruction_id in registry, (rec["id"], instruction_id)
            assert isinstance(kw, dict), rec["id"]
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({_norm(r["prompt"]) for r in rows}) == len(rows)


def test_ids_unique_across_files():
    ids = [rec["id"] for _, rec in ALL]
    assert len(set(ids)) == len(ids)


def test_no_conflicting_instructions():
    """Two instructions on one prompt are never a pair IFEval itself would refuse to combine."""
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS, conflict_make

    conflicts = conflict_make({k: set(v) for k, v in INSTRUCTION_CONFLICTS.items()})
    for _, rec in ALL:
        if len(rec["instruction_id_list"]) == 2:
            a, b = rec["instruction_id_list"]
            assert b not in conflicts[a], rec["id"]


@pytest.mark.parametrize("name,rec", ALL, ids=[rec["id"] for _, rec in ALL])
def test_response_follows_every_instruction(name, rec):
    item = {"key": rec["id"], "prompt": rec["prompt"], "instruction_id_list": rec["instruction_id_list"],
            "kwargs": rec["kwargs"]}
    result = check_response(item, rec["response"])
    assert result["skipped"] == [], f"{rec['id']}: checker could not run for {result['skipped']}"
    failed = [i for i, ok in zip(rec["instruction_id_list"], result["follow_instruction_list"]) if ok is not True]
    assert not failed, f"{rec['id']}: strict check fails for {failed}"


def test_coverage_is_broad_and_even():
    train = _load(TRAIN)
    counts = Counter(i for rec in train for i in rec["instruction_id_list"])
    assert len(counts) >= 18
    assert max(counts.values()) <= 2 * min(counts.values()), counts
    doubles = sum(len(rec["instruction_id_list"]) == 2 for rec in train)
    assert 0.25 <= doubles / len(train) <= 0.45
    heldout_ids = {i for rec in _load(HELDOUT) for i in rec["instruction_id_list"]}
    assert heldout_ids <= set(counts), "held-out instructions come from the training families"


def test_heldout_prompts_are_not_training_prompts():
    train = {_norm(rec["prompt"]) for rec in _load(TRAIN)}
    assert not [rec["id"] for rec in _load(HELDOUT) if _norm(rec["prompt"]) in train]


def test_no_prompt_is_an_ifeval_prompt():
    present = [p for p in IFEVAL_PROMPT_FILES if p.exists()]
    if not present:
        pytest.skip("no IFEval prompt file here (../shared/data/ifeval-dev.jsonl, seed ifeval_dev.jsonl)")
    ifeval = {_norm(json.loads(line)["prompt"]) for p in present for line in p.read_text(encoding="utf-8").splitlines()
              if line.strip()}
    ours = {_norm(rec["prompt"]): rec["id"] for _, rec in ALL}
    assert not sorted(ours[p] for p in ours.keys() & ifeval)


@pytest.mark.parametrize("path", list(FILES), ids=lambda p: p.name)
def test_loads_as_sft_data(path):
    examples = load_sft_file(f"seed:{path.name}")
    rows = _load(path)
    assert [(e.id, e.prompt, e.response) for e in examples] == [(r["id"], r["prompt"], r["response"]) for r in rows]
