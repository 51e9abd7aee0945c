"""Section 4, DPO steps: TRL's ``DPOTrainer`` (reference per step, or precomputed) against srlm's ``DPOModule``.

One epoch over ``2 x dpo_steps`` pairs, every step timed, so each variant times the very same pairs
whatever order its sampler picks, and all of its reference work is counted:

- srlm: ``DPOModule`` precomputes the reference log-probs in ``on_fit_start`` (timed around it), or
  reads them from harvested pairs (no reference pass), or runs one every step (on the fly).
- TRL, through its public API only: the default runs the reference inside every step; with
  ``precompute_ref_log_probs`` the precompute runs before training, so its time is the set-up time
  (``DPOTrainer(...)`` until training begins) beyond the default variant's set-up on the same data.
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fixtures import SEED_DIR, backbone_config, hf_args, hf_quiet, lightning_trainer, load_hf_model, lora_config, \
    preference_pairs
from harness import (LN2, PeakRSS, Result, Sizes, at_least, have_trl, hf_clock, lightning_clock, quiet, ratio, rss_mb,
                     say)

BATCH, LR, BETA = 2, 5e-5, 0.1


@dataclass
class Setting:
    """What every variant of the section shares."""

    model_path: str
    tmp: Path
    pairs: list
    steps: int

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)


def summary(s: Setting, name: str, clock, ref_seconds: float, losses: list[float], mem: PeakRSS) -> dict:
    """Pairs/s over the timed steps plus the reference work done before them; the first step's loss."""
    if clock.start is None or len(clock.ends) != s.steps:
        raise RuntimeError(f"{name}: {len(clock.ends)} steps ran, expected {s.steps}")
    step_seconds = clock.ends[-1] - clock.start
    seconds = step_seconds + ref_seconds
    out = {"step_seconds": step_seconds, "reference_precompute_seconds": ref_seconds, "seconds": seconds,
           "pairs_per_s": s.n_pairs / seconds, "first_step_loss": losses[0] if losses else None,
           "losses": losses, "memory": mem.to_json()}
    say("dpo", f"{name}: {out['pairs_per_s']:.3f} pairs/s ({s.n_pairs} pairs: steps {step_seconds:.1f}s + reference "
               f"precompute {ref_seconds:.1f}s), first-step loss {out['first_step_loss']:.5f}")
    return out


def run_trl(s: Setting, tok, precompute: bool, default_setup: float = 0.0) -> dict:
    """One TRL run; ``default_setup``: the set-up seconds of the default variant, subtracted from the precompute's."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from srlm.data.chat import prompt_text

    data = Dataset.from_list([{"prompt": prompt_text(tok, p.prompt), "chosen": p.chosen, "rejected": p.rejected}
                              for p in s.pairs])
    args = hf_args(DPOConfig, f"{s.tmp}/trl-{precompute}", s.steps, BATCH, LR, beta=BETA, max_length=512,
                   precompute_ref_log_probs=precompute)
    clock = hf_clock()
    with PeakRSS() as mem, quiet():
        model = load_hf_model(s.model_path)
        mem.start = rss_mb()  # count the trainer's own memory, not the weights both sides load
        t0 = time.perf_counter()
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                             peft_config=lora_config(), callbacks=[clock])
        hf_quiet(trainer)
        trainer.train()
    setup = clock.start - t0  # construction and what train() does before its first step
    has_reference = {"ref_chosen_logps", "ref_rejected_logps"} <= set(trainer.train_dataset.column_names)
    if precompute and not has_reference:
        raise RuntimeError("TRL's train dataset has no precomputed reference log-probs: precompute not measured")
    losses = [clock.losses[k] for k in sorted(clock.losses)]
    ref_seconds = max(setup - default_setup, 0.0) if precompute else 0.0
    out = summary(s, f"TRL DPOTrainer, precompute_ref_log_probs={precompute}", clock, ref_seconds, losses, mem)
    out["setup_seconds"] = setup
    del trainer
    gc.collect()
    return out


def run_srlm(s: Setting, name: str, file: Path, precompute: bool):
    """One srlm run; returns its summary and the DataModule (whose pairs then hold the reference log-probs)."""
    from srlm.data.datamodule import PreferenceDataModule
    from srlm.models.dpo import DPOModule
    from srlm.models.optim import OptimConfig

    module = DPOModule(backbone_config(s.model_path), OptimConfig(lr=LR), beta=BETA, precompute_reference=precompute,
                       export_dir=f"{s.tmp}/adapter-{name}")
    dm = PreferenceDataModule(pair_files=[str(file)], max_length=512, max_prompt_length=256, batch_size=BATCH,
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
        lightning_trainer(s.steps, clock, f"{s.tmp}/{name}").fit(module, datamodule=dm)
    out = summary(s, f"srlm DPOModule ({name})", clock, timer["seconds"], clock.losses, mem)
    out["dataset_had_reference"] = dm.train_dataset.has_reference
    return out, dm


def harvested_file(s: Setting, dm) -> Path:
    """The same pairs carrying reference log-probs, as the engine records them while sampling from M_t."""
    from srlm.data import records

    harvested = []
    for pair, item in zip(dm.train_dataset.pairs, dm.train_dataset.items):
        extra = dict(pair.extra, ref_chosen_logp=item["ref"][0], ref_rejected_logp=item["ref"][1])
        harvested.append(records.PreferencePair(pair.prompt, pair.chosen, pair.rejected, pair.id, extra))
    path = s.tmp / "pairs_harvested.jsonl"
    records.write_jsonl(path, harvested)
    return path


def add_rows(res: Result, d: dict, n_pairs: int) -> None:
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


def section_dpo(model_path: str, sizes: Sizes) -> Result:
    from srlm.data import records
    from srlm.models.backbone import load_tokenizer

    s = Setting(model_path, Path(tempfile.mkdtemp(prefix="srlm-bench-dpo-")),
                preference_pairs(BATCH * sizes.dpo_steps, sizes.dpo_shortest), sizes.dpo_steps)
    pairs_file = s.tmp / "pairs.jsonl"
    records.write_jsonl(pairs_file, s.pairs)
    d: dict[str, Any] = {"pairs": s.n_pairs, "steps": s.steps, "timed_steps": s.steps, "batch_pairs": BATCH,
                         "source": "prefs.jsonl" if (SEED_DIR / "prefs.jsonl").exists() else "eft_eval.jsonl"}
    if have_trl():
        tok = load_tokenizer(model_path)
        d["trl_default"] = run_trl(s, tok, False)
        d["trl_precompute"] = run_trl(s, tok, True, d["trl_default"]["setup_seconds"])
    else:
        say("dpo", "trl is not installed: TRL baselines skipped (pip install -e '.[bench]')")
    d["srlm_precompute"], dm = run_srlm(s, "precompute", pairs_file, True)
    d["srlm_harvested"], _ = run_srlm(s, "harvested", harvested_file(s, dm), True)
    if sizes.dpo_on_the_fly:
        d["srlm_on_the_fly"], _ = run_srlm(s, "on-the-fly", pairs_file, False)
    res = Result(details=d)
    add_rows(res, d, s.n_pairs)
    return res
