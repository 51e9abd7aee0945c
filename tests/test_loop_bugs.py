"""Regression tests for five bugs of the self-rewarding loop, on the tiny model.

1. identical candidate texts with different scores made a pair with chosen == rejected;
2. the positive-examples-only round lost M1's data settings (max_prompt_length), trained on the
   positives alone and crashed without positives;
3. candidates cut at max_new_tokens could be chosen, and a cut response was trained with an EOS;
4. generative judging ignored the configured seed;
5. a resume used artifacts changed by hand since their phase recorded their sha256.
"""

import json
from pathlib import Path

import lightning as L
import pytest

from srlm.data.datamodule import PreferenceDataModule, SFTDataModule, load_sft_file
from srlm.data.records import write_jsonl
from srlm.models.backbone import BackboneConfig, load_tokenizer
from srlm.models.sft import SFTModule
from srlm.selfreward import loop as loop_module
from srlm.selfreward.config import DPORoundConfig, EvalConfig, SelfRewardConfig
from srlm.selfreward.creator import InstructionCreator
from srlm.inference.engine import Sampling
from srlm.selfreward.rundir import RunDir
from srlm.selfreward.steps import make_pairs
from srlm.trainer import SRLMTrainer


def records(path):
    return [json.loads(line) for line in open(path)]


def candidate(prompt_id, k, response, finished=True):
    return {"id": f"{prompt_id}-c{k}", "prompt_id": prompt_id, "prompt": f"Question {prompt_id}?", "candidate": k,
            "response": response, "finished": finished, "n_tokens": 5, "logp": None, "empty": False}


def read_pairs(tokenizer, path):
    dm = PreferenceDataModule(pair_files=[str(path)], batch_size=1, max_length=256, max_prompt_length=128)
    dm.tokenizer = tokenizer
    dm.setup("fit")  # reads every pair with the DPO reader (parse_preference)
    return dm.train_dataset


# -- 1. identical responses --------------------------------------------------------------------------
def test_identical_responses_never_make_a_pair(tiny_model, tmp_path):
    cands = [candidate("a", 0, "The sky is blue."), candidate("a", 1, "The sky is blue. "),
             candidate("a", 2, "Grass."), candidate("b", 0, "Same."), candidate("b", 1, "Same.")]
    judgements = [{"id": c["id"], "score": s} for c, s in zip(cands, [5.0, 2.0, 1.0, 4.0, 1.0])]
    stats = make_pairs(cands, judgements, tmp_path / "pairs.jsonl")
    pairs = records(tmp_path / "pairs.jsonl")
    assert [(p["chosen_id"], p["rejected_id"]) for p in pairs] == [("a-c0", "a-c2")]
    assert stats["dropped_identical"] == 1
    assert len(read_pairs(load_tokenizer(tiny_model), tmp_path / "pairs.jsonl")) == 1


# -- 3. unfinished candidates ----------------------------------------------------------------------------
def test_unfinished_candidates_are_never_chosen_and_keep_no_eos(tiny_model, tmp_path):
    tok = load_tokenizer(tiny_model)
    cands = [candidate("p", 0, "The best answer, but it was cut at the", finished=False),
             candidate("p", 1, "A complete answer."),
             candidate("p", 2, "A rambling answer that goes on and", finished=False)]
    judgements = [{"id": c["id"], "score": s} for c, s in zip(cands, [5.0, 3.0, 1.0])]
    stats = make_pairs(cands, judgements, tmp_path / "pairs.jsonl")
    (pair,) = records(tmp_path / "pairs.jsonl")
    assert (pair["chosen_id"], pair["rejected_id"]) == ("p-c1", "p-c2")
    assert pair["rejected_finished"] is False and stats["unfinished_not_chosen"] == 1
    (item,) = read_pairs(tok, tmp_path / "pairs.jsonl").items
    assert item["chosen"] == tok("A complete answer.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # the cut response is trained as it was cut: no end-of-turn token after it
    assert item["rejected"] == tok(cands[2]["response"], add_special_tokens=False)["input_ids"]


# -- the creator on hand-made candidates ------------------------------------------------------------------
@pytest.fixture(scope="module")
def m1_dir(tiny_model, tmp_path_factory):
    """An exported M_t (the tiny base with a fresh adapter), as the loop exports it."""
    return str(SFTModule(BackboneConfig(model_name_or_path=tiny_model)).export(str(tmp_path_factory.mktemp("m1"))))


def prepared_run(root, force=False):
    """A run folder whose iteration 1 has its prompts and candidates done (written by hand, hashed)."""
    run = RunDir(root)
    run.claim("test config\n", 1, force)
    it = run.iter_dir(1)
    if not run.done("iter_1/candidates"):
        prompts = [{"id": f"t1-p{i}", "prompt": f"Question t1-p{i}?", "request": i} for i in range(2)]
        cands = [candidate(p["id"], k, text) for p in prompts
                 for k, text in enumerate(["Paris is the capital of France.", "I do not know, sorry."])]
        write_jsonl(it / "prompts.jsonl", prompts)
        run.mark_done("iter_1/prompts", {"kept": 2}, [it / "prompts.jsonl"])
        write_jsonl(it / "candidates.jsonl", cands)
        run.mark_done("iter_1/candidates", {"candidates": 4}, [it / "candidates.jsonl"])
    return run


def creator(tiny_model, run, **overrides):
    config = SelfRewardConfig(**{"judge_mode": "logit", "batch_size": 2, **overrides})
    return InstructionCreator(config, run, 1, BackboneConfig(model_name_or_path=tiny_model), show_progress=False)


# -- 4. judge seed -------------------------------------------------------------------------------------
def test_generative_judge_follows_the_configured_seed(tiny_model, m1_dir, tmp_path):
    def judgements(name, seed):
        run = prepared_run(tmp_path / name)
        creator(tiny_model, run, judge_mode="generative", judge_samples=2, judge_sampling=Sampling(1.0, 1.0, 8),
                seed=seed).ensure(m1_dir)
        return {r["id"]: r["outputs"] for r in records(run.iter_dir(1) / "judgements.jsonl")}

    first, again, other = judgements("a", 0), judgements("b", 0), judgements("c", 1)
    assert first == again  # same seed, same judgements
    assert len(first) == 4 and all(first[i] != other[i] for i in first)  # another seed, other samples


# -- 5. changed artifacts ------------------------------------------------------------------------------
def test_resume_refuses_artifacts_changed_by_hand(tiny_model, m1_dir, tmp_path):
    root = tmp_path / "run"
    creator(tiny_model, prepared_run(root)).ensure(m1_dir)
    assert prepared_run(root).done("iter_1/pairs")
    cands = root / "iter_1" / "candidates.jsonl"
    cands.write_text("".join(cands.read_text().splitlines(True)[:-1]))  # truncated by hand
    with pytest.raises(RuntimeError) as err:
        creator(tiny_model, prepared_run(root)).ensure(m1_dir)
    message = str(err.value)
    assert "iter_1/candidates.jsonl" in message and "'iter_1/candidates'" in message
    assert "--force true" in message and "manifest.json" in message
    # --force true accepts the file as it is, and records it: the next resume passes without force
    creator(tiny_model, prepared_run(root, force=True)).ensure(m1_dir)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["phases"]["iter_1/candidates"]["files"]["iter_1/candidates.jsonl"]["records"] == 3
    creator(tiny_model, prepared_run(root)).ensure(m1_dir)
    # an edit that keeps the size is caught by the sha256
    judgements = root / "iter_1" / "judgements.jsonl"
    text = judgements.read_text()
    judgements.write_text(text.replace('"prompt_id": "t1-p0"', '"prompt_id": "t1-p1"', 1))
    assert judgements.stat().st_size == len(text.encode())
    with pytest.raises(RuntimeError, match="iter_1/judgements.jsonl"):
        creator(tiny_model, prepared_run(root)).ensure(m1_dir)


# -- the loop ------------------------------------------------------------------------------------------
def tiny_loop(tiny_model, run_dir, force=False, **overrides):
    L.seed_everything(0)
    trainer = SRLMTrainer(accelerator="cpu", max_steps=1, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=str(run_dir), limit_val_batches=0, logger=True)
    model = SFTModule(BackboneConfig(model_name_or_path=tiny_model))
    data = SFTDataModule(max_length=256, max_prompt_length=192, batch_size=2, val_fraction=0.0)
    self_reward = SelfRewardConfig(**{**dict(num_prompts=2, few_shot=3, num_candidates=2, judge_mode="logit",
                                             prompt_sampling=Sampling(1.0, 1.0, 16),
                                             candidate_sampling=Sampling(1.0, 1.0, 8), batch_size=2), **overrides})
    return trainer.loop(model, data, run_dir=str(run_dir), iterations=1, self_reward=self_reward,
                        dpo=DPORoundConfig(max_steps=1, max_length=256, max_prompt_length=128), checkpoint_every=1,
                        force=force, evaluation=EvalConfig(enabled=False))


@pytest.mark.slow
def test_resumed_loop_refuses_a_truncated_artifact(tiny_model, tmp_path):
    run = tmp_path / "run"
    tiny_loop(tiny_model, run)
    cands = run / "iter_1" / "candidates.jsonl"
    assert len(records(cands)) > 1
    cands.write_text("".join(cands.read_text().splitlines(True)[:-1]))
    with pytest.raises(RuntimeError, match="iter_1/candidates.jsonl"):
        tiny_loop(tiny_model, run)
    manifest = tiny_loop(tiny_model, run, force=True)
    assert manifest["final_model"] == manifest["phases"]["iter_1/train"]["counts"]["model"]


# -- 2. positive examples only ---------------------------------------------------------------------------
@pytest.fixture
def positive_rounds(monkeypatch):
    """What each positive-examples round was given to train on."""
    seen = []
    original = loop_module.positive_round

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append(result)
        return result

    monkeypatch.setattr(loop_module, "positive_round", spy)
    return seen


@pytest.mark.slow
def test_positive_round_adds_positives_to_m1_data(tiny_model, tmp_path, positive_rounds, monkeypatch):
    import srlm.selfreward.creator as creator_module

    # The tiny model hardly ever ends a turn in 8 tokens, and a cut response is never a positive example:
    # count every candidate as finished, so that this round has positives to add.
    original = creator_module.positive_examples
    monkeypatch.setattr(creator_module, "positive_examples",
                        lambda cands, **kw: original([{**c, "finished": True} for c in cands], **kw))
    run = tmp_path / "run"
    manifest = tiny_loop(tiny_model, run, positive_only=True, positive_min_score=0.0)  # every scored response
    positives = records(run / "iter_1" / "positives.jsonl")
    assert positives
    ((_, data),) = positive_rounds
    # M1's settings (max_length 256 <= the old default max_prompt_length 640) and M1's IFT + EFT data
    assert (data.max_length, data.max_prompt_length, data.batch_size) == (256, 192, 2)
    ift_eft = len(load_sft_file("seed:ift.jsonl")) + len(load_sft_file("seed:eft_train.jsonl"))
    assert len(data.train_dataset) == ift_eft + len(positives)
    assert manifest["phases"]["iter_1/train"]["done"]
    assert (run / "iter_1" / "model" / "adapter_config.json").exists()
    assert Path(manifest["final_model"]) == run / "iter_1" / "model"


@pytest.mark.slow
def test_positive_round_without_positives_keeps_m_t(tiny_model, tmp_path):
    run = tmp_path / "run"
    manifest = tiny_loop(tiny_model, run, positive_only=True, positive_min_score=5.5)  # no response can reach it
    assert records(run / "iter_1" / "positives.jsonl") == []
    assert manifest["phases"]["iter_1/train"]["counts"]["model"] == str(run / "m1" / "model")
    assert Path(manifest["final_model"]) == run / "m1" / "model"
    assert not (run / "iter_1" / "model").exists()


@pytest.mark.slow
def test_anchored_rejection_takes_rejected_answers_from_m1(tiny_model, tmp_path):
    run = tmp_path / "run"
    manifest = tiny_loop(tiny_model, run, rejected_from="m1", allow_unfinished_chosen=True)
    anchors = [json.loads(x) for x in open(run / "iter_1" / "anchor_candidates.jsonl")]
    assert anchors and all(a["id"].split("-")[-1].startswith("a") for a in anchors)
    pairs = [json.loads(x) for x in open(run / "iter_1" / "pairs.jsonl")]
    anchor_ids = {a["id"] for a in anchors}
    assert pairs and all(p["rejected_id"] in anchor_ids and p["chosen_id"] not in anchor_ids for p in pairs)
    assert all("ref_rejected_logp" not in p for p in pairs)  # M1's log-probs are no reference for M_t
    assert manifest["phases"]["iter_1/train"]["done"]
    anchor = manifest["phases"]["iter_1/pairs"]["counts"]["anchor"]  # recorded for metrics.json and the report
    assert anchor["rejected_from"] == "m1" and anchor["candidates"] == len(anchors)
    assert anchor["pairs_rejecting_anchor"] == len(pairs) and sum(anchor["histogram"].values()) == len(anchors)
    from srlm.evaluation.report import write_report

    assert "rejected answers from m1" in write_report(str(run)).read_text()
    with pytest.raises(ValueError, match="sft_baseline"):
        tiny_loop(tiny_model, tmp_path / "other", rejected_from="sft")
