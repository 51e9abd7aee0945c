"""A tiny randomly initialised Llama and a tokenizer trained locally: fast tests, no network."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    seed = Path(__file__).parents[1] / "srlm" / "data" / "seed"
    # The project's own hand-written seed files: the tokenizer stays the same when data files are added.
    names = ("eft_eval.jsonl", "eft_train.jsonl", "ift.jsonl", "prefs.jsonl")
    texts = [(seed / name).read_text(encoding="utf-8") for name in names]
    texts += [(Path(__file__).parents[1] / "srlm" / "prompts" / "judge_additive.txt").read_text()]
    texts += ["Score: 0 1 2 3 4 5. The quick brown fox jumps over the lazy dog. " * 4]
    return texts


def build_tiny_model(folder: str | Path, vocab_size: int = 512, hidden: int = 64, layers: int = 2, seed: int = 0) -> str:
    """Write a 2-layer Llama and a byte-level BPE tokenizer with a chat template to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)
