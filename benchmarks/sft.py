"""Section 3, SFT steps: TRL's ``SFTTrainer`` against srlm's ``SFTModule`` + ``SFTDataModule`` under Lightning."""

from __future__ import annotations

import gc
import tempfile
from typing import Any

from fixtures import SEED_DIR, backbone_config, hf_args, hf_quiet, lightning_trainer, load_hf_model, lora_config
from harness import (PeakRSS, RecordingCollator, Result, Sizes, at_least, have_trl, hf_clock, lightning_clock, quiet,
                     ratio, say, timed_steps)


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
