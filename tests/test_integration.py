"""Integration tests on the embedded SmolLM2-135M (marked slow; CI runs them)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_cached_conversion_has_the_gguf_logits():
    from transformers import AutoModelForCausalLM

    from srlm.models.backbone import EMBEDDED, _embedded_gguf, resolve_model_path

    gguf = _embedded_gguf("smollm2-135m-instruct")
    folder = resolve_model_path("embedded:smollm2-135m-instruct")
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 30, 198]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
    assert EMBEDDED and torch.equal(a, b)


def test_smoke_loop_on_the_embedded_model(tmp_path):
    run = tmp_path / "smoke"
    subprocess.run([sys.executable, "main.py", "loop", "--config", "configs/smoke.yaml", f"--run_dir={run}",
                    "--trainer.enable_progress_bar=false"], cwd=REPO, check=True, timeout=1200)
    manifest = json.loads((run / "manifest.json").read_text())
    for phase in ("m1", "iter_1/prompts", "iter_1/candidates", "iter_1/judgements", "iter_1/pairs", "iter_1/train",
                  "eval/m1", "eval/iter_1"):
        assert manifest["phases"][phase]["done"], phase
    for name in ("prompts", "candidates", "judgements", "pairs"):
        rows = [json.loads(x) for x in open(run / "iter_1" / f"{name}.jsonl")]
        assert rows and len({r["id"] for r in rows}) == len(rows)
    assert (run / "report.md").exists() and len(list((run / "plots").glob("*.png"))) == 4
    assert (run / "plots" / "learning_curve.png").exists()
    for name in ("base", "m1", "iter_1"):  # IFEval and the judge for M0, M1, M2
        assert manifest["phases"][f"ifeval/{name}"]["counts"]["n_prompts"] == 4
        assert manifest["phases"][f"eval/{name}"]["done"]


@pytest.mark.skipif(not (SHARED_DATA / "oasst1-en-sample.jsonl").exists(), reason="../shared/data is absent")
def test_evaluate_on_openassistant_sample_matches_scipy(tmp_path):
    from scipy import stats

    out = tmp_path / "eval"
    subprocess.run([sys.executable, "main.py", "evaluate", f"--eval_file={SHARED_DATA / 'oasst1-en-sample.jsonl'}",
                    f"--output_dir={out}", "--max_prompts=8", "--judge_mode=logit"], cwd=REPO, check=True, timeout=1200)
    metrics = json.loads((out / "reward_metrics.json").read_text())
    rows = [json.loads(x) for x in open(out / "reward_scores.jsonl")]
    assert metrics["n_prompts"] == 8 and len({r["reply_id"] for r in rows}) == len(rows)
    groups = {}
    for r in rows:
        groups.setdefault(r["prompt_id"], []).append(r)
    rhos, taus = [], []
    for g in groups.values():
        s, h = [r["model_score"] for r in g], [-r["human_rank"] for r in g]
        if len(set(s)) > 1 and len(set(h)) > 1:
            rhos.append(stats.spearmanr(s, h).statistic)
            taus.append(stats.kendalltau(s, h).statistic)
    assert metrics["spearman"] == pytest.approx(float(np.mean(rhos)), abs=1e-9)
    assert metrics["kendall_tau"] == pytest.approx(float(np.mean(taus)), abs=1e-9)
    pairs = agree = 0
    for g in groups.values():
        for i, a in enumerate(g):
            for b in g[i + 1:]:
                if a["human_rank"] != b["human_rank"]:
                    pairs += 1
                    better, worse = (a, b) if a["human_rank"] < b["human_rank"] else (b, a)
                    agree += 1.0 if better["model_score"] > worse["model_score"] else (
                        0.5 if better["model_score"] == worse["model_score"] else 0.0)
    assert metrics["n_pairs"] == pairs and metrics["pairwise_accuracy"] == pytest.approx(agree / pairs, abs=1e-12)
