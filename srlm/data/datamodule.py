"""LightningDataModules: IFT+EFT examples for SFT, and preference pairs for DPO.

File paths may start with ``seed:`` to name a file shipped in ``srlm/data/seed`` (for example
``seed:ift.jsonl``). The tokenizer is the model's: ``setup`` takes it from the LightningModule
being fitted, or from ``self.tokenizer`` when the DataModule is used on its own.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import lightning as L
from torch.utils.data import DataLoader, Dataset

from srlm.data import records
from srlm.data.batching import GroupedShard, LengthGroupedSampler, collate_pairs, collate_sequences
from srlm.data.records import resolve_path
from srlm.data.tokenise import cut_counts, tokenise, tokenise_pair, tokenise_sft
from srlm.prompts import load_template


def load_sft_file(path: str | Path, judge_template: str = "judge_additive") -> list[records.SFTExample]:
    """An IFT or EFT file: ``{prompt, response}`` lines, or unfilled judge examples ``{question, answer, judgement}``
    which are filled into the judge template here."""
    path = resolve_path(path)
    template = None
    out = []
    for number, obj in records.iter_jsonl(path):
        if "question" in obj or "judgement" in obj:
            ex = records.parse_judge(obj, path, number)
            template = template or load_template(judge_template, "question", "response")
            out.append(records.SFTExample(template.fill(question=ex.question, response=ex.answer), ex.judgement, ex.id))
        else:
            out.append(records.parse_sft(obj, path, number))
    return out


class TokenizedSFT(Dataset):
    """SFT examples tokenised through ``datasets`` (``self.data``); rows are served as Python lists."""

    def __init__(self, examples: list[records.SFTExample], tokenizer, max_length: int, max_prompt_length: int):
        rows = [{"prompt": ex.prompt, "response": ex.response} for ex in examples]
        self.data = tokenise(rows, tokenizer, tokenise_sft, "sft", max_length=max_length,
                             max_prompt_length=max_prompt_length)
        self.counts = cut_counts(self.data)
        self.items = list(zip(self.data["prompt_ids"], self.data["response_ids"])) if len(self.data) else []
        self.counts.report("SFT data", len(examples), max_length)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]

    @property
    def lengths(self) -> list[int]:
        return [len(p) + len(r) for p, r in self.items]


class _BaseDataModule(L.LightningDataModule):
    """What both DataModules share: the tokenizer, ``setup`` (records -> ``dataset_class``) and the loaders."""

    dataset_class: type

    def __init__(self, batch_size: int, eval_batch_size: Optional[int], group_by_length: bool, num_workers: int, seed: int,
                 max_length: int, max_prompt_length: int):
        super().__init__()
        if not 0 < max_prompt_length < max_length:
            raise ValueError(f"max_prompt_length={max_prompt_length} must be below max_length={max_length}, "
                             "so that a cut example keeps some response tokens")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.group_by_length, self.num_workers, self.seed = group_by_length, num_workers, seed
        self.tokenizer = None
        self.train_dataset = self.val_dataset = None

    def _tokenizer(self):
        if self.tokenizer is None:
            if self.trainer is None or not hasattr(self.trainer.lightning_module, "tokenizer"):
                raise RuntimeError("set datamodule.tokenizer, or fit it with an srlm LightningModule")
            self.tokenizer = self.trainer.lightning_module.tokenizer
        return self.tokenizer

    def _train_val(self) -> tuple[list, list]:
        """The training and validation records (validated, untokenised)."""
        raise NotImplementedError

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_dataset is not None:
            return
        tokenizer = self._tokenizer()
        self.pad_id = tokenizer.pad_token_id
        train, val = self._train_val()
        self.train_dataset = self.dataset_class(train, tokenizer, self.max_length, self.max_prompt_length)
        self.val_dataset = self.dataset_class(val, tokenizer, self.max_length, self.max_prompt_length) if val else None

    def _loader(self, dataset, train: bool) -> DataLoader:
        batch_size = self.batch_size if train else self.eval_batch_size
        if self.group_by_length:
            world = self.trainer.world_size if self.trainer is not None else 1
            # Grouped by the global batch: each rank's strided share of it is then grouped too.
            sampler = LengthGroupedSampler(dataset.lengths, batch_size * world, shuffle=train, seed=self.seed)
            if world > 1:
                # Lightning would wrap it in a *shuffling* distributed sampler, undoing the grouping:
                # shard the grouped order ourselves (each rank takes every world-size-th index).
                sampler = GroupedShard(sampler, world, self.trainer.global_rank)
        else:
            sampler = None
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=train and sampler is None,
                          collate_fn=self.collate, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, True)

    def val_dataloader(self):
        return self._loader(self.val_dataset, False) if self.val_dataset is not None and len(self.val_dataset) else []


def _split(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(items) * val_fraction)) if len(items) > 1 else 0
    val = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


class SFTDataModule(_BaseDataModule):
    """IFT + EFT examples for supervised fine-tuning (M0 -> M1), loss on the response tokens only.

    Args:
        ift_files: instruction-following files, ``{prompt, response}`` per line.
        eft_files: judge-training files: ``{question, answer, judgement}`` (filled into ``judge_template``)
            or ready ``{prompt, response}``.
        extra_files: more ``{prompt, response}`` files (e.g. the positive-examples-only variant's additions).
        judge_template: bundled template name or path used to fill EFT examples.
        max_length: longest sequence in tokens; longer examples are cut (prompt from the left first) and counted.
        max_prompt_length: the prompt keeps at least this many tokens when a long response forces a cut.
        batch_size: sequences per training step (per device).
        eval_batch_size: sequences per validation step (defaults to batch_size).
        val_fraction: share of the examples held out for validation loss.
        group_by_length: sort mega-batches by length so that batches carry little padding.
        num_workers: DataLoader workers.
        seed: seed for the split and the shuffling.
    """

    dataset_class = TokenizedSFT

    def __init__(self, ift_files: list[str] = ["seed:ift.jsonl"], eft_files: list[str] = ["seed:eft_train.jsonl"],
                 extra_files: list[str] = [], judge_template: str = "judge_additive", max_length: int = 768,
                 max_prompt_length: int = 640, batch_size: int = 4, eval_batch_size: Optional[int] = None,
                 val_fraction: float = 0.05, group_by_length: bool = True, num_workers: int = 0, seed: int = 0):
        super().__init__(batch_size, eval_batch_size, group_by_length, num_workers, seed, max_length, max_prompt_length)
        self.save_hyperparameters()
        self.ift_files, self.eft_files, self.extra_files = list(ift_files), list(eft_files), list(extra_files)
        self.judge_template, self.max_length, self.max_prompt_length = judge_template, max_length, max_prompt_length
        self.val_fraction = val_fraction

    def examples(self) -> list[records.SFTExample]:
        out = []
        for path in self.ift_files + self.eft_files + self.extra_files:
            out += load_sft_file(path, self.judge_template)
        if not out:
            raise ValueError("SFTDataModule: no examples (ift_files, eft_files and extra_files are all empty)")
        return out

    def _train_val(self) -> tuple[list, list]:
        return _split(self.examples(), self.val_fraction, self.seed)

    def collate(self, batch):
        prompts, responses = zip(*batch)
        return collate_sequences(prompts, responses, self.pad_id)


class TokenizedPairs(Dataset):
    """Preference pairs tokenised through ``datasets`` (``self.data``); reference log-probs, when known, are kept
    with each pair (``items``, which the reference pass fills in)."""

    def __init__(self, pairs: list[records.PreferencePair], tokenizer, max_length: int, max_prompt_length: int):
        self.pairs = pairs
        rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                 "chosen_token_ids": p.extra.get("chosen_token_ids") or None,
                 "rejected_token_ids": p.extra.get("rejected_token_ids") or None,
                 "chosen_finished": p.extra.get("chosen_finished"), "rejected_finished": p.extra.get("rejected_finished")}
                for p in pairs]
        self.data = tokenise(rows, tokenizer, tokenise_pair, "pairs", max_length=max_length,
                             max_prompt_length=max_prompt_length)
        self.counts = cut_counts(self.data)
        self.items = []
        for pair, row in zip(pairs, self.data):
            ref = None
            if "ref_chosen_logp" in pair.extra and "ref_rejected_logp" in pair.extra and not (
                    row["cut_prompt"] or row["cut_response"]):
                # Stored log-probs hold for the uncut pair only: a cut pair gets a reference pass.
                ref = (float(pair.extra["ref_chosen_logp"]), float(pair.extra["ref_rejected_logp"]))
            self.items.append({"prompt": row["prompt_ids"], "chosen": row["chosen_ids"],
                               "rejected": row["rejected_ids"], "ref": ref})
        self.counts.report("preference data", len(pairs), max_length)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i], i

    @property
    def lengths(self) -> list[int]:
        return [len(x["prompt"]) + max(len(x["chosen"]), len(x["rejected"])) for x in self.items]

    @property
    def has_reference(self) -> bool:
        return all(x["ref"] is not None for x in self.items)

    def set_reference(self, index: int, chosen: float, rejected: float) -> None:
        self.items[index]["ref"] = (chosen, rejected)


class PreferenceDataModule(_BaseDataModule):
    """Preference pairs ``{prompt, chosen, rejected, ...}`` for DPO.

    Args:
        pair_files: jsonl files of pairs; other fields are kept (``ref_chosen_logp``/``ref_rejected_logp``,
            when present, are used as the reference log-probs).
        val_files: held-out pairs for validation; when empty, ``val_fraction`` of pair_files is held out.
        max_length: longest prompt+response in tokens; the prompt is cut from the left first, and counted.
        max_prompt_length: the prompt keeps at least this many tokens when a cut is needed.
        batch_size: pairs per training step (per device); each step runs 2 x batch_size sequences.
        eval_batch_size: pairs per validation step.
        val_fraction: share of pairs held out when no val_files are given.
        group_by_length: sort mega-batches by length so that batches carry little padding.
        num_workers: DataLoader workers.
        seed: seed for the split and the shuffling.
    """

    dataset_class = TokenizedPairs

    def __init__(self, pair_files: list[str] = ["seed:prefs.jsonl"], val_files: list[str] = [], max_length: int = 512,
                 max_prompt_length: int = 256, batch_size: int = 2, eval_batch_size: Optional[int] = None,
                 val_fraction: float = 0.0, group_by_length: bool = True, num_workers: int = 0, seed: int = 0):
        super().__init__(batch_size, eval_batch_size, group_by_length, num_workers, seed, max_length, max_prompt_length)
        self.save_hyperparameters()
        self.pair_files, self.val_files = list(pair_files), list(val_files)
        self.max_length, self.max_prompt_length, self.val_fraction = max_length, max_prompt_length, val_fraction

    @staticmethod
    def read(files: list[str]) -> list[records.PreferencePair]:
        out = []
        for path in files:
            out += records.read_records(resolve_path(path), records.parse_preference)
        return out

    def _train_val(self) -> tuple[list, list]:
        pairs = self.read(self.pair_files)
        if not pairs:
            raise ValueError(f"PreferenceDataModule: no pairs in {self.pair_files}")
        if self.val_files:
            return pairs, self.read(self.val_files)
        return _split(pairs, self.val_fraction, self.seed)

    def collate(self, batch):
        return collate_pairs(batch, self.pad_id)


__all__ = ["SFTDataModule", "PreferenceDataModule", "load_sft_file", "resolve_path", "TokenizedSFT", "TokenizedPairs"]
