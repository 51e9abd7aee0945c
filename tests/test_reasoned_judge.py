"""The reasoned judge: a sampled judgement, then the logit judge's forced 'Score:' cue after it."""

import math

import torch

from srlm.data.chat import encode_prompt
from srlm.inference.engine import Sampling
from srlm.inference.judge import ReasonedJudge, make_judge
from srlm.inference.loading import load_engine, release
from srlm.inference.scoring import before_score, parse_score
from srlm.prompts import load_template


def test_before_score_cuts_at_the_first_score_label():
    assert before_score("Relevant and clear. Score: 4\nmore") == "Relevant and clear. "
    assert before_score("It is fine. **Score:** 3. Final score = 2") == "It is fine. **"
    assert before_score("no label, the score is based on clarity") == "no label, the score is based on clarity"
    assert before_score("") == ""


def test_every_sample_gets_the_cued_score_of_its_own_text(tiny_model):
    items = [("What is 2 + 2?", "4."), ("Name a colour.", "Blue, a calm colour."), ("Say hi.", "Hello there!")]
    template = load_template("judge_additive", "question", "response")
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=12)
    engine, tok = load_engine(tiny_model, batch_size=2, seed=3)
    try:
        plain = make_judge("generative", engine, tok, template, samples=2, sampling=sampling).score(items, seed=5)
        judge = make_judge("reasoned", engine, tok, template, samples=2, sampling=sampling)
        assert isinstance(judge, ReasonedJudge)
        written = []
        results = judge.score(items, on_batch=lambda idx, rs: written.extend(zip(idx, rs)), seed=5)
        # the untrained tiny model writes no parsable score: the generative judge has none, this one always has
        assert all(s is None for r in plain for s in r.scores)
        assert all(r.score is not None and len(r.scores) == 2 for r in results)
        assert sorted(i for i, _ in written) == [0, 1, 2]
        assert all(results[i] is r for i, r in written)
        for (question, response), result, sampled in zip(items, results, plain):
            assert result.score == sum(result.scores) / 2
            for score, text, raw in zip(result.scores, result.outputs, sampled.outputs):
                body = before_score(raw).rstrip()  # the same seed samples the same judgement text
                assert text.startswith(body) and text.endswith(f"Score: {int(parse_score(text))}")
                ids = encode_prompt(tok, judge.judge_prompt(question, response))
                ids += (tok(body + "\n", add_special_tokens=False)["input_ids"] if body else []) + judge.cue_ids
                probs = torch.softmax(engine.next_token_logprobs([ids])[0][judge.digit_ids].double(), 0)
                expected = float((probs * torch.arange(len(judge.digit_ids), dtype=torch.float64)).sum())
                assert math.isclose(score, expected, abs_tol=1e-5)
                assert parse_score(text) == int(probs.argmax())
    finally:
        release(engine)
