"""Checks on the shipped IFT seed data and the DPO preference pairs.

Both files are hand-written. These tests guard their shape (counts, ids, lengths) and keep prompts
distinct: within each file, between the two files, and from the EFT seed questions, so that the
reward-modelling eval prompts never leak into instruction training.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from srlm.data import records
from srlm.data.records import PreferencePair, SFTExample, parse_preference, parse_sft, read_jsonl, read_records

SEED = Path(records.__file__).resolve().parent / "seed"
IFT = SEED / "ift.jsonl"
PREFS = SEED / "prefs.jsonl"
MAX_WORDS = 300  # demo sequences are at most 512 tokens, prompt included


def _norm(text: str) -> str:
    # Case and whitespace differences do not make two prompts different.
    return " ".join(text.lower().split())


def _words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def ift() -> list[SFTExample]:
    return read_records(IFT, parse_sft)


@pytest.fixture(scope="module")
def prefs() -> list[PreferencePair]:
    return read_records(PREFS, parse_preference)


def test_ift_counts_and_ids(ift):
    assert len(ift) >= 64
    ids = [e.id for e in ift]
    assert all(i is not None and re.fullmatch(r"ift-\d{3}", i) for i in ids), ids
    assert len(set(ids)) == len(ids)


def test_pref_counts_and_ids(prefs):
    assert len(prefs) >= 24
    ids = [p.id for p in prefs]
    assert all(i is not None and re.fullmatch(r"pref-\d{3}", i) for i in ids), ids
    assert len(set(ids)) == len(ids)
    assert not any(p.extra for p in prefs)  # only the four documented fields


def test_no_prompt_duplicated_within_or_across_files(ift, prefs):
    prompts = [_norm(e.prompt) for e in ift] + [_norm(p.prompt) for p in prefs]
    dupes = [p for p, n in Counter(prompts).items() if n > 1]
    assert dupes == []


def test_prompts_disjoint_from_eft_seed(ift, prefs):
    # EFT train rows carry "question"; the ranked eval rows carry "prompt".
    eft = {_norm(o["question"]) for o in read_jsonl(SEED / "eft_train.jsonl")}
    eft |= {_norm(o["prompt"]) for o in read_jsonl(SEED / "eft_eval.jsonl")}
    ours = {_norm(e.prompt) for e in ift} | {_norm(p.prompt) for p in prefs}
    assert ours & eft == set()


def test_ift_lengths(ift):
    lengths = [_words(e.response) for e in ift]
    assert max(lengths) <= MAX_WORDS
    assert min(lengths) >= 5
    # Mostly medium-length answers: short ones (a haiku, a one-line fact) are the exception.
    assert sum(40 <= n <= 250 for n in lengths) >= 0.9 * len(lengths)


def test_pref_pairs_differ_and_chosen_is_substantive(prefs):
    for p in prefs:
        assert _norm(p.chosen) != _norm(p.rejected), p.id
        assert _words(p.chosen) <= MAX_WORDS and _words(p.rejected) <= MAX_WORDS, p.id
        assert _words(p.prompt) <= MAX_WORDS, p.id
    # The chosen answer is usually the fuller one, but not always (the haiku pair), so the demo
    # cannot learn "longer wins" from every pair.
    longer = sum(_words(p.chosen) > _words(p.rejected) for p in prefs)
    assert len(prefs) // 2 < longer < len(prefs)


def test_code_fences_are_balanced(ift, prefs):
    texts = [e.response for e in ift] + [t for p in prefs for t in (p.chosen, p.rejected)]
    assert all(t.count("```") % 2 == 0 for t in texts)


@pytest.mark.parametrize("path,columns,count", [
    (IFT, {"id", "prompt", "response"}, 64),
    (PREFS, {"id", "prompt", "chosen", "rejected"}, 24),
])
def test_loads_with_datasets(path, columns, count, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path))
    assert set(ds.column_names) == columns
    assert ds.num_rows >= count
    assert ds.num_rows == len(read_jsonl(path))
    assert all(isinstance(v, str) and v.strip() for v in ds["prompt"])
