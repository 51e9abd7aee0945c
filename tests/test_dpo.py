import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from srlm.data.datamodule import PreferenceDataModule
from srlm.data.records import RecordError
from srlm.models.backbone import BackboneConfig
from srlm.models.dpo import DPOModule
from srlm.models.dpo_loss import dpo_loss
from srlm.models.optim import OptimConfig

REPO = Path(__file__).resolve().parents[1]


def write_pairs(path, n=4):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"Is {i} even or odd?",
                                "chosen": f"{i} is {'even' if i % 2 == 0 else 'odd'}.",
                                "rejected": "I do not know, sorry about that." + " Really." * i}) + "\n")
    return str(path)


def test_loss_variants_match_formulas():
    pc, pr = torch.tensor([-10.0, -3.0]), torch.tensor([-12.0, -2.0])
    rc, rr = torch.tensor([-11.0, -3.5]), torch.tensor([-11.0, -2.5])
    nc, nr = torch.tensor([4, 2]), torch.tensor([5, 3])
    beta = 0.1
    delta = (pc - rc) - (pr - rr)  # [2.0, 0.0]
    losses, rc_, rr_ = dpo_loss(pc, pr, rc, rr, beta, "sigmoid")
    torch.testing.assert_close(losses, -F.logsigmoid(beta * delta))
    assert math.isclose(losses[1].item(), math.log(2), rel_tol=1e-6)
    torch.testing.assert_close(rc_, beta * (pc - rc))
    torch.testing.assert_close(rr_, beta * (pr - rr))
    eps = 0.2
    robust, _, _ = dpo_loss(pc, pr, rc, rr, beta, "robust", label_smoothing=eps)
    expect = [((1 - eps) * math.log(1 + math.exp(-beta * d)) - eps * math.log(1 + math.exp(beta * d))) / (1 - 2 * eps)
              for d in delta.tolist()]
    torch.testing.assert_close(robust, torch.tensor(expect))
    hinge, _, _ = dpo_loss(pc, pr, rc, rr, beta, "hinge")
    torch.testing.assert_close(hinge, torch.tensor([max(0.0, 1 - beta * d) for d in delta.tolist()]))
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta, "ipo", chosen_tokens=nc, rejected_tokens=nr)
    mean_delta = (pc - rc) / nc - (pr - rr) / nr
    torch.testing.assert_close(ipo, (mean_delta - 1 / (2 * beta)) ** 2)
    with pytest.raises(ValueError, match="ipo needs"):
        dpo_loss(pc, pr, rc, rr, beta, "ipo")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, beta, "robust", label_smoothing=0.5)


def make(tiny_model, lr=1e-3, precompute=True, adapter=None):
    return DPOModule(BackboneConfig(model_name_or_path=tiny_model, adapter_path=adapter, lora_dropout=0.0),
                     OptimConfig(lr=lr, warmup_ratio=0.0, schedule="constant"), precompute_reference=precompute)


def datamodule(path, module, batch_size=2):
    dm = PreferenceDataModule(pair_files=[path], batch_size=batch_size)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    return dm


def first_batch(dm):
    return next(iter(dm.train_dataloader()))


def test_first_loss_is_ln2_and_rewards_zero(tiny_model, tmp_path):
    module = make(tiny_model)
    dm = datamodule(write_pairs(tmp_path / "p.jsonl"), module)
    batch = first_batch(dm)
    sums, counts = __import__("srlm.models.logprobs", fromlist=["x"]).response_logps(
        module.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    ref_c, ref_r = module.reference_logps(batch)
    losses, rc, rr = dpo_loss(sums[:2], sums[2:], ref_c, ref_r)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-6)
    assert torch.allclose(rc, torch.zeros_like(rc), atol=1e-6) and torch.allclose(rr, torch.zeros_like(rr), atol=1e-6)


def test_precomputed_and_on_the_fly_reference_agree(tiny_model, tmp_path):
    path = write_pairs(tmp_path / "p.jsonl", 6)
    losses = []
    for precompute in (True, False):
        L.seed_everything(0)
        module = make(tiny_model, lr=1e-2, precompute=precompute)
        dm = PreferenceDataModule(pair_files=[path], batch_size=2)
        trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, default_root_dir=tmp_path / str(precompute))
        seen = []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                seen.append(outputs["loss"].item())
                assert ("ref_chosen_logp" in batch) == precompute

        trainer.callbacks.append(Record())
        trainer.fit(module, datamodule=dm)
        losses.append(seen)
    assert len(losses[0]) == 3
    assert math.isclose(losses[0][0], math.log(2), abs_tol=1e-6)
    for a, b in zip(*losses):
        assert abs(a - b) < 1e-5, losses


def test_high_lr_drives_reward_accuracy_to_one(tiny_model, tmp_path):
    L.seed_everything(0)
    module = make(tiny_model, lr=5e-3)
    path = write_pairs(tmp_path / "p.jsonl", 4)
    dm = PreferenceDataModule(pair_files=[path], batch_size=4, val_files=[path])
    margins = []

    class Record(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            margins.append((trainer.callback_metrics["val/rewards/margins"].item(),
                            trainer.callback_metrics["val/rewards/accuracies"].item()))

    trainer = L.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, callbacks=[Record()],
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert margins[-1][1] == 1.0, margins
    assert margins[-1][0] > margins[0][0] > 0, margins


def test_resume_mid_round_continues_step_and_optimizer(tiny_model, tmp_path):
    path = write_pairs(tmp_path / "p.jsonl", 8)
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    module = make(tiny_model, lr=1e-2)
    trainer.fit(module, datamodule=PreferenceDataModule(pair_files=[path], batch_size=2))
    ckpt = next(tmp_path.rglob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=True)
    assert all("lora_" in k for k in saved["state_dict"])
    resumed = make(tiny_model, lr=1e-2)
    steps = []

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module):
            steps.append(trainer.global_step)
            state = trainer.optimizers[0].state_dict()["state"]
            steps.append(int(next(iter(state.values()))["step"]))

    trainer2 = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                         default_root_dir=tmp_path / "b", callbacks=[Record()])
    trainer2.fit(resumed, datamodule=PreferenceDataModule(pair_files=[path], batch_size=2), ckpt_path=ckpt)
    assert steps == [2, 2] and trainer2.global_step == 4
    for name, p in resumed.named_parameters():
        if name in saved["state_dict"]:
            assert not torch.equal(p.detach(), saved["state_dict"][name])  # trained on from the restored weights


def test_round_from_adapter_merges_it_so_disabled_adapter_is_m_t(tiny_model, tmp_path):
    from srlm.models.backbone import load_for_inference

    # Make an "M1" adapter with non-zero weights and export it.
    m1 = make(tiny_model)
    with torch.no_grad():
        for name, p in m1.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapter = m1.export(str(tmp_path / "m1"))
    m1_model = load_for_inference(tiny_model, str(adapter))
    m2 = make(tiny_model, adapter=str(adapter))
    ids = torch.tensor([[1, 5, 9, 23, 42, 7]])
    with torch.no_grad():
        expect = m1_model(input_ids=ids).logits
        with m2._reference_mode():
            got = m2.model(input_ids=ids).logits
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-4)
    # The lineage travels: M2's export lists M1 as merged.
    out = m2.export(str(tmp_path / "m2"))
    lineage = json.loads((out / "srlm_lineage.json").read_text())
    assert lineage["merged_adapters"] == [str(Path(adapter).resolve())]


def test_identical_pair_is_an_error_with_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "x", "rejected": "y"}) + "\n"
                    + json.dumps({"prompt": "b", "chosen": "same", "rejected": "same"}) + "\n")
    with pytest.raises(RecordError, match=r"pairs.jsonl:2: field 'rejected': identical"):
        PreferenceDataModule.read([str(path)])


@pytest.mark.slow
def test_main_fit_dpo_on_embedded_model(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "main.py", "fit", "--config", "configs/m2_dpo.yaml", "--trainer.max_steps=3",
           f"--trainer.default_root_dir={out}", "--trainer.enable_progress_bar=false"]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=900)
    rows = list(csv.DictReader(open(next(out.rglob("metrics.csv")))))
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert any(r.get(key) for r in rows), key
    assert len(losses) == 3 and abs(losses[0] - math.log(2)) < 1e-4
    assert (next(out.rglob("adapter")) / "adapter_config.json").exists()


def test_rows_split_by_length_give_the_same_logps_and_gradients(tiny_model, tmp_path):
    from srlm.models.logprobs import length_groups, response_logps

    assert length_groups([10, 10, 11, 10]) == [[0, 1, 2, 3]]  # nothing to save
    assert length_groups([100, 90, 30, 40]) == [[2, 3], [0, 1]]  # short rows apart
    module = make(tiny_model)
    path = tmp_path / "p.jsonl"
    with open(path, "w") as f:  # long chosen, short rejected: the layout of real DPO batches
        for i in range(2):
            f.write(json.dumps({"prompt": f"Tell me about {i}.", "chosen": "A long answer. " * (20 + 5 * i),
                                "rejected": "No."}) + "\n")
    batch = first_batch(datamodule(str(path), module))
    assert len(length_groups(batch["lengths"])) == 2
    results = []
    for lengths in (None, batch["lengths"]):
        module.model.zero_grad()
        sums, counts = response_logps(module.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                      True, lengths)
        sums.sum().backward()
        grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
        results.append((sums.detach(), counts, grads))
    (s1, c1, g1), (s2, c2, g2) = results
    assert torch.equal(c1, c2) and torch.allclose(s1, s2, atol=1e-4)
    assert g1.keys() == g2.keys() and all(torch.allclose(g1[n], g2[n], atol=1e-5) for n in g1)
