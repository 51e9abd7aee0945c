"""EFT construction (build-eft): agreement selection, balancing, judgement text, tree-level split, end to end."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from srlm.data.oasst import build_ranked, load_messages, split_ranked
from srlm.data.records import parse_ranked, read_records
from srlm.selfreward.build_eft import build_eft
from srlm.selfreward.eft_records import balance, default_cap, select_agreeing, trim_judgement, usable_score
from srlm.inference.scoring import parse_score

FIXTURE = Path(__file__).parent / "fixtures" / "oasst_tiny.jsonl"
SAMPLE = Path(__file__).parents[2] / "shared/data/oasst1-en-sample.jsonl"
EFT_FIELDS = {"id", "question", "answer", "judgement", "score", "prompt_id", "reply_rank"}


# -- select_agreeing ---------------------------------------------------------------------------------
def agrees(replies, chosen) -> bool:
    picked = [(replies[i][0], replies[i][1][k]) for i, k in chosen]
    if any(s is None for _, s in picked) or len({i for i, _ in chosen}) != len(chosen):
        return False
    return all(sa > sb for (ra, sa), (rb, sb) in itertools.permutations(picked, 2) if ra < rb)


def brute_force(replies) -> int:
    """Largest agreeing set with at least two human ranks, by enumeration."""
    options = [[None] + [k for k, s in enumerate(scores) if s is not None] for _, scores in replies]
    best = 0
    for assignment in itertools.product(*options):
        chosen = [(i, k) for i, k in enumerate(assignment) if k is not None]
        if len({replies[i][0] for i, _ in chosen}) >= 2 and agrees(replies, chosen):
            best = max(best, len(chosen))
    return best


def test_select_all_agree():
    assert select_agreeing([(0, [5, 5]), (1, [3, 3]), (2, [1, 1])]) == [(0, 0), (1, 0), (2, 0)]
    # input order does not matter, only the human rank does
    assert select_agreeing([(2, [1]), (0, [5]), (1, [3])]) == [(1, 0), (2, 0), (0, 0)]


def test_select_drops_the_reply_that_breaks_the_order():
    # reply 2 (rank 2) is scored 5, above everything: the chain 5 > 4 > 2 keeps the other three
    assert select_agreeing([(0, [5]), (1, [4]), (2, [5]), (3, [2])]) == [(0, 0), (1, 0), (3, 0)]
    # with only two replies in conflict, one agreeing pair remains
    chosen = select_agreeing([(0, [4]), (1, [5]), (2, [2])])
    assert len(chosen) == 2 and agrees([(0, [4]), (1, [5]), (2, [2])], chosen)


def test_select_chooses_among_samples():
    # reply 0 must take its 5 (reply 1 only ever scored 4), though its 3 is as close to its mean
    assert select_agreeing([(0, [3, 5]), (1, [4, 4]), (2, [1, None])]) == [(0, 1), (1, 0), (2, 0)]
    # free choice: the sample closest to the reply's mean score (5 for mean 4.67, 2 for mean 1.33)
    assert select_agreeing([(0, [4, 5, 5]), (1, [0, 2, 2])]) == [(0, 1), (1, 1)]
    # closest to the mean is a tie-break only: it never costs a reply
    assert select_agreeing([(0, [5, 3, 3]), (1, [4]), (2, [3, 2])]) == [(0, 0), (1, 0), (2, 0)]


def test_select_unparsed_samples():
    assert select_agreeing([(0, [None, None]), (1, [3, None]), (2, [None, 1])]) == [(1, 0), (2, 1)]
    assert select_agreeing([(0, [None]), (1, [None])]) == []
    assert select_agreeing([(0, []), (1, [2])]) == []


def test_select_human_ties():
    # tied replies may share a score; both stay above and below their neighbours
    assert select_agreeing([(0, [5]), (1, [3]), (1, [3]), (2, [1])]) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    # tied replies are not ordered against each other
    assert select_agreeing([(0, [4]), (0, [5]), (1, [3])]) == [(0, 0), (1, 0), (2, 0)]
    # ties alone are no agreement
    assert select_agreeing([(0, [3]), (0, [4])]) == []
    # the biggest set (three rank-1 replies, all 5 or 4) orders nothing: an ordered pair is required
    assert select_agreeing([(0, [5]), (1, [5]), (1, [5]), (1, [4])]) == [(0, 0), (3, 0)]


def test_select_nothing_agrees():
    assert select_agreeing([(0, [1]), (1, [3]), (2, [5])]) == []
    assert select_agreeing([(0, [3, 3]), (1, [3])]) == []  # equal scores are not an agreement
    assert select_agreeing([]) == []


def test_select_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(2, 5)
        replies = [(rng.randint(0, 3), [rng.choice([None, 0, 1, 2, 3, 4, 5, 5, 4]) for _ in range(rng.randint(1, 3))])
                   for _ in range(n)]
        chosen = select_agreeing(replies)
        assert len(chosen) == brute_force(replies), replies
        if chosen:
            assert agrees(replies, chosen)
            assert len({replies[i][0] for i, _ in chosen}) >= 2
        assert select_agreeing(replies) == chosen  # deterministic


# -- balance ---------------------------------------------------------------------------------------
def records_with(counts: dict[int, int]) -> list[dict]:
    return [{"id": f"{score}-{i}", "score": score} for score, n in counts.items() for i in range(n)]


def test_balance_caps_bins_deterministically():
    records = records_with({0: 1, 3: 10, 4: 30, 5: 4})
    capped = balance(records, 3, seed=0)
    counts = {s: sum(r["score"] == s for r in capped) for s in range(6)}
    assert counts == {0: 1, 1: 0, 2: 0, 3: 3, 4: 3, 5: 3}
    assert balance(records, 3, seed=0) == capped
    assert [r["id"] for r in capped] == [r["id"] for r in records if r in capped]  # input order kept
    seeds = {tuple(r["id"] for r in balance(records, 3, seed=s)) for s in range(5)}
    assert len(seeds) > 1  # the seed picks which records stay
    assert balance(records, 0) == [] and balance([], None) == []
    assert balance(records, 100) == records
    with pytest.raises(ValueError):
        balance(records, -1)


def test_balance_default_cap():
    # 2 x the smallest bin (2), unless that is below a uniform share of the set (ceil(45 / 6) = 8)
    records = records_with({0: 1, 3: 10, 4: 30, 5: 4})
    assert default_cap(records) == 8
    assert [sum(r["score"] == s for r in balance(records)) for s in range(6)] == [1, 0, 0, 8, 8, 4]
    assert default_cap(records_with({2: 5, 4: 9})) == 10  # 2 x 5
    assert default_cap([]) is None


# -- judgement text --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, score, expected", [
    ("Relevant and complete.\nScore: 4", 4, "Relevant and complete.\nScore: 4"),
    ("Relevant and complete.\n\n**Score:** 4/5\n\nI hope this helps!", 4, "Relevant and complete.\nScore: 4"),
    ("It answers the basics. Final score: 3 points", 3, "It answers the basics.\nScore: 3"),
    ("Off topic.\n### Overall Score = 0", 0, "Off topic.\nScore: 0"),
    ('It ends with a line of the form "Score: 2".', 2, "It ends with a line of the form\nScore: 2"),
])
def test_trim_judgement_ends_with_the_score(text, score, expected):
    assert trim_judgement(text, score) == expected
    assert parse_score(trim_judgement(text, score)) == score


def test_usable_score():
    assert usable_score("Good answer.\nScore: 4") == (4, None)
    assert usable_score("Good answer.\nScore: 4.5") == (None, "non_integer")
    assert usable_score("Score: 4") == (None, "no_justification")
    assert usable_score("**Final Score:** 4") == (None, "no_justification")
    assert usable_score("Good answer, 4 points.") == (None, "unparsed")
    assert usable_score("Good.\nScore: 8/10") == (None, "unparsed")
    # the last label decides for parse_score, but a judgement stating two scores is no target
    assert usable_score("Score: 2 at first. On reflection it earns more.\nScore: 3") == (None, "several_scores")
    assert usable_score("Fine.\nScore: 100,\nScore: 4") == (None, "several_scores")
    assert usable_score("Its score-based tone is fine.\nScore: 4") == (4, None)


# -- split_ranked ----------------------------------------------------------------------------------
def test_split_ranked_keeps_trees_apart(tmp_path):
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    counts = split_ranked(str(FIXTURE), str(train), str(held), eval_fraction=0.5, seed=0)
    ids_train = [p.id for p in read_records(train, parse_ranked)]
    ids_eval = [p.id for p in read_records(held, parse_ranked)]
    expected = [p.id for p in build_ranked(load_messages(FIXTURE))]
    assert not set(ids_train) & set(ids_eval)
    assert sorted(ids_train + ids_eval) == sorted(expected)
    assert counts["prompts"] == len(expected) and counts["train"] == len(ids_train) and counts["eval"] == len(ids_eval)
    first = (train.read_bytes(), held.read_bytes())
    split_ranked(str(FIXTURE), str(train), str(held), eval_fraction=0.5, seed=0)
    assert (train.read_bytes(), held.read_bytes()) == first  # deterministic
    assert split_ranked(str(FIXTURE), str(train), str(held), eval_fraction=0.0)["eval"] == 0
    assert split_ranked(str(FIXTURE), str(train), str(held), eval_fraction=1.0)["train"] == 0
    with pytest.raises(ValueError):
        split_ranked(str(FIXTURE), str(train), str(held), eval_fraction=1.5)


def test_split_ranked_fractions_and_stability(tmp_path):
    source = tmp_path / "ranked.jsonl"
    rows = [{"id": f"tree-{i}", "prompt": f"question {i}", "replies": [{"text": "a", "rank": 0}, {"text": "b", "rank": 1}]}
            for i in range(600)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    counts = split_ranked(str(source), str(train), str(held), eval_fraction=0.3, seed=7)
    assert counts["train"] + counts["eval"] == 600 and 0.24 < counts["eval"] / 600 < 0.36
    assert counts["eval_replies"] == 2 * counts["eval"]
    ids_eval = {p.id for p in read_records(held, parse_ranked)}
    # a tree's side depends on its id and the seed only: dropping other trees moves nothing
    source.write_text("".join(json.dumps(r) + "\n" for r in rows[::3]))
    split_ranked(str(source), str(train), str(held), eval_fraction=0.3, seed=7)
    assert {p.id for p in read_records(held, parse_ranked)} == {r["id"] for r in rows[::3]} & ids_eval
    split_ranked(str(source), str(train), str(held), eval_fraction=0.3, seed=8)
    assert {p.id for p in read_records(held, parse_ranked)} != {r["id"] for r in rows[::3]} & ids_eval


def test_split_ranked_from_the_command_line(tmp_path):
    from srlm.cli import main

    # every argument by name, as the README writes the data commands
    main(["split-ranked", "--input", str(FIXTURE), "--train_output", str(tmp_path / "a.jsonl"),
          "--eval_output", str(tmp_path / "b.jsonl"), "--eval_fraction", "0.5"])
    assert (tmp_path / "a.jsonl").exists() and (tmp_path / "b.jsonl").exists()


@pytest.mark.skipif(not SAMPLE.exists(), reason="../shared/data is absent")
def test_split_ranked_real_sample_by_tree(tmp_path):
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    counts = split_ranked(str(SAMPLE), str(train), str(held))
    messages = load_messages(SAMPLE)
    trees = [{messages[p.id]["message_tree_id"] for p in read_records(f, parse_ranked)} for f in (train, held)]
    assert not trees[0] & trees[1]
    assert all(messages[p.id]["parent_id"] is None for f in (train, held) for p in read_records(f, parse_ranked))
    assert counts["train"] > 10 and counts["eval"] > 10


# -- build_eft end to end on the tiny model --------------------------------------------------------
def write_ranked(path: Path) -> str:
    rows = [{"id": f"q{q}", "prompt": f"Question number {q}: how do plants grow?",
             "replies": [{"text": f"Reply {r} to question {q}. " * (r + 1), "rank": r} for r in range(3)]}
            for q in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_build_eft_end_to_end_and_resume(tiny_model, tmp_path, scripted_judge):
    from srlm.data.datamodule import SFTDataModule

    ranked = write_ranked(tmp_path / "ranked.jsonl")
    out = tmp_path / "eft.jsonl"
    kwargs = dict(model=tiny_model, samples=4, max_new_tokens=6, batch_size=2, seed=3)
    stats = build_eft(ranked, str(out), **kwargs)
    samples_file = Path(f"{out}.samples.jsonl")
    stats_file = Path(f"{out}.stats.json")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert json.loads(stats_file.read_text()) == stats
    assert stats["replies_judged"] == 9 and stats["judge_samples"] == 36
    assert stats["kept"] == sum(stats["histogram_before"].values()) >= stats["written"] == len(records) > 0
    assert sum(stats["histogram_after"].values()) == len(records)
    assert stats["unparsed_samples"] + stats["usable_samples"] + stats["non_integer_samples"] \
        + stats["no_justification_samples"] + stats["several_scores_samples"] == 36
    for record in records:
        assert set(record) == EFT_FIELDS
        assert record["judgement"].endswith(f"\nScore: {record['score']}")
        assert parse_score(record["judgement"]) == record["score"]
        assert record["answer"].startswith(f"Reply {record['reply_rank']} to question {record['prompt_id'][1:]}")
    for prompt_id in {r["prompt_id"] for r in records}:  # every kept set agrees with the human order
        kept = sorted((r["reply_rank"], r["score"]) for r in records if r["prompt_id"] == prompt_id)
        assert len(kept) >= 2 and all(a[1] > b[1] for a, b in zip(kept, kept[1:]))

    # loadable as EFT by the SFT DataModule: filled into the judge template, judgement as the response
    examples = SFTDataModule(ift_files=[], eft_files=[str(out)]).examples()
    assert len(examples) == len(records)
    assert records[0]["answer"] in examples[0].prompt and examples[0].response == records[0]["judgement"]

    # a kill after two engine batches (plus a torn line): the rerun judges only what is missing
    lines = samples_file.read_text().splitlines(keepends=True)
    assert len(lines) == 9
    samples_file.write_text("".join(lines[:4]) + lines[4][:25])
    out.unlink()
    again = build_eft(ranked, str(out), **kwargs)
    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(json.loads(line)["id"] for line in lines)
    assert [json.loads(line) for line in out.read_text().splitlines()] == records  # same batches, same seeds
    assert {k: v for k, v in again.items() if k != "judge_seconds_this_run"} == \
        {k: v for k, v in stats.items() if k != "judge_seconds_this_run"}

    # nothing left to judge: a third run only re-selects; another cap rebalances the same judgements
    capped = build_eft(ranked, str(out), max_per_score=1, **kwargs)
    assert all(n <= 1 for n in capped["histogram_after"].values())
    assert capped["histogram_before"] == stats["histogram_before"]
    with pytest.raises(ValueError, match="samples per reply"):
        build_eft(ranked, str(out), **{**kwargs, "samples": 2})


def test_build_eft_random_model_parses_nothing(tiny_model, tmp_path):
    ranked = write_ranked(tmp_path / "ranked.jsonl")
    out = tmp_path / "eft.jsonl"
    stats = build_eft(ranked, str(out), model=tiny_model, samples=2, max_new_tokens=4, batch_size=8, max_prompts=2)
    assert stats["replies_judged"] == 6 and stats["prompts"] == 2
    assert stats["unparsed_samples"] == stats["judge_samples"] == 12 and stats["unparsed_rate"] == 1.0
    assert stats["written"] == 0 and out.read_text() == ""
    assert stats["histogram_after"] == {str(s): 0 for s in range(6)}


def test_build_eft_command_line_help(capsys):
    from srlm.cli import main

    with pytest.raises(SystemExit):
        main(["build-eft", "--help"])
    text = capsys.readouterr().out
    assert "--max_per_score" in text and "--ranked" in text and "--output" in text and "--samples" in text
