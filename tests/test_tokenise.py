"""The DataModules hold Hugging Face datasets, tokenised with map and cached by fingerprint."""

import datasets

from srlm.data import records
from srlm.data.datamodule import TokenizedPairs, TokenizedSFT
from srlm.data.chat import encode_prompt, encode_response
from srlm.models.backbone import load_tokenizer


def test_sft_rows_are_a_cached_dataset(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SRLM_CACHE", str(tmp_path))
    tok = load_tokenizer(tiny_model)
    examples = [records.SFTExample("Name a colour.", "Blue."), records.SFTExample("word " * 80, "Yes.")]
    first = TokenizedSFT(examples, tok, max_length=40, max_prompt_length=20)
    assert isinstance(first.data, datasets.Dataset) and len(first) == 2
    assert first.items[0] == (encode_prompt(tok, "Name a colour."), encode_response(tok, "Blue."))
    assert first.counts.prompt == 1 and sum(map(len, first.items[1])) == 40  # the long prompt cut from the left
    cached = sorted((tmp_path / "datasets").glob("sft-*.arrow"))
    assert len(cached) == 1
    again = TokenizedSFT(examples, tok, max_length=40, max_prompt_length=20)
    assert again.items == first.items and again.data.cache_files[0]["filename"] == str(cached[0])
    # other settings, another cache entry
    TokenizedSFT(examples, tok, max_length=60, max_prompt_length=20)
    assert len(list((tmp_path / "datasets").glob("sft-*.arrow"))) == 2


def test_pairs_keep_harvested_ids_and_reference(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SRLM_CACHE", str(tmp_path))
    tok = load_tokenizer(tiny_model)
    pairs = [records.PreferencePair("Q?", "good", "bad", "a", {"chosen_token_ids": [5, 6, 7],
                                                                 "rejected_token_ids": [8],
                                                                 "ref_chosen_logp": -1.5, "ref_rejected_logp": -2.0}),
             records.PreferencePair("Q2?", "yes", "no", "b", {"rejected_finished": False})]
    data = TokenizedPairs(pairs, tok, max_length=64, max_prompt_length=32)
    assert isinstance(data.data, datasets.Dataset)
    a, b = data.items
    assert a["chosen"] == [5, 6, 7] and a["rejected"] == [8] and a["ref"] == (-1.5, -2.0)
    assert b["chosen"] == encode_response(tok, "yes") and b["rejected"] == encode_response(tok, "no")[:-1]
    assert b["ref"] is None and not data.has_reference
