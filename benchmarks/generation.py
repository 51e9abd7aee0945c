"""Section 1, generation: sequential ``model.generate`` per prompt and sample against srlm's batched ``Engine``."""

from __future__ import annotations

import time

from fixtures import load_model, seed_prompts
from harness import PeakRSS, Result, Sizes, at_least, quiet, ratio, say


def section_generation(model_path: str, sizes: Sizes) -> Result:
    import torch

    from srlm.data.chat import encode_prompt
    from srlm.inference.engine import Engine, Sampling

    res = Result()
    model, tok = load_model(model_path)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompts = [encode_prompt(tok, p) for p in seed_prompts(sizes.gen_prompts)]
    cfg = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=sizes.gen_new_tokens)

    def hf_sample(ids: list[int], max_new: int) -> int:
        x = torch.tensor([ids])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, temperature=cfg.temperature,
                             top_p=cfg.top_p, top_k=0, max_new_tokens=max_new, pad_token_id=pad, eos_token_id=eos)
        new = out[0, x.shape[1]:].tolist()
        return new.index(eos) + 1 if eos in new else len(new)  # count the end token, as the engine does

    # Warm-up: first calls pay for lazy initialisation (both paths share the model).
    with torch.inference_mode(), quiet():
        hf_sample(prompts[0], 4)
        Engine(model, [eos], pad, batch_size=2).generate(prompts[:2], 2, Sampling(0.7, 0.9, 4))

    torch.manual_seed(0)
    base_prompts = prompts[:sizes.gen_baseline_prompts]
    with PeakRSS() as mem_b, torch.inference_mode(), quiet():
        t0 = time.perf_counter()
        base_tokens = sum(hf_sample(p, cfg.max_new_tokens) for p in base_prompts for _ in range(sizes.gen_samples))
        base_s = time.perf_counter() - t0
    base_tps = base_tokens / base_s
    say("generation", f"sequential model.generate: {len(base_prompts)} prompts x {sizes.gen_samples} samples, "
                      f"{base_tokens} tokens in {base_s:.1f}s = {base_tps:.1f} tok/s")

    engine = Engine(model, [eos], pad, batch_size=sizes.gen_prompts, seed=0)
    with PeakRSS() as mem_s:
        t0 = time.perf_counter()
        samples = engine.generate(prompts, sizes.gen_samples, cfg)
        srlm_s = time.perf_counter() - t0
    srlm_tokens = sum(len(s.token_ids) for group in samples for s in group)
    srlm_tps = srlm_tokens / srlm_s
    say("generation", f"srlm Engine: {len(prompts)} prompts x {sizes.gen_samples} samples, "
                      f"{srlm_tokens} tokens in {srlm_s:.1f}s = {srlm_tps:.1f} tok/s")

    r = ratio(srlm_tps, base_tps)
    res.add("generation", f"tokens/s, {len(prompts)}x{sizes.gen_samples} samples, {cfg.max_new_tokens} new",
            base_tps, srlm_tps, r, ">= 10x", at_least(r, 10.0),
            f"baseline: one model.generate per prompt and sample, on {len(base_prompts)} prompt(s)")
    res.details = {
        "baseline": {"prompts": len(base_prompts), "samples": sizes.gen_samples, "tokens": base_tokens,
                     "seconds": base_s, "tokens_per_s": base_tps, "memory": mem_b.to_json()},
        "srlm": {"prompts": len(prompts), "samples": sizes.gen_samples, "tokens": srlm_tokens, "seconds": srlm_s,
                 "tokens_per_s": srlm_tps, "finished": sum(s.finished for g in samples for s in g),
                 "engine_stats": dict(engine.stats), "memory": mem_s.to_json()},
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens},
    }
    return res
