"""Evaluation: reward-modelling metrics on the tiny model, head-to-head verdicts, run reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from srlm.data.records import read_jsonl, write_jsonl
from srlm.evaluation.head_to_head import (aggregate_verdicts, choice_token_ids, generate_responses, head_to_head,
                                          parse_verdict, verdict_outcome)
from srlm.inference.loading import resolve_model
from srlm.evaluation.report import write_report
from srlm.evaluation.reward import (evaluate_reward, evaluate_reward_with, load_ranked,
                                    reward_metrics_from_scores)
from srlm.inference.engine import Engine, Sample, Sampling

RANKED = [
    {"id": "q1", "prompt": "How do I boil an egg?", "replies": [
        {"text": "Put it in boiling water for eight minutes, then cool it in cold water.", "rank": 0},
        {"text": "Use a pan.", "rank": 1},
        {"text": "Eggs are laid by hens.", "rank": 2}]},
    {"id": "q2", "prompt": "Name a primary colour.", "replies": [
        {"text": "Red is a primary colour.", "rank": 0},
        {"text": "Purple.", "rank": 1},
        {"text": "Colours are nice.", "rank": 2},
        {"text": "I like turtles.", "rank": 3}]},
    {"id": "q3", "prompt": "What is 2 + 2?", "replies": [
        {"text": "4", "rank": 0},
        {"text": "Four, since two and two make four.", "rank": 0},
        {"text": "5", "rank": 1}]},
]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from srlm.models.backbone import load_for_inference, load_tokenizer

    tok = load_tokenizer(tiny_model)
    model = load_for_inference(tiny_model)
    return Engine(model, [tok.eos_token_id], tok.pad_token_id, batch_size=4), tok


@pytest.fixture()
def ranked_file(tmp_path) -> Path:
    path = tmp_path / "ranked.jsonl"
    write_jsonl(path, RANKED)
    return path


# -- reward modelling ----------------------------------------------------------------------------
def _scipy_metrics(rows: list[dict]) -> dict:
    """Independent recomputation: scipy per prompt (NaN prompts skipped), averaged; pairs counted by hand."""
    from scipy.stats import kendalltau, spearmanr

    groups: dict[str, list[tuple[float, int]]] = {}
    for r in rows:
        if r["model_score"] is not None:
            groups.setdefault(r["prompt_id"], []).append((r["model_score"], r["human_rank"]))
    rhos, taus, agree, pairs = [], [], 0.0, 0
    for g in groups.values():
        scores, goodness = [s for s, _ in g], [-k for _, k in g]
        rho, tau = spearmanr(scores, goodness)[0], kendalltau(scores, goodness)[0]
        rhos += [] if math.isnan(rho) else [rho]
        taus += [] if math.isnan(tau) else [tau]
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                if goodness[i] != goodness[j]:
                    pairs += 1
                    model = (scores[i] > scores[j]) - (scores[i] < scores[j])
                    human = (goodness[i] > goodness[j]) - (goodness[i] < goodness[j])
                    agree += 0.5 if model == 0 else float(model == human)
    return {"spearman": sum(rhos) / len(rhos), "kendall_tau": sum(taus) / len(taus),
            "pairwise_accuracy": agree / pairs, "n_pairs": pairs}


def test_evaluate_reward_logit_writes_metrics_that_match_scipy(tiny_model, ranked_file, tmp_path):
    out = tmp_path / "eval"
    metrics = evaluate_reward(model=tiny_model, eval_file=str(ranked_file), output_dir=str(out), judge_mode="logit",
                              batch_size=4)
    written = json.loads((out / "reward_metrics.json").read_text())
    rows = read_jsonl(out / "reward_scores.jsonl")
    for key in ("pairwise_accuracy", "exact_match", "five_best", "spearman", "kendall_tau", "n_prompts", "n_pairs",
                "n_unparsed", "judge_mode", "model", "adapter", "n_replies", "seconds"):
        assert key in written, key
    assert written == json.loads(json.dumps(metrics))
    assert [r["reply_id"] for r in rows[:3]] == ["q1-r0", "q1-r1", "q1-r2"]
    assert [r["human_rank"] for r in rows] == [rep["rank"] for p in RANKED for rep in p["replies"]]
    assert set(rows[0]) == {"prompt_id", "reply_id", "human_rank", "model_score"}
    # The logit judge always scores: expected values strictly inside [0, 5].
    assert all(0.0 < r["model_score"] < 5.0 for r in rows)
    assert written["n_unparsed"] == 0 and written["n_replies"] == 10 and written["n_prompts"] == 3
    assert written["n_pairs"] == 3 + 6 + 2  # q3's two rank-0 replies are not a pair
    # Recomputation from the scores file alone gives the written numbers, and scipy agrees.
    again = reward_metrics_from_scores(rows)
    for key in ("pairwise_accuracy", "exact_match", "five_best", "spearman", "kendall_tau", "n_prompts", "n_pairs",
                "n_unparsed"):
        assert again[key] == written[key], key
    reference = _scipy_metrics(rows)
    assert written["spearman"] == pytest.approx(reference["spearman"], abs=1e-9)
    assert written["kendall_tau"] == pytest.approx(reference["kendall_tau"], abs=1e-9)
    assert written["pairwise_accuracy"] == pytest.approx(reference["pairwise_accuracy"], abs=1e-12)


def test_evaluate_reward_generative_counts_unparsed(tiny, ranked_file, tmp_path):
    engine, tok = tiny
    ranked = load_ranked(str(ranked_file), max_prompts=2)
    metrics = evaluate_reward_with(engine, tok, ranked, tmp_path, judge_mode="generative", samples=2,
                                   sampling=Sampling(temperature=0.7, top_p=0.9, max_new_tokens=6), verbose=False)
    rows = read_jsonl(tmp_path / "reward_scores.jsonl")
    assert len(rows) == 7 and metrics["n_replies"] == 7
    assert metrics["n_unparsed"] == sum(r["model_score"] is None for r in rows)
    assert json.loads((tmp_path / "reward_metrics.json").read_text())["judge_mode"] == "generative"


def test_reward_metrics_from_scores_known_values():
    rows = [{"prompt_id": "a", "human_rank": k, "model_score": s} for k, s in ((0, 5.0), (1, 3.0), (2, 4.0))]
    rows += [{"prompt_id": "b", "human_rank": 0, "model_score": None}, {"prompt_id": "b", "human_rank": 1, "model_score": 2.0}]
    m = reward_metrics_from_scores(rows)
    assert m["pairwise_accuracy"] == pytest.approx(2 / 3)
    assert m["exact_match"] == 0.0 and m["five_best"] == 1.0
    assert m["spearman"] == pytest.approx(0.5) and m["kendall_tau"] == pytest.approx(1 / 3)
    assert (m["n_prompts"], m["n_pairs"], m["n_unparsed"]) == (1, 3, 1)  # prompt b has one scored reply left


def test_load_ranked_converts_an_oasst_export(tmp_path):
    base = {"lang": "en", "deleted": False, "synthetic": False, "review_result": True, "message_tree_id": "t"}
    messages = [
        {**base, "message_id": "p1", "parent_id": None, "role": "prompter", "text": "Why is the sky blue?", "rank": None},
        {**base, "message_id": "a1", "parent_id": "p1", "role": "assistant", "text": "Rayleigh scattering.", "rank": 1},
        {**base, "message_id": "a2", "parent_id": "p1", "role": "assistant", "text": "Blue light scatters most.", "rank": 0},
    ]
    write_jsonl(tmp_path / "oasst.jsonl", messages)
    (prompt,) = load_ranked(str(tmp_path / "oasst.jsonl"))
    assert prompt.id == "p1" and [(r.text, r.rank) for r in prompt.replies] == [("Blue light scatters most.", 0),
                                                                                ("Rayleigh scattering.", 1)]


def test_resolve_model_reads_the_base_from_an_iteration_folder(tmp_path):
    adapter = tmp_path / "iter_1" / "model"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "srlm_lineage.json").write_text(json.dumps({"base_model": "some/base", "merged_adapters": []}))
    assert resolve_model(str(tmp_path / "iter_1")) == ("some/base", str(adapter))
    assert resolve_model(str(adapter)) == ("some/base", str(adapter))
    assert resolve_model("embedded:x", "ad") == ("embedded:x", "ad")
    with pytest.raises(ValueError):
        resolve_model(str(adapter), "another")


def test_loaded_engine_releases_the_engine_when_the_block_raises(tiny_model):
    from srlm.inference.loading import loaded_engine

    with pytest.raises(RuntimeError, match="inside the block"):
        with loaded_engine(tiny_model, batch_size=2) as (engine, tokenizer):
            assert engine.model is not None and tokenizer.eos_token_id is not None
            raise RuntimeError("inside the block")
    assert engine.model is None  # released: its model dropped, so the next one fits


# -- head to head --------------------------------------------------------------------------------
def test_parse_verdict_reads_the_last_labelled_choice():
    assert parse_verdict("A is longer, B is right.\nVerdict: B") == "B"
    assert parse_verdict("**Verdict:** A.") == "A"
    assert parse_verdict("Verdict: Tie") == "tie"
    assert parse_verdict("Verdict: A\nOn reflection, Verdict: B") == "B"
    assert parse_verdict("Verdict: C") is None
    assert parse_verdict("I prefer A") is None
    assert parse_verdict("") is None


def test_aggregate_verdicts_counts_order_flips_as_ties():
    # Positional verdicts. Second order shows B's answer first, so "B" there means model A won.
    first = ["A", "A", "B", "tie", None, "A"]
    second = ["B", "A", "A", "tie", "B", "tie"]
    assert [verdict_outcome(a, b) for a, b in zip(first, second)] == ["win", "tie", "loss", "tie", "tie", "tie"]
    summary = aggregate_verdicts(first, second)
    assert (summary["wins"], summary["ties"], summary["losses"], summary["n"]) == (1, 4, 1, 6)
    assert summary["win"] == pytest.approx(16.67) and summary["tie"] == pytest.approx(66.67)
    assert summary["inconsistent"] == 3 and summary["unparsed"] == 1
    assert aggregate_verdicts([], [])["win"] is None
    with pytest.raises(ValueError):
        aggregate_verdicts(["A"], ["X"])


class QualityJudge:
    """A fake engine: the answer containing 'good' wins; ``biased`` always prefers the first position."""

    def __init__(self, tokenizer, biased: bool = False):
        self.tok, self.biased = tokenizer, biased
        _, (self.id_a, self.id_b) = choice_token_ids(tokenizer, "Verdict:")

    def _first_wins(self, ids) -> bool:
        text = self.tok.decode(ids)
        first = text.split("<answer_a>")[-1].split("</answer_a>")[0]
        return self.biased or "good" in first

    def next_token_logprobs(self, prompts, on_batch=None):
        out = torch.full((len(prompts), len(self.tok)), -20.0)
        for row, ids in enumerate(prompts):
            out[row, self.id_a if self._first_wins(ids) else self.id_b] = -0.1
        return out

    def generate(self, prompts, n, cfg, on_batch=None):
        texts = ["Both fine.\nVerdict: " + ("A" if self._first_wins(ids) else "B") for ids in prompts]
        return [[Sample(self.tok(t, add_special_tokens=False)["input_ids"], 0.0, True)] for t in texts]


@pytest.mark.parametrize("mode", ["logit", "generative"])
def test_head_to_head_judges_both_orders(tiny, tmp_path, mode):
    _, tok = tiny
    prompts = ["p1", "p2", "p3", "p4"]
    a = ["a good answer", "a good answer", "meh", "meh"]
    b = ["meh", "meh", "a good answer", "meh too"]
    summary = head_to_head(prompts, a, b, QualityJudge(tok), tok, mode=mode, output=tmp_path / "v.jsonl",
                           ids=["x1", "x2", "x3", "x4"])
    assert (summary["wins"], summary["ties"], summary["losses"]) == (2, 1, 1)
    assert summary["win"] == 50.0 and summary["n"] == 4 and summary["mode"] == mode
    rows = read_jsonl(tmp_path / "v.jsonl")
    assert [r["outcome"] for r in rows] == ["win", "win", "loss", "tie"]
    assert [r["id"] for r in rows] == ["x1", "x2", "x3", "x4"]
    assert (rows[0]["first"], rows[0]["second"]) == ("A", "B")
    # A judge that always picks the first position flips with the order: every prompt is a tie.
    biased = head_to_head(prompts, a, b, QualityJudge(tok, biased=True), tok, mode=mode)
    assert biased["tie"] == 100.0 and biased["inconsistent"] == 4


def test_head_to_head_on_the_tiny_model(tiny):
    engine, tok = tiny
    prompts = ["Name a primary colour.", "What is 2 + 2?"]
    replies = generate_responses(engine, tok, prompts, Sampling(temperature=0.0, top_p=1.0, max_new_tokens=5))
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    # Identical answers: both orders see the same judge prompt, so the verdict can only be a tie.
    same = head_to_head(prompts, ["Red.", "4"], ["Red.", "4"], engine, tok, mode="logit")
    assert same["tie"] == 100.0
    gen = head_to_head(prompts, ["Red.", "4"], ["Blue.", "5"], engine, tok, mode="generative",
                       sampling=Sampling(temperature=0.0, top_p=1.0, max_new_tokens=4))
    assert gen["n"] == 2 and gen["win"] + gen["tie"] + gen["loss"] == pytest.approx(100.0)


# -- report --------------------------------------------------------------------------------------
def _metrics_csv(path: Path, rows: list[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["epoch,step,loss,rewards/accuracies,rewards/margins,val/loss"]
    lines += [",".join("" if v is None else str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def _synthetic_run(root: Path) -> None:
    reward = {"pairwise_accuracy": 0.75, "exact_match": 0.2, "five_best": None, "spearman": 0.3,
              "kendall_tau": 0.25, "n_prompts": 18, "n_pairs": 40, "n_unparsed": 2}
    phases = {
        "m1": {"done": True, "counts": {"steps": 50, "model": "m1/model"}},
        "iter_1/prompts": {"counts": {"kept": 10, "requests": 14, "dropped_duplicate": 3, "dropped_too_short": 1}},
        "iter_1/candidates": {"counts": {"prompts": 10, "candidates": 40, "empty": 1}},
        "iter_1/judgements": {"counts": {"judged": 40, "unparsed_samples": 5, "unscored": 2,
                                         "histogram": {"0": 1, "1": 2, "2": 5, "3": 10, "4": 15, "5": 5, "none": 2}}},
        "iter_1/pairs": {"counts": {"pairs": 7, "dropped_tie": 2}},
        "iter_1/train": {"counts": {"pairs": 7, "model": "iter_1/model", "steps": 4}},
        "iter_2/prompts": {"counts": {"kept": 12}},
        "eval/m1": {"counts": reward},
        "eval/iter_1": {"counts": {**reward, "pairwise_accuracy": 0.8}},
        "h2h/iter_1": {"counts": {"win": 50.0, "tie": 37.5, "loss": 12.5, "n": 8}},
        "h2h/iter_2": {"counts": {"win": 3, "tie": 1, "loss": 0, "n": 4}},
    }
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"phases": phases}))
    write_jsonl(root / "iter_1" / "judgements.jsonl",
                [{"id": f"c{i}", "score": s} for i, s in enumerate([4.0, 3.5, None, 5.0, 1.25, 0.0])])
    logs = root / "iter_1" / "dpo" / "lightning_logs"
    _metrics_csv(logs / "version_0" / "metrics.csv", [(0, 0, 0.69, 0.5, 0.0, None), (0, 1, None, None, None, 0.7)])
    _metrics_csv(logs / "version_1" / "metrics.csv", [(0, 2, 0.6, 0.75, 0.1, None), (0, 3, 0.5, 0.875, 0.2, None),
                                                      (0, 3, None, None, None, 0.65)])


def test_write_report_on_a_synthetic_run(tmp_path):
    root = tmp_path / "run"
    _synthetic_run(root)
    out = write_report(str(root))
    text = out.read_text()
    assert out == root / "report.md"
    assert "## Iteration 1: M1 → M2" in text and "## Iteration 2: M2 → M3" in text
    assert "| prompts kept | 10 |" in text and "| prompts dropped | 4 |" in text
    assert "| candidates unscored | 2 |" in text and "| pairs dropped (tied scores) | 2 |" in text
    assert "| DPO final reward accuracy (train) | 87.5% |" in text  # last non-empty cell, latest version
    assert "| M2 pairwise acc. | 80.0% |" in text
    assert "50.0% / 37.5% / 12.5% (n=8)" in text
    assert "| M3 | 75.0% | 25.0% | 0.0% | 4 |" in text  # counts turned into percentages
    assert "_No DPO metrics.csv for iteration 2" in text
    for name in ("judge_scores_iter_1.png", "dpo_iter_1.png", "reward_metrics.png"):
        data = (root / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (root / "plots" / "judge_scores_iter_2.png").exists()


def test_write_report_on_an_empty_or_broken_folder(tmp_path):
    empty = write_report(str(tmp_path / "empty"))
    assert "No self-rewarding iteration yet" in empty.read_text() and "no manifest.json" in empty.read_text()
    broken = tmp_path / "broken"
    (broken / "iter_1" / "dpo" / "lightning_logs" / "version_0").mkdir(parents=True)
    (broken / "manifest.json").write_text("{not json")
    (broken / "iter_1" / "judgements.jsonl").write_text('{"score": 1}\nnot json\n')
    (broken / "iter_1" / "dpo" / "lightning_logs" / "version_0" / "metrics.csv").write_text("step,loss\n1,\n")
    text = write_report(str(broken)).read_text()
    assert "manifest.json could not be read" in text and "## Iteration 1" in text
    assert "could not be read" in text.split("## Notes")[1]


def test_compare_writes_responses_verdicts_and_summary(tiny_model, ranked_file, tmp_path):
    from srlm.evaluation.head_to_head import compare

    summary = compare(tiny_model, None, tiny_model, None, prompts_file=str(ranked_file), output_dir=str(tmp_path),
                      judge_model=tiny_model, max_prompts=2, max_new_tokens=4, batch_size=4)
    # The same model answers greedily on both sides: identical answers, so every prompt is a tie.
    assert summary["n"] == 2 and summary["tie"] == 100.0
    assert [r["id"] for r in read_jsonl(tmp_path / "responses.jsonl")] == ["q1", "q2"]
    assert len(read_jsonl(tmp_path / "h2h_verdicts.jsonl")) == 2
    assert json.loads((tmp_path / "h2h_summary.json").read_text())["model_a"]["model"] == tiny_model
