"""Turning a user prompt and an assistant response into token ids, the same way everywhere.

Training (SFT, DPO), generation and judging all go through these two functions, so the tokens a
model is trained on are exactly the tokens it later sees. Chat formatting uses the tokenizer's own
chat template; a tokenizer without one gets a plain ``User:``/``Assistant:`` layout.
"""

from __future__ import annotations

PLAIN_TEMPLATE = "User: {prompt}\nAssistant: "


def prompt_text(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it, ending where the assistant's answer begins."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return PLAIN_TEMPLATE.format(prompt=prompt)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, response: str) -> list[int]:
    """Response tokens followed by the end-of-turn token, so the model learns to stop."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]
