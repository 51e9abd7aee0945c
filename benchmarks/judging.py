"""Section 2, judging: the paper's generative judge (k samples) against srlm's one-pass logit judge, and the
engine's prefix tree (each question shared by its replies) against the common prefix only."""

from __future__ import annotations

import time

from fixtures import eval_groups, load_model
from harness import PeakRSS, Result, Sizes, at_least, quiet, ratio, say


def section_judging(model_path: str, sizes: Sizes) -> Result:
    import torch

    from srlm.metrics import RewardMetrics
    from srlm.prompts import load_template
    from srlm.inference.engine import Engine, Sampling, common_prefix
    from srlm.inference.judge import GenerativeJudge, LogitJudge

    res = Result()
    model, tok = load_model(model_path)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    template = load_template("judge_additive", "question", "response")
    groups = eval_groups(sizes.judge_items)
    items = [(g.prompt, r.text) for g in groups for r in g.replies]
    sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=sizes.judge_new_tokens)

    def engine(share: bool = True, tree: bool = True, samples_share: bool = True) -> Engine:
        return Engine(model, [eos], pad, batch_size=sizes.judge_batch, share_prefix=share, share_groups=tree, seed=0,
                      share_samples=samples_share)

    with quiet():  # warm-up on two items
        LogitJudge(engine(), tok, template).score(items[:2])

    def run(name: str, judge) -> dict:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            results = judge.score(items)
            seconds = time.perf_counter() - t0
        scores = [r.score if r.score is not None else float("nan") for r in results]
        metrics, k = RewardMetrics(), 0
        for g in groups:
            metrics.update(scores=[scores[k:k + len(g.replies)]], ranks=[[r.rank for r in g.replies]])
            k += len(g.replies)
        m = {key: float(v) for key, v in metrics.compute().items()}
        out = {"items": len(items), "seconds": seconds, "judgements_per_s": len(items) / seconds,
               "parsed": sum(s == s for s in scores), "pairwise_accuracy": m["pairwise_accuracy"],
               "n_prompts": int(m["n_prompts"]), "n_pairs": int(m["n_pairs"]), "metrics": m,
               "engine_stats": dict(judge.engine.stats), "memory": mem.to_json()}
        say("judging", f"{name}: {len(items)} items in {seconds:.1f}s = {out['judgements_per_s']:.2f}/s, "
                       f"parsed {out['parsed']}/{len(items)}, pairwise accuracy {m['pairwise_accuracy']:.3f} "
                       f"({out['n_pairs']} pairs), stats {judge.engine.stats}")
        return out

    torch.manual_seed(0)
    d = {
        "generative_k3": run("generative k=3", GenerativeJudge(engine(), tok, template, samples=3, sampling=sampling)),
        "generative_k3_repeated": run("generative k=3, prompt key/values repeated per sample",
                                      GenerativeJudge(engine(samples_share=False), tok, template, samples=3,
                                                      sampling=sampling)),
        "generative_k1": run("generative k=1", GenerativeJudge(engine(), tok, template, samples=1, sampling=sampling)),
        "logit_no_prefix_sharing": run("logit, share_prefix=False", LogitJudge(engine(share=False), tok, template)),
        "logit_common_prefix": run("logit, common prefix only", LogitJudge(engine(tree=False), tok, template)),
        "logit": run("logit, prefix tree", LogitJudge(engine(), tok, template)),
    }
    logit_judge = LogitJudge(engine(), tok, template)
    prompt_ids = [logit_judge.prompt_ids(q, a) + logit_judge.cue_ids for q, a in items]
    shared = min(common_prefix(prompt_ids), min(len(p) for p in prompt_ids) - 1)
    d["prefix"] = {"shared_prefix_tokens": shared, "mean_prompt_tokens": sum(map(len, prompt_ids)) / len(prompt_ids),
                   "prefix_forwards_per_call": 1}

    g3, g1, lg, ln = d["generative_k3"], d["generative_k1"], d["logit"], d["logit_no_prefix_sharing"]
    n = f"{len(items)} items"
    r = ratio(lg["judgements_per_s"], g3["judgements_per_s"])
    res.add("judging", f"judgements/s, logit vs generative k=3 ({n})", g3["judgements_per_s"], lg["judgements_per_s"],
            r, ">= 10x", at_least(r, 10.0))
    g3r = d["generative_k3_repeated"]
    res.add("judging", f"judgements/s, generative k=3: prompt key/values shared by the samples vs repeated ({n})",
            g3r["judgements_per_s"], g3["judgements_per_s"], ratio(g3["judgements_per_s"], g3r["judgements_per_s"]),
            note="baseline = Engine(share_samples=False)")
    res.add("judging", "RSS rise (MiB), generative k=3: repeated vs shared prompt key/values",
            g3r["memory"]["delta_mb"], g3["memory"]["delta_mb"],
            ratio(g3r["memory"]["delta_mb"], g3["memory"]["delta_mb"]), note="ratio = times less")
    res.add("judging", f"judgements/s, generative k=1 vs k=3 ({n})", g3["judgements_per_s"], g1["judgements_per_s"],
            ratio(g1["judgements_per_s"], g3["judgements_per_s"]), note="info")
    res.add("judging", "judgements/s, logit: prefix sharing off vs on", ln["judgements_per_s"], lg["judgements_per_s"],
            ratio(lg["judgements_per_s"], ln["judgements_per_s"]), note="baseline = Engine(share_prefix=False)")
    lc = d["logit_common_prefix"]
    res.add("judging", "judgements/s, native logit judge, prefix tree vs common prefix", lc["judgements_per_s"],
            lg["judgements_per_s"], ratio(lg["judgements_per_s"], lc["judgements_per_s"]),
            note=f"baseline = Engine(share_groups=False); question tokens reused "
                 f"{lg['engine_stats']['group_tokens_reused']}")
    reused = lg["engine_stats"]["prefix_tokens_reused"]
    res.add("judging", f"prefix tokens reused, logit (prefix {shared} tok, 1 forward/call)",
            ln["engine_stats"]["prefix_tokens_reused"], reused, None, "> 0", reused > 0,
            f"prefill tokens {ln['engine_stats']['prefill_tokens']} -> {lg['engine_stats']['prefill_tokens']}")
    for key, label in (("generative_k3", "generative k=3"), ("generative_k1", "generative k=1"), ("logit", "logit")):
        res.add("judging", f"pairwise accuracy, {label} ({d[key]['n_prompts']} prompts, {d[key]['n_pairs']} pairs)",
                None, d[key]["pairwise_accuracy"], note=f"parsed {d[key]['parsed']}/{len(items)}")
    res.details = d
    return res
