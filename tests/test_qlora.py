"""QLoRA rounds on CPU (bitsandbytes NF4): the policy starts as M_t, the reference is M_t, the lineage is kept."""

import csv
import json
import math

import lightning as L
import pytest
import torch

from srlm.data.datamodule import SFTDataModule
from srlm.models.backbone import BackboneConfig, lineage_names, load_for_inference
from srlm.models.optim import OptimConfig
from srlm.models.sft import SFTModule
from srlm.selfreward.config import DPORoundConfig, EvalConfig, SelfRewardConfig
from srlm.inference.engine import Sampling
from srlm.trainer import SRLMTrainer


@pytest.mark.slow
def test_two_round_qlora_loop_keeps_the_lineage(tiny_model, tmp_path):
    L.seed_everything(0)
    run = tmp_path / "run"
    trainer = SRLMTrainer(accelerator="cpu", max_steps=2, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=str(run), limit_val_batches=0, logger=True, log_every_n_steps=1)
    backbone = BackboneConfig(model_name_or_path=tiny_model, load_in_4bit=True)
    model = SFTModule(backbone)
    data = SFTDataModule(max_length=256, max_prompt_length=192, batch_size=2, val_fraction=0.0)
    self_reward = SelfRewardConfig(num_prompts=2, few_shot=3, num_candidates=2, judge_mode="logit", batch_size=2,
                                   prompt_sampling=Sampling(1.0, 1.0, 16), candidate_sampling=Sampling(1.0, 1.0, 8),
                                   allow_unfinished_chosen=True)
    manifest = trainer.loop(model, data, run_dir=str(run), iterations=2, self_reward=self_reward,
                            dpo=DPORoundConfig(max_steps=2, max_length=256, max_prompt_length=128,
                                               optimizer=OptimConfig(lr=1e-2)),
                            checkpoint_every=1, evaluation=EvalConfig(enabled=False))
    for t in (1, 2):
        assert manifest["phases"][f"iter_{t}/train"]["counts"].get("pairs"), manifest["phases"]
        (metrics,) = (run / f"iter_{t}" / "dpo").rglob("metrics.csv")
        first = next(r for r in csv.DictReader(metrics.open()) if r.get("loss"))
        assert abs(float(first["loss"]) - math.log(2)) < 1e-4, t  # the policy starts as the reference, M_t
    # M3's lineage is M1 then M2; loaded in 4-bit it stacks all three adapters
    lineage = json.loads((run / "iter_2" / "model" / "srlm_lineage.json").read_text())["merged_adapters"]
    assert [p.split("/")[-2] for p in lineage] == ["m1", "iter_1"]
    m3 = load_for_inference(tiny_model, str(run / "iter_2" / "model"), load_in_4bit=True)
    m2 = load_for_inference(tiny_model, str(run / "iter_1" / "model"), load_in_4bit=True)
    assert len(lineage_names(m3)) == 3 and len(lineage_names(m2)) == 2
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert not torch.allclose(m3(ids).logits, m2(ids).logits)  # the second round's adapter is in M3
    # evaluate loads it too (full precision, adapters merged)
    full = load_for_inference(tiny_model, str(run / "iter_2" / "model"))
    assert torch.isfinite(full(ids).logits).all()


def test_four_bit_cpu_forward_is_one_network_in_eval_and_training(tiny_model):
    """bitsandbytes would switch CPU 4-bit layers to a bf16 kernel after a no-grad eval forward (the reference
    pass): the training forward that follows must still compute the same logits."""
    from srlm.models.backbone import load_base

    model, _ = load_base(BackboneConfig(model_name_or_path=tiny_model, load_in_4bit=True))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    model.train()
    first = model(ids).logits.detach()
    model.eval()
    with torch.no_grad():
        reference = model(ids).logits
    model.train()
    again = model(ids).logits.detach()
    torch.testing.assert_close(reference, first, atol=1e-6, rtol=0)
    torch.testing.assert_close(again, first, atol=1e-6, rtol=0)
