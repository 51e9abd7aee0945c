"""Length-grouped sampling, its per-rank shards and dynamic padding: batches of similar lengths waste little compute.

``LengthGroupedSampler`` yields indices, not batches; under DDP ``GroupedShard`` gives each rank
every world-size-th index of the grouped order (Lightning's own distributed sampler would shuffle
it), which keeps each rank's batches grouped too. ``collate_sequences`` pads prompt+response rows
with the loss on response tokens only; ``collate_pairs`` puts chosen and rejected in one batch.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
from torch.utils.data import DistributedSampler, Sampler

IGNORE = -100


class LengthGroupedSampler(Sampler[int]):
    """Shuffle, cut into mega-batches of ``batch_size * group``, sort each by length, shuffle batches."""

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0, group: int = 32):
        self.lengths, self.batch_size, self.shuffle, self.seed, self.group = list(lengths), batch_size, shuffle, seed, group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        mega = self.batch_size * self.group
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        return iter([i for batch in batches for i in batch])


def pad(seqs: Sequence[Sequence[int]], value: int, length: int | None = None) -> torch.Tensor:
    length = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for row, s in enumerate(seqs):
        out[row, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def collate_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> dict:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` with the loss on response tokens only."""
    ids = [list(p) + list(r) for p, r in zip(prompts, responses)]
    labels = [[IGNORE] * len(p) + list(r) for p, r in zip(prompts, responses)]
    input_ids = pad(ids, pad_id)
    attention_mask = pad([[1] * len(s) for s in ids], 0, input_ids.shape[1])
    lengths = [len(s) for s in ids]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": pad(labels, IGNORE, input_ids.shape[1]),
        # Python ints: logged without a device synchronisation.
        "n_real_tokens": sum(lengths),
        "lengths": lengths,
        "n_tokens": input_ids.numel(),
    }


class GroupedShard(DistributedSampler):
    """This rank's share of a LengthGroupedSampler's order, in order; the epoch reaches the inner sampler."""

    def __init__(self, inner: LengthGroupedSampler, num_replicas: int, rank: int):
        super().__init__(list(range(len(inner))), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.inner = inner

    def __iter__(self):
        order = list(self.inner)
        order += order[:self.total_size - len(order)]  # pad to equal shares, as DistributedSampler does
        return iter(order[self.rank:self.total_size:self.num_replicas])

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.inner.set_epoch(epoch)


def collate_pairs(batch, pad_id: int) -> dict:
    """Chosen then rejected in one right-padded batch of 2B rows, so one forward serves both."""
    items, indices = zip(*batch)
    prompts = [x["prompt"] for x in items] * 2
    responses = [x["chosen"] for x in items] + [x["rejected"] for x in items]
    out = collate_sequences(prompts, responses, pad_id)
    out["index"] = torch.tensor(indices, dtype=torch.long)
    if all(x["ref"] is not None for x in items):
        out["ref_chosen_logp"] = torch.tensor([x["ref"][0] for x in items], dtype=torch.float64)
        out["ref_rejected_logp"] = torch.tensor([x["ref"][1] for x in items], dtype=torch.float64)
    return out
