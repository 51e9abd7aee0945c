"""Reference log-probs harvested while sampling from M_t equal the DPO round's reference pass."""

import json

import torch

from srlm.data.datamodule import PreferenceDataModule
from srlm.models.backbone import BackboneConfig, load_for_inference, load_tokenizer
from srlm.models.dpo import DPOModule
from srlm.models.optim import OptimConfig
from srlm.inference.engine import Engine, Sampling
from srlm.selfreward.steps import generate_candidates, make_pairs


def test_harvested_logps_match_the_reference_pass(tiny_model, tmp_path):
    # M_t: the base plus a non-trivial adapter, exported as the loop exports it.
    m1 = DPOModule(BackboneConfig(model_name_or_path=tiny_model), OptimConfig())
    with torch.no_grad():
        for name, p in m1.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapter = m1.export(str(tmp_path / "m1"))
    tok = load_tokenizer(tiny_model)
    engine = Engine(load_for_inference(tiny_model, str(adapter)), [tok.eos_token_id], tok.pad_token_id, batch_size=4)
    prompts = [{"id": f"p{i}", "prompt": f"Tell me about the number {i}."} for i in range(6)]
    # The near-uniform tiny model ends a turn at random (about 1 in 500 tokens): long samples, many finish.
    stats = generate_candidates(engine, tok, prompts, tmp_path / "cands.jsonl", n=4,
                                sampling=Sampling(1.5, 1.0, 300), show_progress=False)
    cands = [json.loads(x) for x in open(tmp_path / "cands.jsonl")]
    harvested = [c for c in cands if c["logp"] is not None]
    assert stats["harvested_logp"] == len(harvested) >= 2
    # Pairs between harvested candidates of the same prompt, scored so that any two differ.
    judgements = [{"id": c["id"], "score": float(i)} for i, c in enumerate(harvested)]
    make_pairs(harvested, judgements, tmp_path / "pairs.jsonl")
    pairs = [json.loads(x) for x in open(tmp_path / "pairs.jsonl")]
    assert pairs and all("ref_chosen_logp" in p for p in pairs)
    # The DPO round from M_t: its adapter-disabled pass is the reference.
    m2 = DPOModule(BackboneConfig(model_name_or_path=tiny_model, adapter_path=str(adapter)), OptimConfig())
    dm = PreferenceDataModule(pair_files=[str(tmp_path / "pairs.jsonl")], batch_size=2, max_length=1024,
                              max_prompt_length=512)
    dm.tokenizer = m2.tokenizer
    dm.setup("fit")
    assert dm.train_dataset.has_reference  # the harvested values were picked up
    for batch in dm.train_dataloader():
        chosen, rejected = m2.reference_logps(batch)
        torch.testing.assert_close(chosen.double(), batch["ref_chosen_logp"], atol=1e-3, rtol=0)
        torch.testing.assert_close(rejected.double(), batch["ref_rejected_logp"], atol=1e-3, rtol=0)


def test_no_harvest_where_decode_and_reference_pass_differ(tiny_model, tmp_path):
    """bf16 (and 4-bit) decoding sums log-probs that a reference pass does not reproduce: none are kept."""
    from srlm.selfreward.steps import harvests_exactly

    tok = load_tokenizer(tiny_model)
    fp32 = load_for_inference(tiny_model)
    assert harvests_exactly(fp32)
    bf16 = load_for_inference(tiny_model, dtype="bf16")
    assert not harvests_exactly(bf16)
    engine = Engine(bf16, [tok.eos_token_id], tok.pad_token_id, batch_size=4)
    prompts = [{"id": f"p{i}", "prompt": f"Tell me about the number {i}."} for i in range(3)]
    stats = generate_candidates(engine, tok, prompts, tmp_path / "cands.jsonl", n=4, sampling=Sampling(1.5, 1.0, 300),
                                show_progress=False)
    cands = [json.loads(x) for x in open(tmp_path / "cands.jsonl")]
    assert any(c["finished"] for c in cands)  # finished ones would have been harvested in fp32
    assert stats["harvested_logp"] == 0 and all(c["logp"] is None for c in cands)
