import csv
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from srlm.data.batching import IGNORE, collate_sequences
from srlm.data.chat import encode_prompt, encode_response
from srlm.data.datamodule import SFTDataModule
from srlm.data.records import RecordError
from srlm.models.backbone import BackboneConfig
from srlm.models.logprobs import response_logps
from srlm.models.optim import OptimConfig
from srlm.models.sft import SFTModule

REPO = Path(__file__).resolve().parents[1]


def write_ift(path, n=16):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Name a colour number {i}." + " please" * (i % 5),
                                "response": f"Colour {i} is blue." + " Indeed." * (i % 7)}) + "\n")
    return str(path)


def make_module(tiny_model, lr=1e-3, **backbone):
    return SFTModule(BackboneConfig(model_name_or_path=tiny_model, **backbone), OptimConfig(lr=lr, warmup_ratio=0.0))


def test_loss_only_on_response_tokens(tiny_model):
    module = make_module(tiny_model)
    tok = module.tokenizer
    p1, p2 = encode_prompt(tok, "What is two plus two?"), encode_prompt(tok, "Tell me something entirely different!")
    r = encode_response(tok, "Four.")
    model = module.model.eval()
    a = collate_sequences([p1], [r], tok.pad_token_id)
    s1, n1 = response_logps(model, a["input_ids"], a["attention_mask"], a["labels"])
    # The same response after a different prompt: still exactly len(r) scored tokens.
    b = collate_sequences([p2], [r], tok.pad_token_id)
    assert (b["labels"][0, :len(p2)] == IGNORE).all() and n1.item() == len(r)
    # Changing labels at prompt positions (while masked) and the padding tokens leaves the loss unchanged.
    batch = collate_sequences([p1, p2], [r, r[:2]], tok.pad_token_id)
    base, _ = response_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    ids = batch["input_ids"].clone()
    ids[1, len(p2) + 2:] = 5  # padding positions of row 1
    same, _ = response_logps(model, ids, batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(base, same)
    # Against a direct computation over the full logits.
    logits = model(input_ids=a["input_ids"], attention_mask=a["attention_mask"]).logits[0, :-1].float()
    target = a["input_ids"][0, 1:]
    lp = torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0][len(p1) - 1:]
    torch.testing.assert_close(s1[0], lp.double().sum(), atol=1e-4, rtol=1e-5)


def test_sparse_head_equals_dense(tiny_model):
    module = make_module(tiny_model)
    tok = module.tokenizer
    batch = collate_sequences([encode_prompt(tok, "Hi there"), encode_prompt(tok, "Yo")],
                              [encode_response(tok, "Hello!"), encode_response(tok, "Hey, how are you today?")],
                              tok.pad_token_id)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    sparse, n1 = response_logps(module.model, *args, sparse_head=True)
    dense, n2 = response_logps(module.model, *args, sparse_head=False)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    assert torch.equal(n1, n2)


def test_training_changes_every_trainable_parameter_and_no_frozen_one(tiny_model, tmp_path):
    L.seed_everything(0)
    module = make_module(tiny_model, lr=5e-2)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    dm = SFTDataModule(ift_files=[write_ift(tmp_path / "ift.jsonl")], eft_files=[], batch_size=4, val_fraction=0.0)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    seen_eval = []

    class ModeProbe(L.Callback):  # LoRA dropout must be active while training
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen_eval.extend(n for n, m in pl_module.named_modules() if not m.training)

    trainer.callbacks.append(ModeProbe())
    trainer.fit(module, datamodule=dm)
    assert not seen_eval, seen_eval[:5]
    for name, p in module.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (name in trainable), name
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_checkpoint_holds_adapter_weights_only(tiny_model, tmp_path):
    module = make_module(tiny_model)
    dm = SFTDataModule(ift_files=[write_ift(tmp_path / "ift.jsonl", 8)], eft_files=[], batch_size=4, val_fraction=0.0)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    ckpt_path = next(tmp_path.rglob("*.ckpt"))
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert "optimizer_states" in ckpt and ckpt["global_step"] == 2
    # Resuming restores the adapter and the step count.
    module2 = make_module(tiny_model)
    trainer2 = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path / "b")
    trainer2.fit(module2, datamodule=SFTDataModule(ift_files=[str(tmp_path / "ift.jsonl")], eft_files=[], batch_size=4,
                                                   val_fraction=0.0), ckpt_path=ckpt_path)
    assert trainer2.global_step == 3


def test_length_grouping_cuts_padding(tiny_model, tmp_path):
    module = make_module(tiny_model)
    path = tmp_path / "ift.jsonl"
    with open(path, "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": "Q" + " word" * (i * 7 % 61), "response": "A" + " more" * (i * 13 % 47)}) + "\n")

    def padding(group):
        dm = SFTDataModule(ift_files=[str(path)], eft_files=[], batch_size=4, val_fraction=0.0, group_by_length=group)
        dm.tokenizer = module.tokenizer
        dm.setup("fit")
        real = total = 0
        for batch in dm.train_dataloader():
            real, total = real + batch["n_real_tokens"], total + batch["n_tokens"]
        assert real == sum(dm.train_dataset.lengths)  # every example exactly once
        return 1 - real / total

    grouped, plain = padding(True), padding(False)
    assert grouped < plain / 3, (grouped, plain)


def test_data_errors_name_file_line_and_field(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "response": "fine"}\n{"prompt": "no response here"}\n')
    dm = SFTDataModule(ift_files=[str(bad)], eft_files=[])
    with pytest.raises(RecordError, match=r"bad.jsonl:2: field 'response': missing"):
        dm.examples()
    bad.write_text('{"prompt": "ok", "response": "fine"}\n{"prompt": "x", "response": ""}\n')
    with pytest.raises(RecordError, match=r"bad.jsonl:2: field 'response': empty"):
        dm.examples()
    bad.write_text('{"prompt": "ok", "response": "fine"}\n\n{"prompt": oops}\n')
    with pytest.raises(RecordError, match=r"bad.jsonl:3: malformed JSON"):
        dm.examples()


def test_truncation_is_counted(tiny_model, tmp_path, caplog):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "word " * 300, "response": "answer " * 20}) + "\n"
                    + json.dumps({"prompt": "short", "response": "fine"}) + "\n")
    module = make_module(tiny_model)
    dm = SFTDataModule(ift_files=[str(path)], eft_files=[], max_length=64, max_prompt_length=32, val_fraction=0.0)
    dm.tokenizer = module.tokenizer
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    assert dm.train_dataset.counts.prompt == 1
    assert max(dm.train_dataset.lengths) <= 64
    assert "1 of 2 examples exceeded max_length=64" in caplog.text


def test_four_bit_runs_on_cpu_with_bitsandbytes(tiny_model):
    """bitsandbytes runs NF4 on CPU: the base loads in 4-bit and a LoRA backward pass reaches the adapter."""
    import bitsandbytes as bnb

    module = make_module(tiny_model, load_in_4bit=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.model.modules())
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    module.model(input_ids=ids, labels=ids).loss.backward()
    grads = [n for n, p in module.model.named_parameters() if p.grad is not None]
    assert grads and all("lora_" in n for n in grads)


def test_missing_model_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_module(str(tmp_path / "nope"))


@pytest.mark.slow
def test_main_fit_on_embedded_model(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "main.py", "fit", "--config", "configs/m1_sft.yaml", "--trainer.max_steps=3",
           f"--trainer.default_root_dir={out}", "--trainer.enable_progress_bar=false"]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=900)
    adapter = next(out.rglob("adapter"))
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    rows = list(csv.DictReader(open(next(out.rglob("metrics.csv")))))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    from peft import PeftModel
    from srlm.models.backbone import load_base

    base, _ = load_base(BackboneConfig())
    assert isinstance(PeftModel.from_pretrained(base, str(adapter)), PeftModel)


def test_grouped_order_is_sharded_across_ranks_without_losing_grouping():
    from srlm.data.batching import LengthGroupedSampler
    from srlm.data.batching import GroupedShard

    lengths = [(i * 37) % 101 + 1 for i in range(40)]
    inner = LengthGroupedSampler(lengths, batch_size=4 * 2, seed=1)  # grouped by the global batch
    shards = [list(GroupedShard(inner, 2, rank)) for rank in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(40)) and not set(shards[0]) & set(shards[1])
    for shard in shards:  # consecutive batches of 4 stay close in length
        spread = [max(lengths[i] for i in shard[k:k + 4]) - min(lengths[i] for i in shard[k:k + 4])
                  for k in range(0, len(shard), 4)]
        assert max(spread) <= 20, spread
    sampler = GroupedShard(inner, 2, 0)
    sampler.set_epoch(3)
    assert inner.epoch == 3


def test_gradient_checkpointing_trains_to_the_same_weights(tiny_model, tmp_path):
    """Recomputed activations (and dropout masks) give the same updates: the configs turn it on for memory alone."""
    weights = []
    for checkpointing in (False, True):
        L.seed_everything(0)
        module = make_module(tiny_model, lr=5e-2, gradient_checkpointing=checkpointing)
        dm = SFTDataModule(ift_files=[write_ift(tmp_path / "ift.jsonl")], eft_files=[], batch_size=4, val_fraction=0.0)
        trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, default_root_dir=tmp_path / str(checkpointing))
        trainer.fit(module, datamodule=dm)
        weights.append({n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad})
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], atol=1e-6, rtol=1e-5)
