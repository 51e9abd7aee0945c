"""srlm against the usual way, on one model and one data set: generation, judging, SFT and DPO steps, memory.

    python benchmarks/run.py            # full run (SmolLM2-135M, fp32, CPU: about half an hour on 2 cores)
    python benchmarks/run.py --quick    # smaller sizes, a few minutes
    python benchmarks/run.py --model /path/to/hf_folder --quick   # another model (e.g. a tiny one, a dry run)

Each section runs in its own subprocess, so that each has its own peak resident memory
(``ru_maxrss``) and a crash in one does not lose the others; inside a section the baseline and
srlm run in the same process, on the same model and data, one after the other (baseline first),
and a sampling thread (psutil) records each one's peak RSS above what the process held when it
started. The parent prints one table (section, what, baseline, srlm, ratio, target, met) and
writes it with every detail as JSON (``--output``).

TRL is a benchmark-only extra (``pip install -e '.[bench]'``); without it the TRL baselines are
skipped with a note and the srlm figures are still measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, without installing srlm
    sys.path.insert(0, str(ROOT))

SEED_DIR = ROOT / "srlm" / "data" / "seed"
SECTIONS = ("generation", "judging", "sft", "dpo")
LN2 = math.log(2.0)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")  # srlm's BackboneConfig defaults


# ---------------------------------------------------------------------------------------------
# Sizes


@dataclass
class Sizes:
    """What each section runs; ``--quick`` shrinks what is cheap to shrink without changing the shape of the work."""

    gen_prompts: int = 8
    gen_samples: int = 4
    gen_new_tokens: int = 128
    gen_baseline_prompts: int = 8
    """Prompts the sequential baseline runs (each with gen_samples calls); tokens/s is a rate, so a subset is fair."""
    judge_items: int = 32
    """(question, reply) items judged: whole eval groups are taken until at least this many."""
    judge_new_tokens: int = 128
    judge_batch: int = 8
    sft_steps: int = 11
    """Optimizer steps; the first is warm-up and not timed."""
    dpo_steps: int = 8
    """Optimizer steps = one epoch over 2 x dpo_steps pairs, all timed with every reference pass (see section_dpo)."""
    dpo_shortest: bool = False
    """Take the shortest pairs (quick runs) instead of the first ones in file order."""
    dpo_on_the_fly: bool = True
    """Also time srlm with a reference pass every step (what TRL does by default)."""

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(gen_baseline_prompts=1, judge_items=8, sft_steps=3, dpo_steps=2, dpo_shortest=True,
                   dpo_on_the_fly=False)


# ---------------------------------------------------------------------------------------------
# Measuring helpers


def rss_mb() -> Optional[float]:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


class PeakRSS:
    """Peak resident memory while a block runs (sampled every 20 ms) and its rise above the start, in MiB."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.start, self.peak = interval, None, None
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_mb())

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.start = self.peak = rss_mb()
        if self.start is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.start is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_mb())

    def to_json(self) -> dict:
        if self.start is None:
            return {"peak_mb": None, "delta_mb": None}
        return {"peak_mb": round(self.peak, 1), "delta_mb": round(self.peak - self.start, 1)}


@dataclass
class Row:
    section: str
    what: str
    baseline: Optional[float] = None
    srlm: Optional[float] = None
    ratio: Optional[float] = None
    target: str = ""
    met: Optional[bool] = None
    note: str = ""


@dataclass
class Result:
    """What one section hands back to the parent."""

    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, *args, **kwargs) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        return row


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def at_least(r: Optional[float], target: float) -> Optional[bool]:
    return None if r is None else r >= target


def say(section: str, message: str) -> None:
    print(f"[{section}] {message}", flush=True)


def have_trl() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def quiet() -> Iterator[None]:
    """Hush library chatter (progress bars, deprecation notes) around a measured block."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------
# Model and data


def load_model(path: str):
    """The model for generation and judging: fp32, eval mode, as srlm loads it for inference."""
    from srlm.models.backbone import load_for_inference, load_tokenizer

    return load_for_inference(path, dtype="float32"), load_tokenizer(path)


def seed_prompts(n: int) -> list[str]:
    """User prompts: ``prompt`` fields of the IFT seed, else of the eval seed; first n distinct."""
    from srlm.data import records

    out: list[str] = []
    for name in ("ift.jsonl", "eft_eval.jsonl"):
        path = SEED_DIR / name
        if path.exists():
            for _, obj in records.iter_jsonl(path):
                if isinstance(obj.get("prompt"), str) and obj["prompt"] not in out:
                    out.append(obj["prompt"])
        if len(out) >= n:
            break
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} seed prompts in {SEED_DIR}, need {n}")
    return out[:n]


def eval_groups(min_items: int) -> list:
    """Whole ranked groups of the eval split, in file order, until they hold at least ``min_items`` replies."""
    from srlm.data import records

    groups = records.read_records(SEED_DIR / "eft_eval.jsonl", records.parse_ranked)
    out, n = [], 0
    for g in groups:
        if n >= min_items:
            break
        out.append(g)
        n += len(g.replies)
    return out


def preference_pairs(n: int, shortest: bool = False) -> list:
    """n preference pairs: prefs.jsonl when shipped, else eval-split rank-0 reply vs worst-ranked reply.

    ``shortest``: the n pairs with the shortest prompt + longer response (in characters), for quick runs.
    """
    from srlm.data import records

    path = SEED_DIR / "prefs.jsonl"
    if path.exists():
        pairs = records.read_records(path, records.parse_preference)
    else:
        pairs = []
        for g in records.read_records(SEED_DIR / "eft_eval.jsonl", records.parse_ranked):
            ranked = sorted(g.replies, key=lambda r: r.rank)
            if ranked[0].rank != ranked[-1].rank:
                pairs.append(records.PreferencePair(g.prompt, ranked[0].text, ranked[-1].text, g.id))
    if len(pairs) < n:
        raise RuntimeError(f"only {len(pairs)} preference pairs available, need {n}")
    if shortest:
        pairs = sorted(pairs, key=lambda p: len(p.prompt) + max(len(p.chosen), len(p.rejected)))
    return pairs[:n]


# ---------------------------------------------------------------------------------------------
# 1. Generation


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


# ---------------------------------------------------------------------------------------------
# 2. Judging


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

    def engine(share: bool = True) -> Engine:
        return Engine(model, [eos], pad, batch_size=sizes.judge_batch, share_prefix=share, seed=0)

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
        "generative_k1": run("generative k=1", GenerativeJudge(engine(), tok, template, samples=1, sampling=sampling)),
        "logit_no_prefix_sharing": run("logit, share_prefix=False", LogitJudge(engine(share=False), tok, template)),
        "logit": run("logit", LogitJudge(engine(), tok, template)),
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
    res.add("judging", f"judgements/s, generative k=1 vs k=3 ({n})", g3["judgements_per_s"], g1["judgements_per_s"],
            ratio(g1["judgements_per_s"], g3["judgements_per_s"]), note="info")
    res.add("judging", "judgements/s, logit: prefix sharing off vs on", ln["judgements_per_s"], lg["judgements_per_s"],
            ratio(lg["judgements_per_s"], ln["judgements_per_s"]), note="baseline = Engine(share_prefix=False)")
    reused = lg["engine_stats"]["prefix_tokens_reused"]
    res.add("judging", f"prefix tokens reused, logit (prefix {shared} tok, 1 forward/call)",
            ln["engine_stats"]["prefix_tokens_reused"], reused, None, "> 0", reused > 0,
            f"prefill tokens {ln['engine_stats']['prefill_tokens']} -> {lg['engine_stats']['prefill_tokens']}")
    for key, label in (("generative_k3", "generative k=3"), ("generative_k1", "generative k=1"), ("logit", "logit")):
        res.add("judging", f"pairwise accuracy, {label} ({d[key]['n_prompts']} prompts, {d[key]['n_pairs']} pairs)",
                None, d[key]["pairwise_accuracy"], note=f"parsed {d[key]['parsed']}/{len(items)}")
    res.details = d
    return res


# ---------------------------------------------------------------------------------------------
# Step clocks for Lightning and for the Hugging Face Trainer


def lightning_clock():
    import lightning as L

    class StepClock(L.Callback):
        """End time, loss and token counts of every training step."""

        def __init__(self):
            self.start: Optional[float] = None
            self.ends: list[float] = []
            self.losses: list[float] = []
            self.real: list[int] = []
            self.total: list[int] = []

        def on_train_start(self, trainer, module):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.ends.append(time.perf_counter())
            self.losses.append(float(outputs["loss"]))
            self.real.append(int(batch["attention_mask"].sum()))
            self.total.append(int(batch["input_ids"].numel()))

    return StepClock()


def hf_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.start: Optional[float] = None
            self.ends: list[float] = []
            self.losses: dict[int, float] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])

    return StepClock()


class RecordingCollator:
    """Wraps a collator and keeps each batch's real (attention-mask) and total token counts, in order."""

    def __init__(self, inner: Callable):
        self.inner, self.real, self.total = inner, [], []

    def __call__(self, examples):
        batch = self.inner(examples)
        mask = batch["attention_mask"]
        self.real.append(int(mask.sum()))
        self.total.append(int(mask.numel()))
        return batch


def timed_steps(ends: list[float]) -> float:
    """Seconds from the end of step 1 (warm-up) to the end of the last step."""
    if len(ends) < 2:
        raise RuntimeError(f"only {len(ends)} steps ran: need at least 2 (the first is not timed)")
    return ends[-1] - ends[0]


def lightning_trainer(steps: int, clock, root: str):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, callbacks=[clock], default_root_dir=root)


def hf_quiet(trainer) -> None:
    """Drop the callback that prints every step's log dict (disable_tqdm swaps the bar for it)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def hf_args(config_cls, root: str, steps: int, batch: int, lr: float, **extra):
    # bf16 and gradient checkpointing are TRL's defaults; srlm runs fp32 without checkpointing on CPU,
    # so TRL gets the same (bf16 autocast is several times slower on CPU, which would flatter srlm).
    return config_cls(output_dir=root, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                      logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False, fp16=False,
                      gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True, seed=0, **extra)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA)


def backbone_config(model_path: str):
    from srlm.models.backbone import BackboneConfig

    return BackboneConfig(model_name_or_path=model_path, dtype="float32", lora=True, lora_r=LORA["r"],
                          lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                          lora_target_modules=LORA["target_modules"])


def load_hf_model(model_path: str):
    import torch
    from transformers import AutoModelForCausalLM

    from srlm.models.backbone import resolve_model_path

    return AutoModelForCausalLM.from_pretrained(resolve_model_path(model_path), dtype=torch.float32,
                                                attn_implementation="sdpa")


# ---------------------------------------------------------------------------------------------
# 3. SFT steps


def section_sft(model_path: str, sizes: Sizes) -> Result:
    from srlm.data.chat import prompt_text
    from srlm.data.datamodule import SFTDataModule
    from srlm.models.backbone import load_tokenizer
    from srlm.models.optim import OptimConfig
    from srlm.models.sft import SFTModule

    res = Result()
    tmp = tempfile.mkdtemp(prefix="srlm-bench-sft-")
    ift = ["seed:ift.jsonl"] if (SEED_DIR / "ift.jsonl").exists() else []
    dm_args = dict(ift_files=ift, eft_files=["seed:eft_train.jsonl"], max_length=512, max_prompt_length=384,
                   batch_size=4, val_fraction=0.0, seed=0)
    examples = SFTDataModule(**dm_args).examples()
    tok = load_tokenizer(model_path)
    lr = 2e-4
    d: dict[str, Any] = {"examples": len(examples), "steps": sizes.sft_steps, "timed_steps": sizes.sft_steps - 1}

    base = None
    if have_trl():
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list([{"prompt": prompt_text(tok, ex.prompt), "completion": ex.response} for ex in examples])
        args = hf_args(SFTConfig, f"{tmp}/trl", sizes.sft_steps, 4, lr, max_length=512, completion_only_loss=True)
        with quiet():
            trainer = SFTTrainer(model=load_hf_model(model_path), args=args, train_dataset=data,
                                 processing_class=tok, peft_config=lora_config())
        clock, collator = hf_clock(), RecordingCollator(trainer.data_collator)
        trainer.data_collator = collator
        trainer.add_callback(clock)
        hf_quiet(trainer)
        with PeakRSS() as mem, quiet():
            trainer.train()
        n = sizes.sft_steps
        seconds = timed_steps(clock.ends[:n])
        real, total = sum(collator.real[1:n]), sum(collator.total[1:n])  # the collator may run one batch ahead
        base = {"seconds": seconds, "real_tokens": real, "tokens": total, "tokens_per_s": real / seconds,
                "padding_fraction": 1 - real / total, "losses": clock.losses, "memory": mem.to_json()}
        say("sft", f"TRL SFTTrainer: {real} real tokens in {seconds:.1f}s = {base['tokens_per_s']:.1f} tok/s, "
                   f"padding {base['padding_fraction']:.1%}")
        del trainer
        gc.collect()
    else:
        say("sft", "trl is not installed: TRL baseline skipped (pip install -e '.[bench]')")

    module = SFTModule(backbone_config(model_path), OptimConfig(lr=lr), export_dir=f"{tmp}/srlm-adapter")
    dm = SFTDataModule(**dm_args)
    clock = lightning_clock()
    with PeakRSS() as mem, quiet():
        lightning_trainer(sizes.sft_steps, clock, f"{tmp}/srlm").fit(module, datamodule=dm)
    seconds = timed_steps(clock.ends)
    real, total = sum(clock.real[1:]), sum(clock.total[1:])
    ours = {"seconds": seconds, "real_tokens": real, "tokens": total, "tokens_per_s": real / seconds,
            "padding_fraction": 1 - real / total, "losses": clock.losses, "memory": mem.to_json()}
    say("sft", f"srlm SFTModule: {real} real tokens in {seconds:.1f}s = {ours['tokens_per_s']:.1f} tok/s, "
               f"padding {ours['padding_fraction']:.1%}")

    note = "" if base else "trl not installed"
    r = ratio(ours["tokens_per_s"], base and base["tokens_per_s"])
    res.add("sft", f"real tokens/s, batch 4, <=512 tok, LoRA r=16 ({sizes.sft_steps - 1} timed steps)",
            base and base["tokens_per_s"], ours["tokens_per_s"], r, ">= 1.0x", at_least(r, 1.0), note)
    res.add("sft", "padding fraction (srlm < 10%)", base and base["padding_fraction"], ours["padding_fraction"],
            None, "< 10%", ours["padding_fraction"] < 0.10, note)
    d.update(trl=base, srlm=ours)
    res.details = d
    return res


# ---------------------------------------------------------------------------------------------
# 4. DPO steps


def section_dpo(model_path: str, sizes: Sizes) -> Result:
    from srlm.data import records
    from srlm.data.chat import prompt_text
    from srlm.data.datamodule import PreferenceDataModule
    from srlm.models.backbone import load_tokenizer
    from srlm.models.dpo import DPOModule
    from srlm.models.optim import OptimConfig

    res = Result()
    tmp = tempfile.mkdtemp(prefix="srlm-bench-dpo-")
    batch, steps, lr, beta = 2, sizes.dpo_steps, 5e-5, 0.1
    # One epoch over n_pairs, every step timed: each variant then times the very same pairs whatever
    # order its sampler picks, and all of its reference work (precompute or per-step) is counted.
    n_pairs = batch * steps
    pairs = preference_pairs(n_pairs, sizes.dpo_shortest)
    pairs_file = Path(tmp) / "pairs.jsonl"
    records.write_jsonl(pairs_file, pairs)
    tok = load_tokenizer(model_path)
    d: dict[str, Any] = {"pairs": n_pairs, "steps": steps, "timed_steps": steps, "batch_pairs": batch,
                         "source": "prefs.jsonl" if (SEED_DIR / "prefs.jsonl").exists() else "eft_eval.jsonl"}

    def summary(name: str, clock, ref_seconds: float, losses: list[float], mem: PeakRSS) -> dict:
        if clock.start is None or len(clock.ends) != steps:
            raise RuntimeError(f"{name}: {len(clock.ends)} steps ran, expected {steps}")
        step_seconds = clock.ends[-1] - clock.start
        seconds = step_seconds + ref_seconds
        out = {"step_seconds": step_seconds, "reference_precompute_seconds": ref_seconds, "seconds": seconds,
               "pairs_per_s": n_pairs / seconds, "first_step_loss": losses[0] if losses else None,
               "losses": losses, "memory": mem.to_json()}
        say("dpo", f"{name}: {out['pairs_per_s']:.3f} pairs/s ({n_pairs} pairs: steps {step_seconds:.1f}s + reference "
                   f"precompute {ref_seconds:.1f}s), first-step loss {out['first_step_loss']:.5f}")
        return out

    def run_trl(precompute: bool) -> dict:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        data = Dataset.from_list([{"prompt": prompt_text(tok, p.prompt), "chosen": p.chosen, "rejected": p.rejected}
                                  for p in pairs])
        args = hf_args(DPOConfig, f"{tmp}/trl-{precompute}", steps, batch, lr, beta=beta, max_length=512,
                       precompute_ref_log_probs=precompute)
        # The reference precompute runs before training (in __init__ in trl 1.x, when the train dataloader is
        # built in older releases): time every reference pass made before training starts, and the whole
        # precompute (data loading included) where the trainer has the method for it.
        clock = hf_clock()
        timer = {"passes": 0.0, "precompute": 0.0, "batches": 0}
        original_pass = DPOTrainer.compute_ref_log_probs
        original_precompute = getattr(DPOTrainer, "_precompute_ref_logps", None)

        def counted_pass(self, *a, **k):
            if clock.start is not None:  # a per-step reference pass: part of the step time already
                return original_pass(self, *a, **k)
            t0 = time.perf_counter()
            try:
                return original_pass(self, *a, **k)
            finally:
                timer["passes"] += time.perf_counter() - t0
                timer["batches"] += 1

        def timed_precompute(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return original_precompute(self, *a, **k)
            finally:
                timer["precompute"] += time.perf_counter() - t0

        DPOTrainer.compute_ref_log_probs = counted_pass
        if original_precompute is not None:
            DPOTrainer._precompute_ref_logps = timed_precompute
        try:
            with PeakRSS() as mem, quiet():
                model = load_hf_model(model_path)
                mem.start = rss_mb()  # count the trainer's own memory, not the weights both sides load
                trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                                     peft_config=lora_config(), callbacks=[clock])
                hf_quiet(trainer)
                trainer.train()
        finally:
            DPOTrainer.compute_ref_log_probs = original_pass
            if original_precompute is not None:
                DPOTrainer._precompute_ref_logps = original_precompute
        if precompute and timer["batches"] == 0:
            raise RuntimeError("TRL ran no reference pass before training (cached log-probs?): precompute not measured")
        losses = [clock.losses[k] for k in sorted(clock.losses)]
        ref_seconds = max(timer["passes"], timer["precompute"])
        out = summary(f"TRL DPOTrainer, precompute_ref_log_probs={precompute}", clock, ref_seconds, losses, mem)
        out["reference_batches"] = timer["batches"]
        del trainer
        gc.collect()
        return out

    def run_srlm(name: str, file: Path, precompute: bool) -> tuple[dict, DPOModule]:
        module = DPOModule(backbone_config(model_path), OptimConfig(lr=lr), beta=beta, precompute_reference=precompute,
                           export_dir=f"{tmp}/adapter-{name}")
        dm = PreferenceDataModule(pair_files=[str(file)], max_length=512, max_prompt_length=256, batch_size=batch,
                                  val_fraction=0.0, seed=0)
        timer = {"seconds": 0.0}
        original = module.on_fit_start

        def timed_fit_start():  # where DPOModule precomputes the reference log-probs
            t0 = time.perf_counter()
            original()
            timer["seconds"] += time.perf_counter() - t0

        module.on_fit_start = timed_fit_start
        clock = lightning_clock()
        with PeakRSS() as mem, quiet():
            lightning_trainer(steps, clock, f"{tmp}/{name}").fit(module, datamodule=dm)
        out = summary(f"srlm DPOModule ({name})", clock, timer["seconds"], clock.losses, mem)
        out["dataset_had_reference"] = dm.train_dataset.has_reference
        return out, dm

    if have_trl():
        d["trl_default"] = run_trl(False)
        d["trl_precompute"] = run_trl(True)
    else:
        say("dpo", "trl is not installed: TRL baselines skipped (pip install -e '.[bench]')")

    d["srlm_precompute"], dm = run_srlm("precompute", pairs_file, True)
    # Harvested: the same pairs carrying reference log-probs, as the engine records them while sampling from M_t.
    harvested = []
    for pair, item in zip(dm.train_dataset.pairs, dm.train_dataset.items):
        extra = dict(pair.extra, ref_chosen_logp=item["ref"][0], ref_rejected_logp=item["ref"][1])
        harvested.append(records.PreferencePair(pair.prompt, pair.chosen, pair.rejected, pair.id, extra))
    harvested_file = Path(tmp) / "pairs_harvested.jsonl"
    records.write_jsonl(harvested_file, harvested)
    d["srlm_harvested"], _ = run_srlm("harvested", harvested_file, True)
    if sizes.dpo_on_the_fly:
        d["srlm_on_the_fly"], _ = run_srlm("on-the-fly", pairs_file, False)

    trl_default, trl_pre = d.get("trl_default"), d.get("trl_precompute")
    pre, harv = d["srlm_precompute"], d["srlm_harvested"]
    note = "" if trl_default else "trl not installed"
    tps = lambda x: x and x["pairs_per_s"]  # noqa: E731
    r = ratio(pre["pairs_per_s"], tps(trl_default))
    res.add("dpo", f"pairs/s incl. reference: srlm precompute vs TRL default ({n_pairs} pairs, 1 epoch)",
            tps(trl_default), pre["pairs_per_s"], r, ">= 1.5x", at_least(r, 1.5), note)
    res.add("dpo", "pairs/s incl. reference: srlm precompute vs TRL precompute", tps(trl_pre), pre["pairs_per_s"],
            ratio(pre["pairs_per_s"], tps(trl_pre)), note=note or "info")
    res.add("dpo", "pairs/s: srlm harvested reference vs TRL default", tps(trl_default), harv["pairs_per_s"],
            ratio(harv["pairs_per_s"], tps(trl_default)), note=(note or "no reference pass") +
            ("" if harv["dataset_had_reference"] else "; WARNING: reference was recomputed"))
    if "srlm_on_the_fly" in d:
        fly = d["srlm_on_the_fly"]
        res.add("dpo", "pairs/s: srlm on-the-fly reference vs TRL default", tps(trl_default), fly["pairs_per_s"],
                ratio(fly["pairs_per_s"], tps(trl_default)), note=note or "same reference work as TRL default")
    for key, label in (("trl_default", "TRL default"), ("trl_precompute", "TRL precompute"),
                       ("srlm_precompute", "srlm precompute"), ("srlm_harvested", "srlm harvested"),
                       ("srlm_on_the_fly", "srlm on-the-fly")):
        if d.get(key) and d[key]["first_step_loss"] is not None:
            loss = d[key]["first_step_loss"]
            res.add("dpo", f"first-step loss, {label} (ln 2 = {LN2:.4f})", None, loss, None, "= ln 2 +- 1e-3",
                    abs(loss - LN2) < 1e-3)
    res.details = d
    return res


# ---------------------------------------------------------------------------------------------
# Driver


RUNNERS = {"generation": section_generation, "judging": section_judging, "sft": section_sft, "dpo": section_dpo}


def run_child(name: str, model_path: str, sizes: Sizes, out: Path, threads: Optional[int] = None) -> None:
    """Run one section in this process and write its rows and details (plus this process's peak RSS) to ``out``."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import lightning  # noqa: F401  (imported first: it sets its loggers' levels on import)
    import torch
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING)
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "datasets", "srlm"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    result = RUNNERS[name](model_path, sizes)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result.details["section_seconds"] = time.perf_counter() - t0
    result.details["process_peak_rss_mb"] = peak_mb
    out.write_text(json.dumps({"rows": [r.__dict__ for r in result.rows], "details": result.details}, default=str))


def memory_rows(sections: dict[str, dict]) -> list[Row]:
    """Section 5: each section's process peak, and each method's rise in RSS while it ran."""
    rows = []
    pairs = {"generation": ("baseline", "srlm", "sequential generate vs Engine"),
             "sft": ("trl", "srlm", "TRL SFTTrainer vs SFTModule"),
             "dpo": ("trl_default", "srlm_precompute", "TRL DPO default vs srlm precompute")}
    for name, d in sections.items():
        if "process_peak_rss_mb" not in d:
            continue
        rows.append(Row("memory", f"peak RSS of the {name} process (MiB)", None, d["process_peak_rss_mb"],
                        note="whole section, model(s) included"))
        if name in pairs:
            b, s, label = pairs[name]
            mb = (d.get(b) or {}).get("memory", {}).get("delta_mb")
            ms = (d.get(s) or {}).get("memory", {}).get("delta_mb")
            rows.append(Row("memory", f"RSS rise while running (MiB): {label}", mb, ms, ratio(mb, ms),
                            note="ratio = baseline / srlm (> 1: srlm uses less)"))
    judging = sections.get("judging", {})
    if "generative_k3" in judging:
        rows.append(Row("memory", "RSS rise while running (MiB): judge generative k=3 vs logit",
                        judging["generative_k3"]["memory"]["delta_mb"], judging["logit"]["memory"]["delta_mb"],
                        ratio(judging["generative_k3"]["memory"]["delta_mb"], judging["logit"]["memory"]["delta_mb"]),
                        note="ratio = baseline / srlm (> 1: srlm uses less)"))
    return rows


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.4g}" if abs(value) < 10 else f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def table(rows: list[Row]) -> str:
    header = ["section", "what", "baseline", "srlm", "ratio", "target", "met", "note"]
    body = [[r.section, r.what, fmt(r.baseline), fmt(r.srlm), (fmt(r.ratio) + "x") if r.ratio is not None else "-",
             r.target or "-", fmt(r.met) if r.met is not None else "-", r.note] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    sep = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(b) for b in body])


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes on 2 CPU cores)")
    p.add_argument("--model", default="embedded:smollm2-135m-instruct",
                   help="model: embedded:smollm2-135m-instruct (default), a local Hugging Face folder or a cached hub id")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results.json"), help="JSON results file")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--threads", type=int, help="torch threads in each section (default: torch's, one per core)")
    p.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section in this process
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.section:
        run_child(args.section, args.model, sizes, Path(args.child_out), args.threads)
        return 0

    from srlm.models.backbone import resolve_model_path

    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    model_path = resolve_model_path(args.model)  # convert the embedded model once, before the children start
    rows: list[Row] = []
    details: dict[str, dict] = {}
    started = time.perf_counter()
    load_before = os.getloadavg()
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        with tempfile.TemporaryDirectory(prefix="srlm-bench-") as tmp:
            out = Path(tmp) / "section.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--child-out", str(out),
                   "--model", model_path] + (["--quick"] if args.quick else []) + \
                  (["--threads", str(args.threads)] if args.threads else [])
            env = dict(os.environ, HF_DATASETS_CACHE=str(Path(tmp) / "hf-datasets"), TOKENIZERS_PARALLELISM="false")
            code = subprocess.call(cmd, env=env)
            if code != 0 or not out.exists():
                rows.append(Row(name, "section failed", note=f"exit code {code}; see the log above"))
                details[name] = {"error": f"exit code {code}"}
                continue
            data = json.loads(out.read_text())
        rows += [Row(**r) for r in data["rows"]]
        details[name] = data["details"]
    rows += memory_rows(details)

    import torch

    report = {
        "model": args.model, "resolved_model": model_path, "quick": args.quick, "sizes": sizes.__dict__,
        "memory_method": "each section in its own subprocess (ru_maxrss = section peak); per-method RSS rise "
                         "sampled every 20 ms with psutil, baseline and srlm one after the other in that process",
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "cpu_count": os.cpu_count(), "trl": _version("trl") if have_trl() else None},
        "seconds": time.perf_counter() - started,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "rows": [r.__dict__ for r in rows], "details": details,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nsrlm benchmarks, model {args.model}, {'quick' if args.quick else 'full'} run, "
          f"{report['seconds'] / 60:.1f} min, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"trl {report['platform']['trl'] or 'not installed'}\n")
    print(table(rows))
    busy = load_before[0]  # the load at the start: later averages count the benchmark's own threads
    if busy > 0.5 * (os.cpu_count() or 1):
        print(f"\nnote: the machine was busy (load average {busy:.1f} on {os.cpu_count()} cores): absolute figures are "
              "low and noisy; ratios compare runs made one after the other in the same process.")
    print(f"\nwritten to {args.output}")
    return 0


def _version(package: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
