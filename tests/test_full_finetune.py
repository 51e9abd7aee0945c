"""Full fine-tuning in the loop (backbone.lora false): M_t is a whole model folder, loaded by every later phase."""

import csv
import json
import math

import lightning as L
import pytest
from transformers import AutoModelForCausalLM

from srlm.data.datamodule import SFTDataModule
from srlm.inference.loading import load_engine, release, resolve_model
from srlm.models.backbone import BackboneConfig, is_full_model
from srlm.models.sft import SFTModule
from srlm.selfreward.config import DPORoundConfig, EvalConfig, SelfRewardConfig
from srlm.inference.engine import Sampling
from srlm.trainer import SRLMTrainer


@pytest.mark.slow  # a whole two-iteration loop, twice
@pytest.mark.parametrize("precompute", [True, False])
def test_two_iteration_loop_with_full_fine_tuning(tiny_model, tmp_path, precompute):
    L.seed_everything(0)
    run = tmp_path / "run"
    trainer = SRLMTrainer(accelerator="cpu", max_steps=1, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=str(run), limit_val_batches=0, logger=True, log_every_n_steps=1)
    model = SFTModule(BackboneConfig(model_name_or_path=tiny_model, lora=False))
    data = SFTDataModule(max_length=256, max_prompt_length=192, batch_size=2, val_fraction=0.0)
    self_reward = SelfRewardConfig(num_prompts=2, few_shot=3, num_candidates=2, judge_mode="logit", batch_size=2,
                                   prompt_sampling=Sampling(1.0, 1.0, 16), candidate_sampling=Sampling(1.0, 1.0, 8),
                                   allow_unfinished_chosen=True)
    manifest = trainer.loop(model, data, run_dir=str(run), iterations=2, self_reward=self_reward,
                            dpo=DPORoundConfig(max_steps=1, max_length=256, max_prompt_length=128,
                                                precompute_reference=precompute),
                            checkpoint_every=1, evaluation=EvalConfig(enabled=False))
    for name in ("m1", "iter_1", "iter_2"):
        assert is_full_model(run / name / "model"), name  # a whole HF model, no adapter
    trained = [t for t in (1, 2) if manifest["phases"][f"iter_{t}/train"]["counts"].get("pairs")]
    assert trained, manifest["phases"]
    for t in trained:  # each round starts from M_t with M_t as its reference: loss ln 2
        (metrics,) = (run / f"iter_{t}" / "dpo").rglob("metrics.csv")
        first = next(r for r in csv.DictReader(metrics.open()) if r.get("loss"))
        assert abs(float(first["loss"]) - math.log(2)) < 1e-3
    # evaluation commands take the run's folder as the model
    assert resolve_model(str(run / "iter_2")) == (str(run / "iter_2" / "model"), None)
    assert json.loads((run / "iter_2" / "model" / "srlm_lineage.json").read_text())["base_model"] == tiny_model
    # ... and load it as the whole model M3 (the weights DPO wrote, not the base's)
    import torch
    from safetensors.torch import load_file

    engine, tokenizer = load_engine(str(run / "iter_2"), batch_size=2)
    saved = load_file(str(run / "iter_2" / "model" / "model.safetensors"))
    loaded = engine.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert any(not torch.equal(base[k], v) for k, v in saved.items())
    release(engine)


def test_full_fine_tuning_round_resumes_mid_way_with_the_reference_of_its_start(tiny_model, tmp_path):
    """Full fine-tuning keeps no copy of M_t: a round resumed after some updates must reuse the reference
    log-probs computed before its first update (carried in the checkpoint), not fail or recompute them."""
    import torch

    from srlm.data.datamodule import PreferenceDataModule
    from srlm.models.dpo import DPOModule
    from srlm.models.optim import OptimConfig
    from test_dpo import write_pairs

    m_t = SFTModule(BackboneConfig(model_name_or_path=tiny_model, lora=False)).export(str(tmp_path / "m_t"))
    path = write_pairs(tmp_path / "p.jsonl", 8)

    def make():
        return DPOModule(BackboneConfig(model_name_or_path=tiny_model, adapter_path=str(m_t), lora=False),
                         OptimConfig(lr=1e-2, warmup_ratio=0.0, schedule="constant"))

    def fit(module, max_steps, root, ckpt=None):
        data = PreferenceDataModule(pair_files=[path], batch_size=2)
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=root)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt)
        return [item["ref"] for item in data.train_dataset.items]

    L.seed_everything(0)
    before = fit(make(), 2, tmp_path / "a")
    ckpt = next((tmp_path / "a").rglob("*.ckpt"))
    assert torch.load(ckpt, weights_only=True)["reference_logps"]["train"] == [list(r) for r in before]
    after = fit(make(), 4, tmp_path / "b", str(ckpt))  # the policy is two updates past M_t here
    assert after == before


def test_full_fine_tuning_without_precompute_keeps_a_frozen_copy_of_m_t(tiny_model, tmp_path):
    """precompute_reference false: every step's reference pass runs on a frozen copy of M_t, so the first loss is
    ln 2 and later steps (policy already moved) still compare against M_t; the copy stays out of checkpoints."""
    import torch

    from srlm.data.datamodule import PreferenceDataModule
    from srlm.models.dpo import DPOModule
    from srlm.models.optim import OptimConfig
    from test_dpo import write_pairs

    m_t = SFTModule(BackboneConfig(model_name_or_path=tiny_model, lora=False)).export(str(tmp_path / "m_t"))
    path = write_pairs(tmp_path / "p.jsonl", 8)
    backbone = BackboneConfig(model_name_or_path=tiny_model, adapter_path=str(m_t), lora=False)

    # M_t's own reference log-probs, from a precomputing round that never trains
    exact = PreferenceDataModule(pair_files=[path], batch_size=8)
    L.Trainer(max_steps=0, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path / "r").fit(DPOModule(backbone), datamodule=exact)
    expected = [item["ref"] for item in exact.train_dataset.items]
    assert all(r is not None for r in expected)

    L.seed_everything(0)
    module = DPOModule(backbone, OptimConfig(lr=1e-2, warmup_ratio=0.0, schedule="constant"), precompute_reference=False)
    data = PreferenceDataModule(pair_files=[path], batch_size=2)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path / "a", logger=L.pytorch.loggers.CSVLogger(tmp_path / "a"),
                        log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    assert module.reference_model is not None
    assert all(item["ref"] is None for item in data.train_dataset.items)  # nothing precomputed: on the fly
    rows = [r for r in csv.DictReader(next((tmp_path / "a").rglob("metrics.csv")).open()) if r.get("loss")]
    assert abs(float(rows[0]["loss"]) - math.log(2)) < 1e-3
    # after 3 updates the policy moved, the reference did not: it still gives M_t's log-probs
    full = next(iter(torch.utils.data.DataLoader(data.train_dataset, batch_size=8, collate_fn=data.collate)))
    chosen, rejected = module.reference_logps(full)
    torch.testing.assert_close(torch.stack([chosen, rejected], 1).double(), torch.tensor(expected, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    policy = dict(module.model.named_parameters())
    assert any(not torch.equal(p, policy[n]) for n, p in module.reference_model.named_parameters())
    assert not any(p.requires_grad for p in module.reference_model.parameters())
    ckpt = torch.load(next((tmp_path / "a").rglob("*.ckpt")), weights_only=True)
    assert not any(k.startswith("reference_model.") for k in ckpt["state_dict"])


def test_full_fine_tuning_with_harvested_reference_keeps_no_copy(tiny_model, tmp_path):
    from srlm.data.datamodule import PreferenceDataModule
    from srlm.models.dpo import DPOModule

    m_t = SFTModule(BackboneConfig(model_name_or_path=tiny_model, lora=False)).export(str(tmp_path / "m_t"))
    path = tmp_path / "p.jsonl"
    rows = [json.loads(line) for line in open(__import__("test_dpo").write_pairs(tmp_path / "raw.jsonl", 4))]
    path.write_text("".join(json.dumps({**r, "ref_chosen_logp": -5.0, "ref_rejected_logp": -6.0}) + "\n" for r in rows))
    module = DPOModule(BackboneConfig(model_name_or_path=tiny_model, adapter_path=str(m_t), lora=False),
                       precompute_reference=False)
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path / "a").fit(module, datamodule=PreferenceDataModule(pair_files=[str(path)],
                                                                                          batch_size=2))
    assert module.reference_model is None
