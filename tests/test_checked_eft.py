"""Checked EFT (build-eft-checked): scores from IFEval's checkers on the model's own answers."""

from __future__ import annotations

import json

import pytest

from srlm.data.datamodule import load_sft_file
from srlm.metrics.ifeval import check_response, load_ifeval
from srlm.inference.loading import load_engine, release
from srlm.selfreward.checked_eft import (build_checked_eft, build_checked_eft_with, checked_judgement,
                                        checked_score, describe)
from srlm.inference.engine import Sampling
from srlm.inference.scoring import parse_score

LOWERCASE = {"key": "t1", "prompt": "Describe rain. Write the whole answer in lowercase letters.",
             "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma"], "kwargs": [{}, {}]}


def test_score_rule():
    assert checked_score([True, True], finished=True) == 5
    assert checked_score([True, True], finished=False) == 3
    assert checked_score([True, False], finished=True) == 2
    assert checked_score([False, False], finished=True) == 1
    assert checked_score([None, True], finished=True) == 5  # an unchecked instruction is left out
    assert checked_score([None], finished=True) is None


def test_judgement_names_each_requirement_and_its_verdict():
    follows = check_response(LOWERCASE, "Rain falls, and it is Wet.")["follow_instruction_list"]
    assert follows == [False, False]  # capitals and a comma: both checkers really ran
    text = checked_judgement(describe(LOWERCASE), follows, True, checked_score(follows, True))
    assert "lowercase" in text and text.count("Not met.") == 2 and text.endswith("Score: 1")
    assert parse_score(text) == 1
    ok = check_response(LOWERCASE, "rain falls from clouds")["follow_instruction_list"]
    assert ok == [True, True]
    assert checked_judgement(describe(LOWERCASE), ok, False, 3).splitlines()[-2] == \
        "The response stops before it is finished."


def test_end_to_end_on_the_tiny_model_and_resume(tiny_model, tmp_path):
    items = load_ifeval("seed:ift_constraints.jsonl", max_prompts=3)
    refs = {str(items[0]["key"]): json.loads(open(_seed("ift_constraints.jsonl")).readline())["response"]}
    out = tmp_path / "eft_checked.jsonl"
    engine, tok = load_engine(tiny_model, batch_size=2, seed=0)
    try:
        sampling = Sampling(0.7, 0.9, 16)
        stats = build_checked_eft_with(engine, tok, items[:2], str(out), samples=2, sampling=sampling,
                                       references=refs, balance=False, show_progress=False)
        assert stats["answers"] == 4 and stats["references"] == 1
        # a rerun with one more prompt answers only that prompt, and the first two rows are unchanged
        before = read_records(f"{out}.samples.jsonl")
        stats = build_checked_eft_with(engine, tok, items, str(out), samples=2, sampling=sampling,
                                       references=refs, balance=False, show_progress=False)
    finally:
        release(engine)
    after = read_records(f"{out}.samples.jsonl")
    assert after[:2] == before and len(after) == 3 and len({r["key"] for r in after}) == 3
    rows = read_records(out)
    assert rows and all(r["source"] == "checked" and parse_score(r["judgement"]) == r["score"] for r in rows)
    # the reference answer follows every instruction and is complete
    assert [r["score"] for r in rows if r["id"].endswith("-ref")] == [5]
    # the tiny model's 16-token answers are cut: never above 3
    assert all(r["score"] <= 3 for r in rows if not r["id"].endswith("-ref"))
    # it loads as EFT data, filled into the judge template
    examples = load_sft_file(str(out))
    assert len(examples) == len(rows) and "<response>" in examples[0].prompt


def test_command_line_refuses_ifeval_format_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "prompt": "p", "instruction_id_list": ["nope:nope"], "kwargs": [{}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1.*instruction_id_list\[0\]"):
        build_checked_eft(str(bad), str(tmp_path / "out.jsonl"))


def read_records(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _seed(name: str) -> str:
    from srlm.data.datamodule import resolve_path

    return str(resolve_path(f"seed:{name}"))
