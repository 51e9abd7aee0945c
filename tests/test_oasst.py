"""The OpenAssistant converter on a hand-written export fixture, and on the real sample when present."""

from __future__ import annotations

import collections
import json
import random
from pathlib import Path

import pytest

from srlm.data.oasst import build_ift, build_ranked, convert_oasst, load_messages, quality
from srlm.data.records import RecordError, parse_ranked, parse_sft, read_records

FIXTURE = Path(__file__).parent / "fixtures" / "oasst_tiny.jsonl"
SAMPLE = Path(__file__).parents[2] / "shared/data/oasst1-en-sample.jsonl"


@pytest.fixture(scope="module")
def messages() -> dict[str, dict]:
    return load_messages(FIXTURE)


def test_load_messages_keys_by_id(messages):
    assert len(messages) == 34
    assert messages["t1-r0-p-a"]["parent_id"] == "t1-r0-p"
    assert quality(messages["t2-r0"]) == 0.95
    assert quality(messages["t5-r0"]) is None  # labels without "quality"
    assert quality(messages["t5-r1"]) is None  # labels null


def test_ift_keeps_rank0_first_turns_best_quality_first(messages):
    dropped = collections.Counter()
    ift = build_ift(messages, dropped=dropped)
    # 0.95, then the 0.9 tie broken by id, then the reply without a quality label
    assert [e.id for e in ift] == ["t2-r0", "t1-r0", "t3-r0", "t5-r0"]
    assert ift[1].prompt == "How do I boil an egg so that the yolk stays soft?"
    assert ift[1].response.startswith("Lower the egg into boiling water for six minutes")
    assert dropped == {
        "lang": 1,  # t4
        "prompt_deleted": 1,  # t9
        "prompt_short": 1,  # t6
        "no_rank0_reply": 1,  # t7
        "reply_short": 1,  # t8
        "reply_review_failed": 1,  # t10: no fallback to its rank-1 reply
    }


def test_ift_top_k_and_length_limits(messages):
    dropped = collections.Counter()
    assert [e.id for e in build_ift(messages, top_k=2, dropped=dropped)] == ["t2-r0", "t1-r0"]
    assert dropped["top_k"] == 2
    assert build_ift(messages, top_k=0) == []
    # a looser reply limit lets t8's short, quality-1.0 answer in, first
    assert [e.id for e in build_ift(messages, min_response_chars=5)][:2] == ["t8-r0", "t2-r0"]
    assert "t6-r0" in [e.id for e in build_ift(messages, min_prompt_chars=5)]


def test_ift_other_language(messages):
    assert [e.id for e in build_ift(messages, lang="de")] == ["t4-r0"]
    assert [r.id for r in build_ranked(messages, lang="de")] == ["t4"]


def test_ranked_filters_sorts_and_renumbers(messages):
    dropped = collections.Counter()
    ranked = build_ranked(messages, dropped=dropped)
    assert [r.id for r in ranked] == ["t1", "t10", "t3", "t5", "t8"]
    by_id = {r.id: r for r in ranked}
    texts = {m["text"]: mid for mid, m in messages.items()}

    def ids_and_ranks(rid):
        return [(texts[reply.text], reply.rank) for reply in by_id[rid].replies]

    # t1: rank 1 deleted, rank null left out, so 0, 2 become 0, 1; the deeper chain never enters
    assert ids_and_ranks("t1") == [("t1-r0", 0), ("t1-r2", 1)]
    # t10: rank 0 failed review, so 1, 2 become 0, 1
    assert ids_and_ranks("t10") == [("t10-r1", 0), ("t10-r2", 1)]
    # t3 is written out of rank order in the file
    assert ids_and_ranks("t3") == [("t3-r0", 0), ("t3-r1", 1), ("t3-r2", 2)]
    assert ids_and_ranks("t8") == [("t8-r0", 0), ("t8-r1", 1)]
    assert by_id["t5"].prompt == "What is the difference between weather and climate?"
    assert dropped == {"lang": 1, "prompt_deleted": 1, "too_few_replies": 3}  # t2, t6, t7 short of replies


def test_ranked_min_replies(messages):
    assert [r.id for r in build_ranked(messages, min_replies=3)] == ["t3"]
    with pytest.raises(ValueError):
        build_ranked(messages, min_replies=1)


def test_output_does_not_depend_on_file_order(messages):
    items = list(messages.items())
    random.Random(0).shuffle(items)
    shuffled = dict(items)
    assert build_ift(shuffled) == build_ift(messages)
    assert build_ranked(shuffled) == build_ranked(messages)


def test_convert_writes_readable_files_and_counts(tmp_path, capsys):
    counts = convert_oasst(str(FIXTURE), str(tmp_path / "out"), top_k=3)
    assert counts == {
        "messages": 34,
        "ift": 3,
        "ranked": 5,
        "ift_dropped_lang": 1,
        "ift_dropped_no_rank0_reply": 1,
        "ift_dropped_prompt_deleted": 1,
        "ift_dropped_prompt_short": 1,
        "ift_dropped_reply_review_failed": 1,
        "ift_dropped_reply_short": 1,
        "ift_dropped_top_k": 1,
        "ranked_dropped_lang": 1,
        "ranked_dropped_prompt_deleted": 1,
        "ranked_dropped_too_few_replies": 3,
    }
    assert "ift=3" in capsys.readouterr().out
    ift = read_records(tmp_path / "out" / "ift.jsonl", parse_sft)
    assert [e.id for e in ift] == ["t2-r0", "t1-r0", "t3-r0"]
    ranked = read_records(tmp_path / "out" / "ranked.jsonl", parse_ranked)
    assert [r.id for r in ranked] == ["t1", "t10", "t3", "t5", "t8"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ift.jsonl", "ranked.jsonl"]  # no temp files


def _write_with(tmp_path, line_number: int, replacement: str) -> Path:
    lines = FIXTURE.read_text(encoding="utf-8").splitlines()
    lines[line_number - 1] = replacement
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_malformed_line_names_file_and_line(tmp_path):
    path = _write_with(tmp_path, 7, '{"message_id": "t1-r1", "text": ')
    with pytest.raises(RecordError) as err:
        load_messages(path)
    assert err.value.path == str(path) and err.value.line == 7
    assert f"{path}:7" in str(err.value)


@pytest.mark.parametrize("field", ["message_id", "role", "text"])
def test_missing_field_names_it(tmp_path, field):
    obj = json.loads(FIXTURE.read_text(encoding="utf-8").splitlines()[4])
    del obj[field]
    path = _write_with(tmp_path, 5, json.dumps(obj))
    with pytest.raises(RecordError) as err:
        load_messages(path)
    assert (err.value.line, err.value.field) == (5, field)


@pytest.mark.parametrize(
    "change, field",
    [({"role": "user"}, "role"), ({"rank": "first"}, "rank"), ({"rank": True}, "rank"), ({"message_id": "t3"}, "message_id")],
)
def test_bad_values_are_record_errors(tmp_path, change, field):
    obj = json.loads(FIXTURE.read_text(encoding="utf-8").splitlines()[5])
    obj.update(change)
    path = _write_with(tmp_path, 6, json.dumps(obj))
    with pytest.raises(RecordError) as err:
        load_messages(path)
    assert (err.value.line, err.value.field) == (6, field)


def test_real_sample(tmp_path):
    if not SAMPLE.exists():
        pytest.skip(f"{SAMPLE} not present (the development sample lives outside the project)")
    messages = load_messages(SAMPLE)
    ift = build_ift(messages)
    ranked = build_ranked(messages)
    assert len(messages) > 0 and len(ift) > 0 and len(ranked) > 0
    for example in ift:
        reply = messages[example.id]
        prompt = messages[reply["parent_id"]]
        assert prompt["parent_id"] is None and prompt["role"] == "prompter"
        assert reply["rank"] == 0 and example.prompt == prompt["text"]
    qualities = [quality(messages[e.id]) for e in ift]
    known = [q for q in qualities if q is not None]
    assert known == sorted(known, reverse=True)
    for prompt in ranked:
        assert messages[prompt.id]["parent_id"] is None
        assert len(prompt.replies) >= 2
        assert [r.rank for r in prompt.replies] == list(range(len(prompt.replies)))
    counts = convert_oasst(str(SAMPLE), str(tmp_path / "out"))
    assert (counts["messages"], counts["ift"], counts["ranked"]) == (len(messages), len(ift), len(ranked))
