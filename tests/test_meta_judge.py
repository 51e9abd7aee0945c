"""Meta-judging (self_reward.meta_judge): disagreeing judgements compared in both orders, judge pairs."""

import json

import pytest

from srlm.inference.loading import load_engine, release
from srlm.prompts import load_template
from srlm.selfreward.config import SelfRewardConfig
from srlm.inference.engine import Sampling
from srlm.selfreward.meta_judge import (META_FIELDS, cap_judge_pairs, disagreeing, meta_judge, outcome, rank,
                                        rubric_of)


def test_outcome_sums_both_orders_so_position_bias_cancels():
    # log p(A) - log p(B) with judgement 0 shown as A, then shown as B
    assert outcome(2.0, -1.0) == 0 and outcome(-2.0, 1.0) == 1  # both orders agree
    # both orders favour A (position bias of about +2.5): judgement 0 is preferred by 1 nat over the bias
    assert outcome(3.0, 2.0) == 0 and outcome(2.0, 3.0) == 1
    assert outcome(1.5, 1.5) is None  # nothing but the bias: a tie, never guessed


def test_rank_best_worst_and_shared_places():
    # 0 beats 1 and 2, 1 beats 2
    assert rank(3, {(0, 1): 0, (0, 2): 0, (1, 2): 0}) == (0, 2, [2, 1, 0])
    assert rank(3, {(0, 1): None, (0, 2): None, (1, 2): None}) is None  # all ties: no order
    assert rank(2, {(0, 1): 1}) == (1, 0, [0, 1])


def test_disagreeing_needs_two_parsed_scores_that_differ():
    assert disagreeing({"outputs": ["ok. Score: 3", "bad. Score: 1", "no score"]}) == [0, 1]
    assert disagreeing({"outputs": ["Score: 3", "fine. Score: 3"]}) == []
    assert disagreeing({"outputs": ["Score: 3", "none"]}) == []


def test_cap_keeps_the_share_of_the_round():
    pairs = [{"id": str(i)} for i in range(10)]
    assert len(cap_judge_pairs(pairs, actor_pairs=6, share=0.25, seed=0)) == 2  # 2 / (6 + 2) = 0.25
    assert cap_judge_pairs(pairs, 6, 0.25, 0) == cap_judge_pairs(pairs, 6, 0.25, 0)  # seeded
    assert cap_judge_pairs(pairs, 0, 0.25, 0) == []
    assert len(cap_judge_pairs(pairs, 100, 0.5, 0)) == 10
    assert cap_judge_pairs(pairs, 6, 0.0, 0) == []  # share 0: the meta-judge trains nothing


def test_cap_keeps_one_judge_pair_when_the_share_rounds_to_none():
    # a small round (the smoke recipe: 1 actor pair) would otherwise train the actor alone, never the judge
    pairs = [{"id": str(i)} for i in range(4)]
    assert len(cap_judge_pairs(pairs, actor_pairs=1, share=0.25, seed=0)) == 1
    assert len(cap_judge_pairs(pairs, actor_pairs=2, share=0.25, seed=0)) == 1


def test_config_refuses_meta_judging_without_several_judgements():
    with pytest.raises(ValueError, match="judge_samples >= 2"):
        SelfRewardConfig(meta_judge=True, judge_mode="logit", judge_samples=1)
    assert SelfRewardConfig(meta_judge=True, judge_mode="generative", judge_samples=3).judging == "generative"
    # the meta-judge needs judgement texts: the logit judge writes them first (smoke.yaml's judge + meta_judge)
    assert SelfRewardConfig(meta_judge=True, judge_mode="logit", judge_samples=2).judging == "reasoned"
    assert SelfRewardConfig(judge_mode="logit").judging == "logit"
    with pytest.raises(ValueError, match="judge_mode"):
        SelfRewardConfig(judge_mode="logits")


def test_meta_judge_on_the_tiny_model(tiny_model):
    judge_template = load_template("judge_additive", "question", "response")
    template = load_template("meta_judge", *META_FIELDS)
    assert "additive 5-point rubric" in rubric_of(judge_template)
    candidates = [{"id": f"c{i}", "prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(3)]
    judgements = [{"id": "c0", "outputs": ["Relevant. Score: 4", "Off topic. Score: 1", "Partly. Score: 2"]},
                  {"id": "c1", "outputs": ["Score: 3", "Same. Score: 3", "unparsed"]},  # agree: not meta-judged
                  {"id": "c2", "outputs": ["Good. Score: 5", "Weak. Score: 2"]}]
    engine, tok = load_engine(tiny_model, batch_size=4)
    try:
        pairs, counts = meta_judge(engine, tok, template, judge_template, candidates, judgements)
    finally:
        release(engine)
    assert counts["judged_candidates"] == 3 and counts["disagreeing"] == 2 and counts["unparsed"] == 1
    assert counts["comparisons"] == 3 + 1  # c0: 3 pairs of judgements, c2: 1
    assert 0 <= counts["order_flips"] <= counts["comparisons"] and counts["ties"] == 0
    assert counts["judge_pairs"] == len(pairs) == 2 - counts["no_clear_order"]
    for pair in pairs:
        cand = next(c for c in candidates if c["id"] == pair["candidate_id"])
        assert pair["prompt"] == judge_template.fill(question=cand["prompt"], response=cand["response"])
        outputs = next(j["outputs"] for j in judgements if j["id"] == cand["id"])
        assert {pair["chosen"], pair["rejected"]} <= set(outputs) and pair["chosen"] != pair["rejected"]


@pytest.mark.slow
def test_loop_trains_judge_pairs_with_actor_pairs(tiny_model, tmp_path, scripted_judge, monkeypatch):
    from test_loop_bugs import tiny_loop

    # The tiny random model's preferences can be cyclic (no clear best or worst): script a consistent
    # one, the earlier judgement wins; the meta-judge prompts still run through the model.
    monkeypatch.setattr("srlm.selfreward.meta_judge.outcome", lambda straight, swapped: 0)
    run = tmp_path / "run"
    manifest = tiny_loop(tiny_model, run, judge_mode="generative", judge_samples=3, meta_judge=True,
                         meta_judge_share=0.5, allow_unfinished_chosen=True, num_prompts=4,
                         judge_sampling=Sampling(1.0, 1.0, 8))
    counts = manifest["phases"]["iter_1/pairs"]["counts"]
    meta = counts["meta_judge"]
    judge_pairs = [json.loads(x) for x in open(run / "iter_1" / "judge_pairs.jsonl")]
    assert meta["judge_pairs"] == len(judge_pairs) <= counts["pairs"]  # share 0.5: at most one per actor pair
    assert meta["disagreeing"] > 0 and meta["comparisons"] > 0
    assert judge_pairs, meta  # the scripted judgements disagree: some pairs survive
    train = manifest["phases"]["iter_1/train"]["counts"]
    assert train["judge_pairs"] == len(judge_pairs)
    # the DPO round read both files: its steps cover actor and judge pairs
    assert train["steps"] >= 1
    from srlm.evaluation.report import write_report

    report = write_report(str(run)).read_text()
    assert "judge pairs trained" in report and "meta-judge: comparisons" in report
