"""Tokenisation of validated records through Hugging Face ``datasets``: ``Dataset.map``, cached by fingerprint.

Prompts are cut from the left first (down to ``max_prompt_length``), then responses from the right,
so that every example fits ``max_length``; the cuts are counted (``Truncation``) and reported once
per dataset.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from srlm.data.chat import encode_prompt, encode_response

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)


@dataclass
class Truncation:
    """Counts of examples cut to fit ``max_length``, reported once per dataset."""

    prompt: int = 0
    response: int = 0

    def report(self, what: str, total: int, max_length: int) -> None:
        if self.prompt or self.response:
            log.warning("%s: %d of %d examples exceeded max_length=%d: %d prompts cut from the left, %d responses cut "
                        "from the right", what, max(self.prompt, self.response), total, max_length, self.prompt, self.response)


def fit_lengths(prompt: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int,
                counts: Truncation) -> tuple[list[int], list[list[int]]]:
    """Cut the prompt from the left first (down to ``max_prompt_length``), then responses from the right."""
    longest = max(len(r) for r in responses)
    if len(prompt) + longest > max_length:
        keep = max(max_length - longest, min(max_prompt_length, len(prompt)))
        if keep < len(prompt):
            prompt = prompt[-keep:]
            counts.prompt += 1
        if len(prompt) + longest > max_length:
            responses = [r[:max_length - len(prompt)] for r in responses]
            counts.response += 1
    return prompt, responses


# Bump when tokenisation changes, so cached tokenised datasets are not reused.
TOKENISATION_VERSION = 1


def tokenise(rows: list[dict], tokenizer, function, what: str, **settings) -> "datasets.Dataset":
    """``rows`` (validated records) as a Hugging Face ``datasets.Dataset``, tokenised with ``map``.

    The tokenised dataset is cached by fingerprint (the rows, the tokenizer, ``settings``) as an Arrow
    file under ``$SRLM_CACHE/datasets``: a rerun on the same data and model loads it instead of
    tokenising again. ``function(row, tokenizer, **settings)`` returns one row's columns.
    """
    import datasets
    from datasets.fingerprint import Hasher

    datasets.disable_progress_bars()  # seed-sized data: a bar per phase is noise
    data = datasets.Dataset.from_list(rows)
    key = Hasher.hash([data._fingerprint, Hasher.hash(tokenizer), sorted(settings.items()), what,
                       TOKENISATION_VERSION])
    folder = Path(os.environ.get("SRLM_CACHE") or Path.home() / ".cache" / "srlm") / "datasets"
    folder.mkdir(parents=True, exist_ok=True)
    return data.map(lambda row: function(row, tokenizer, **settings), remove_columns=data.column_names,
                    cache_file_name=str(folder / f"{what}-{key}.arrow"), new_fingerprint=key,
                    load_from_cache_file=True)


def tokenise_sft(row: dict, tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """One SFT row's prompt and response token ids, cut to fit, with whether each was cut."""
    counts = Truncation()
    prompt, (response,) = fit_lengths(encode_prompt(tokenizer, row["prompt"]), [encode_response(tokenizer, row["response"])],
                                      max_length, max_prompt_length, counts)
    return {"prompt_ids": prompt, "response_ids": response, "cut_prompt": bool(counts.prompt),
            "cut_response": bool(counts.response)}


def cut_counts(data) -> Truncation:
    """How many rows of a tokenised dataset had their prompt / response cut."""
    return Truncation(prompt=sum(data["cut_prompt"]), response=sum(data["cut_response"])) if len(data) else Truncation()


def tokenise_pair(row: dict, tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """One pair's prompt, chosen and rejected token ids, cut to fit, with whether each side was cut."""
    # Pairs from the loop carry the sampled token ids: train on exactly those tokens (their
    # harvested log-probs then are the reference); otherwise tokenise the text.
    if row["chosen_token_ids"] and row["rejected_token_ids"]:
        responses = [list(row["chosen_token_ids"]), list(row["rejected_token_ids"])]
    else:
        responses = [encode_response(tokenizer, row["chosen"]), encode_response(tokenizer, row["rejected"])]
        # A response cut at max_new_tokens ("<side>_finished": false) did not end its turn: no EOS.
        responses = [r[:-1] if row[f"{side}_finished"] is False else r
                     for side, r in zip(("chosen", "rejected"), responses)]
    counts = Truncation()
    prompt, (chosen, rejected) = fit_lengths(encode_prompt(tokenizer, row["prompt"]), responses, max_length,
                                             max_prompt_length, counts)
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "cut_prompt": bool(counts.prompt),
            "cut_response": bool(counts.response)}
