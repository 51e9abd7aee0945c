"""Checkpoint selection inside a training phase (srlm/selfreward/select.py), on the tiny model."""

import copy
import io
import json
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from srlm.data.chat import encode_prompt
from srlm.data.datamodule import SFTDataModule
from srlm.models.backbone import BackboneConfig
from srlm.models.optim import OptimConfig
from srlm.models.sft import SFTModule
from srlm.selfreward import select
from srlm.inference.engine import Engine, Sampling
from srlm.selfreward.select import SelectBest, SelectionConfig, measure, selection_callbacks


def write_ift(path, n=16):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Name a colour number {i}." + " please" * (i % 5),
                                "response": f"Colour {i} is blue." + " Indeed." * (i % 7)}) + "\n")
    return str(path)


def write_ranked(path):
    rows = [
        {"id": "p1", "prompt": "What colour is the sky?",
         "replies": [{"text": "The sky is blue on a clear day.", "rank": 0}, {"text": "Green.", "rank": 1},
                     {"text": "dog dog dog", "rank": 2}]},
        {"id": "p2", "prompt": "What is two plus two?",
         "replies": [{"text": "Four.", "rank": 0}, {"text": "Five, probably.", "rank": 1}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_module(tiny_model, export_dir=None, lr=5e-2):
    return SFTModule(BackboneConfig(model_name_or_path=tiny_model), OptimConfig(lr=lr, warmup_ratio=0.0),
                     export_dir=export_dir)


def trainable(module):
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def scripted_measure(values, snapshots):
    """A fake ``measure``: the next scripted value, with a copy of the adapter weights measured."""
    calls = iter(values)

    def fake(model, tokenizer, config):
        snapshots.append({n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad})
        return next(calls)

    return fake


def exported_weights(folder):
    """The exported peft adapter, keyed as the PeftModel's parameters (adapter name ``default``)."""
    saved = load_file(str(folder / "adapter_model.safetensors"))
    return {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
            for k, v in saved.items()}


def assert_same(exported, snapshot):
    assert set(exported) == set(snapshot)
    for name, value in snapshot.items():
        assert torch.equal(exported[name], value), name


def fit(module, tmp_path, max_steps, callbacks, ckpt_path=None, **kwargs):
    tmp_path.mkdir(parents=True, exist_ok=True)
    dm = SFTDataModule(ift_files=[write_ift(tmp_path / "ift.jsonl")], eft_files=[], batch_size=4, val_fraction=0.0)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, callbacks=callbacks, **kwargs)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def test_exports_the_best_trained_step(tiny_model, tmp_path, monkeypatch):
    L.seed_everything(0)
    snapshots, records = [], []
    # Step 0 scores highest of all: recorded, but the exported model must be a trained one.
    monkeypatch.setattr(select, "measure", scripted_measure([0.95, 0.2, 0.9, 0.1, 0.3], snapshots))
    export = tmp_path / "export"
    module = make_module(tiny_model, str(export))
    cb = SelectBest(SelectionConfig(metric="judge", every_n_steps=1), record=records.append)
    fit(module, tmp_path, 4, [cb], enable_checkpointing=False)

    assert len(snapshots) == 5  # steps 0..4, each once
    assert not torch.equal(snapshots[2][next(n for n in snapshots[2] if "lora_B" in n)],
                           snapshots[4][next(n for n in snapshots[4] if "lora_B" in n)])
    assert_same(exported_weights(export), snapshots[2])
    assert_same(trainable(module), {"model." + n: v for n, v in snapshots[2].items()})  # the module holds them too
    expected = {"metric": "judge", "best_step": 2, "best_value": 0.9, "final_step": 4, "final_value": 0.3,
                "history": [[0, 0.95], [1, 0.2], [2, 0.9], [3, 0.1], [4, 0.3]]}
    assert records == [expected]
    assert json.loads((tmp_path / "selection.json").read_text()) == expected
    # LoRA dropout kept training after every measurement.
    assert module.model.training and all(m.training for m in module.model.modules())


def test_ties_keep_the_earlier_step_and_every_n_steps(tiny_model, tmp_path, monkeypatch):
    L.seed_everything(0)
    snapshots, records = [], []
    monkeypatch.setattr(select, "measure", scripted_measure([0.1, 0.5, 0.5], snapshots))  # steps 0, 2, 3 (final)
    export = tmp_path / "export"
    module = make_module(tiny_model, str(export))
    fit(module, tmp_path, 3, [SelectBest(SelectionConfig(metric="ifeval", every_n_steps=2), records.append)],
        enable_checkpointing=False)
    assert records[0]["history"] == [[0, 0.1], [2, 0.5], [3, 0.5]] and records[0]["best_step"] == 2
    assert_same(exported_weights(export), snapshots[1])


def test_resume_keeps_history_and_best_copy(tiny_model, tmp_path, monkeypatch):
    L.seed_everything(0)
    first, records = [], []
    monkeypatch.setattr(select, "measure", scripted_measure([0.95, 0.2, 0.9], first))  # steps 0, 1, 2
    ckpts = tmp_path / "ckpt"
    config = SelectionConfig(metric="judge", every_n_steps=1)
    fit(make_module(tiny_model, str(tmp_path / "export1")), tmp_path, 2,
        [SelectBest(config), ModelCheckpoint(dirpath=ckpts, every_n_train_steps=1, save_last=True)])
    state = torch.load(ckpts / "last.ckpt", weights_only=True)["callbacks"]["SelectBest"]
    assert state["history"] == [[0, 0.95], [1, 0.2], [2, 0.9]] and state["best_step"] == 2

    second = []
    monkeypatch.setattr(select, "measure", scripted_measure([0.1, 0.3], second))  # steps 3, 4
    export = tmp_path / "export2"
    module = make_module(tiny_model, str(export))
    fit(module, tmp_path / "b", 4, [SelectBest(config, records.append)], ckpt_path=ckpts / "last.ckpt",
        enable_checkpointing=False)
    assert len(second) == 2
    assert records[0]["history"] == [[0, 0.95], [1, 0.2], [2, 0.9], [3, 0.1], [4, 0.3]]
    assert records[0]["best_step"] == 2 and records[0]["final_step"] == 4
    assert_same(exported_weights(export), first[2])


def test_state_dict_round_trip_with_weights_only(tmp_path):
    cb = SelectBest(SelectionConfig(metric="judge"))
    cb.history = [[0, 0.5], [8, 0.75], [16, math.nan]]
    cb.best_step, cb.best_value = 8, 0.75
    cb.best_weights = {"model.a.lora_A.default.weight": torch.randn(4, 3),
                       "model.a.lora_B.default.weight": torch.randn(3, 4, dtype=torch.bfloat16)}
    buffer = io.BytesIO()
    torch.save({"callbacks": {cb.state_key: cb.state_dict()}}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["callbacks"]["SelectBest"]
    other = SelectBest(SelectionConfig(metric="judge"))
    other.load_state_dict(loaded)
    assert other.history[:2] == [[0, 0.5], [8, 0.75]] and math.isnan(other.history[2][1])
    assert (other.best_step, other.best_value) == (8, 0.75)
    for name, value in cb.best_weights.items():
        assert torch.equal(other.best_weights[name], value) and other.best_weights[name].dtype == value.dtype
    # State for another metric is not mixed in.
    third = SelectBest(SelectionConfig(metric="ifeval"))
    third.load_state_dict(loaded)
    assert third.history == [] and third.best_weights is None


@pytest.mark.parametrize("metric", ["ifeval", "judge"])
def test_measure_for_real_restores_modes(tiny_model, tmp_path, metric):
    module = make_module(tiny_model)
    model = module.model
    # A mixed state, as Lightning may leave it: the whole model training, one submodule in eval.
    model.train()
    frozen = next(n for n, m in model.named_modules() if n.endswith("lora_dropout"))
    model.get_submodule(frozen).eval()
    before = {n: m.training for n, m in model.named_modules()}
    config = SelectionConfig(metric=metric, max_prompts=3, max_new_tokens=8, batch_size=2,
                             ranked_file=write_ranked(tmp_path / "ranked.jsonl"))
    value = measure(model, module.tokenizer, config)
    assert isinstance(value, float) and 0.0 <= value <= 1.0
    assert {n: m.training for n, m in model.named_modules()} == before
    assert not torch.is_inference_mode_enabled()


def test_engine_on_peft_model_matches_merged_model(tiny_model):
    torch.manual_seed(1)
    module = make_module(tiny_model)
    model, tok = module.model, module.tokenizer
    with torch.no_grad():  # a non-trivial adapter (LoRA B starts at zero)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    model.eval()
    merged = copy.deepcopy(model).merge_and_unload()
    merged.eval()
    prompts = [encode_prompt(tok, p) for p in ["What colour is the sky?", "Name a colour.", "Score: 3 or 4?"]]
    cfg = Sampling(0.0, 1.0, 12)
    peft_engine = select.make_engine(model, tok, batch_size=2)
    merged_engine = Engine(merged, [tok.eos_token_id], tok.pad_token_id, batch_size=2)
    assert peft_engine._last_only == merged_engine._last_only  # logits_to_keep seen through peft's **kwargs
    a = peft_engine.generate(prompts, 1, cfg)
    b = merged_engine.generate(prompts, 1, cfg)
    assert [g[0].token_ids for g in a] == [g[0].token_ids for g in b]
    for x, y in zip(a, b):
        assert abs(x[0].logp - y[0].logp) < 1e-3
    # The adapter matters: without it the answers differ.
    with model.disable_adapter():
        base = Engine(model, [tok.eos_token_id], tok.pad_token_id, batch_size=2).generate(prompts, 1, cfg)
    assert [g[0].token_ids for g in base] != [g[0].token_ids for g in a]


def test_config_and_phase_helper():
    with pytest.raises(ValueError, match="selection metric"):
        SelectionConfig(metric="bleu")
    with pytest.raises(ValueError, match="phases"):
        SelectionConfig(metric="judge", phases=["m2"])
    with pytest.raises(ValueError, match="not 'none'"):
        SelectBest(SelectionConfig())
    assert selection_callbacks(SelectionConfig(), "m1") == []
    assert selection_callbacks(None, "m1") == []
    cfg = SelectionConfig(metric="ifeval")
    assert selection_callbacks(cfg, "sft") == []
    (cb,) = selection_callbacks(cfg, "dpo")
    assert isinstance(cb, SelectBest)


def test_heldout_constraint_prompts_load():
    items = select.load_constraint_prompts("seed:ift_constraints_heldout.jsonl")
    assert len(items) == 40 and all(set(i) == {"key", "prompt", "instruction_id_list", "kwargs"} for i in items)
    assert len(select.load_constraint_prompts("seed:ift_constraints_heldout.jsonl", 3)) == 3


def test_measuring_does_not_change_training(tiny_model, tmp_path):
    """A real measurement between steps consumes no random state and leaves the modes as they were:
    the final-step weights are bitwise those of the same fit without selection."""
    final = {}

    class Final(L.Callback):  # listed before SelectBest: sees the last step's weights, not the selected ones
        def __init__(self, key):
            self.key = key

        def on_train_end(self, trainer, pl_module):
            final[self.key] = trainable(pl_module)

    config = SelectionConfig(metric="judge", every_n_steps=1, max_prompts=1,
                             ranked_file=write_ranked(tmp_path / "ranked.jsonl"))
    for key, extra in (("plain", []), ("select", [SelectBest(config)])):
        L.seed_everything(0)
        fit(make_module(tiny_model, str(tmp_path / key / "export")), tmp_path / key, 3, [Final(key)] + extra,
            enable_checkpointing=False)
    assert_same(final["select"], final["plain"])
