"""Checks on the shipped EFT seed data: the judge training split and the ranked eval split.

The files are hand-written; these tests guard their shape (ids, scores, ranks, balance) so that a
later edit cannot silently break EFT training or the reward-modelling evaluation.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from srlm.data.records import JudgeExample, RankedPrompt, parse_judge, parse_ranked, read_records

SEED = Path(__file__).resolve().parents[1] / "srlm" / "data" / "seed"
TRAIN = SEED / "eft_train.jsonl"
EVAL = SEED / "eft_eval.jsonl"
SCORE_LINE = re.compile(r"^Score: [0-5]$")


@pytest.fixture(scope="module")
def train() -> list[JudgeExample]:
    return read_records(TRAIN, parse_judge)


@pytest.fixture(scope="module")
def evals() -> list[RankedPrompt]:
    return read_records(EVAL, parse_ranked)


def _score(example: JudgeExample) -> int:
    return int(example.judgement.rstrip("\n").splitlines()[-1].removeprefix("Score: "))


def test_train_counts_and_ids(train):
    assert len(train) >= 72
    ids = [e.id for e in train]
    assert None not in ids
    assert len(set(ids)) == len(ids)


def test_every_judgement_ends_with_a_score_line(train):
    for e in train:
        lines = e.judgement.rstrip("\n").splitlines()
        assert len(lines) >= 2, e.id  # a justification, then the score
        assert SCORE_LINE.match(lines[-1]), (e.id, lines[-1])
        assert "Score:" not in "\n".join(lines[:-1]), e.id  # one score per judgement
        assert 25 <= len(" ".join(lines[:-1]).split()) <= 100, e.id  # the rubric asks for at most 100 words


def test_scores_are_balanced(train):
    counts = Counter(_score(e) for e in train)
    assert set(counts) == set(range(6))
    assert min(counts.values()) >= 8, counts


def test_questions_have_graded_answers(train):
    by_question: dict[str, list[int]] = defaultdict(list)
    for e in train:
        by_question[e.question].append(_score(e))
    assert len(by_question) >= 22
    for question, scores in by_question.items():
        assert len(scores) >= 3, question
        assert len(set(scores)) == len(scores), (question, scores)  # clearly graded: no ties


def test_eval_split(evals, train):
    assert len(evals) >= 16
    ids = [r.id for r in evals]
    assert len(set(ids)) == len(ids)
    assert len({r.prompt for r in evals}) == len(evals)
    train_questions = {e.question.strip().lower() for e in train}
    for r in evals:
        assert r.prompt.strip().lower() not in train_questions, r.id
        assert len(r.replies) >= 3, r.id
        ranks = [reply.rank for reply in r.replies]
        assert len(set(ranks)) == len(ranks), (r.id, ranks)
        assert sorted(ranks) == list(range(len(ranks))), (r.id, ranks)
        assert len({reply.text for reply in r.replies}) == len(r.replies), r.id


def test_files_load_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    train_ds = datasets.load_dataset("json", data_files=str(TRAIN), split="train", cache_dir=str(tmp_path))
    eval_ds = datasets.load_dataset("json", data_files=str(EVAL), split="train", cache_dir=str(tmp_path))
    assert train_ds.num_rows == len(read_records(TRAIN, parse_judge))
    assert {"id", "question", "answer", "judgement"} <= set(train_ds.column_names)
    assert eval_ds.num_rows == len(read_records(EVAL, parse_ranked))
    assert {"id", "prompt", "replies"} <= set(eval_ds.column_names)
    assert set(eval_ds[0]["replies"][0]) == {"text", "rank"}
