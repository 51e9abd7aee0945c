"""Batched sampling with a KV cache: the engine behind prompt generation, candidates and judging.

What makes it fast (public replications sampled one sequence at a time):
- many prompts per call, sorted by length and left-padded, so a batch carries little padding;
- each prompt's prefill runs once and its key/values are repeated for its N samples;
- the token prefix shared by every prompt of a call (the judge rubric, the few-shot header, the
  chat template's system turn) is computed once and reused by every batch of that call;
- below it, a second level of a prefix tree: prompts of a batch that share more than that (a
  judge's prompts for the replies to one question share the question) compute their shared part
  once (per batch when generating; per window of a few batches, with the batches cut by length
  inside it, when scoring);
- rows that reached end-of-turn leave the batch, so the cost follows the live sequences.

Each sample also carries the log-probability of its tokens under the model's *unprocessed* logits
(before temperature and top-p): when the sampling model is the DPO reference (M_t), these are the
reference log-probs of the candidate, and the DPO round needs no reference pass.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from srlm.allocator import trim
from srlm.inference import shared_kv
from srlm.inference.kv_cache import ContextLayer, context_cache, reserved_cache
from srlm.inference.shared_kv import SharedPrompts
from srlm.seeds import derive_seed


@dataclass
class Sampling:
    """How to sample."""

    temperature: float = 0.7
    """Softmax temperature; 0 means greedy."""
    top_p: float = 0.9
    """Nucleus sampling mass."""
    max_new_tokens: int = 256
    """Longest continuation in tokens."""


@dataclass
class Sample:
    token_ids: list[int]
    """Generated tokens, the end-of-turn token included when ``finished``."""
    logp: float
    """Sum of log p(token) under the unprocessed logits over ``token_ids``."""
    finished: bool
    """Ended with the end-of-turn token (False: cut at max_new_tokens)."""


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def group_prompts(prompts: Sequence[Sequence[int]], start: int, min_shared: int,
                  max_rows: Optional[int] = None) -> list[tuple[list[int], int]]:
    """Partition prompt indices into groups that share a prefix beyond ``start``: [(indices, shared), ...].

    ``shared`` counts the group's tokens after ``start`` common to all its members, kept at least one
    token short of its shortest member; a group of one, or one whose members share fewer than
    ``min_shared`` tokens, has ``shared`` 0. Prompts are sorted by their tokens, so those that share
    a prefix are neighbours, and the cut into groups of at most ``max_rows`` maximises the tokens
    not recomputed, sum of (members - 1) x shared (dynamic programming over the sorted order).
    Deterministic: the same prompts give the same groups.
    """
    order = sorted(range(len(prompts)), key=lambda i: (list(prompts[i][start:]), i))
    n = len(order)
    cap = n if max_rows is None else max(1, max_rows)
    # lcp[j]: tokens after start shared by the sorted neighbours j and j + 1
    lcp = []
    for a, b in zip(order, order[1:]):
        pa, pb = prompts[a], prompts[b]
        k, top = start, min(len(pa), len(pb))
        while k < top and pa[k] == pb[k]:
            k += 1
        lcp.append(k - start)
    best = [0] * (n + 1)  # best[j]: most tokens saved by a cut of the first j sorted prompts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        best[j], cut[j] = best[j - 1], j - 1  # prompt j - 1 alone
        shared, shortest = None, len(prompts[order[j - 1]])
        for i in range(j - 2, max(-1, j - 1 - cap), -1):  # group = sorted[i:j]
            shared = lcp[i] if shared is None else min(shared, lcp[i])
            shortest = min(shortest, len(prompts[order[i]]))
            usable = min(shared, shortest - start - 1)
            if usable < min_shared:
                if shared < min_shared:
                    break  # longer groups share even less
                continue
            gain = best[i] + (j - 1 - i) * usable
            if gain > best[j]:
                best[j], cut[j] = gain, i
    groups, j = [], n
    while j > 0:
        i = cut[j]
        members = order[i:j]
        shared = 0
        if len(members) > 1:
            shortest = min(len(prompts[m]) for m in members)
            shared = min(min(lcp[i:j - 1]), shortest - start - 1)
        groups.append((sorted(members), shared if shared >= min_shared else 0))
        j = i
    groups.reverse()
    return groups


def _nucleus(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the smallest prefix (of descending probabilities) whose mass reaches top_p."""
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
    return sorted_probs.masked_fill(outside, 0.0)


def _top_p_sample(logits: torch.Tensor, cfg: Sampling, generator: torch.Generator, top_k: int = 256) -> torch.Tensor:
    """Nucleus sampling, exact, without sorting the vocabulary.

    The nucleus is almost always a few dozen tokens, so the candidates are the ``top_k`` largest
    logits; a row whose nucleus is not inside them (their mass without the last one is below top_p)
    falls back to a full sort. Sorting and sampling over the whole vocabulary every step cost
    about a third of a decode step on CPU.
    """
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    scaled = logits.float() / cfg.temperature
    if cfg.top_p >= 1.0:
        return torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator)[:, 0]
    k = min(top_k, scaled.shape[-1])
    values, order = scaled.topk(k, -1)  # descending
    probs = torch.exp(values - torch.logsumexp(scaled, -1, keepdim=True))
    covered = probs[:, :-1].sum(-1) > cfg.top_p  # the k-th token, and all after it, are outside the nucleus
    if k < scaled.shape[-1] and not bool(covered.all()):
        rows = (~covered).nonzero()[:, 0]
        full_p, full_order = torch.softmax(scaled[rows], -1).sort(-1, descending=True)
        kept = _nucleus(full_p, cfg.top_p)
        choice = torch.multinomial(kept, 1, generator=generator)
        fallback = full_order.gather(-1, choice)[:, 0]
    else:
        rows, fallback = None, None
    choice = torch.multinomial(_nucleus(probs, cfg.top_p), 1, generator=generator)
    tokens = order.gather(-1, choice)[:, 0]
    if rows is not None:
        tokens[rows] = fallback
    return tokens


def _cache_of(out):
    """The key/value cache a forward returned (``cache`` since transformers 5.2x, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class Engine:
    """Sampling and scoring over a causal LM in eval mode.

    Args:
        model: a Hugging Face causal LM (adapters merged for speed).
        eos_ids: tokens that end a turn.
        pad_id: padding token.
        batch_size: prompts per forward; with N samples each, a batch has batch_size * N rows.
        share_prefix: compute the token prefix common to all prompts of a call once.
        min_prefix: shortest common prefix worth caching.
        share_groups: with ``share_prefix``, also compute once per batch what groups of its prompts share
            beyond the common prefix (the second level of the prefix tree), and form scoring batches so
            that such groups fall in the same batch.
        min_group: fewest shared tokens for which a group's prefix is computed once.
        window: scoring holds the groups' shared parts of ``window`` x ``batch_size`` prompts at a time, and cuts
            those prompts into batches by length.
        seed: seed of the sampling generator.
        share_samples: the n samples of a prompt attend over one copy of its key/values (``shared_kv``), not n.
        max_batch_tokens: a batch holds at most this many padded tokens (a single prompt longer than that runs
            alone): prompt tokens for scoring (``next_token_logprobs``); prompt + samples x new tokens for
            ``generate`` (x samples for the prompt too without ``share_samples``), which bounds its key/value
            cache (about 46 KB a token on the embedded model in fp32).
    """

    def __init__(self, model, eos_ids: Sequence[int], pad_id: int, batch_size: int = 8, share_prefix: bool = True,
                 min_prefix: int = 16, seed: int = 0, max_batch_tokens: int = 8192, share_groups: bool = True,
                 min_group: int = 4, window: int = 8, share_samples: bool = True):
        self.model, self.eos_ids, self.pad_id = model, set(int(i) for i in eos_ids), pad_id
        self.share_groups, self.min_group, self.window = share_prefix and share_groups, min_group, window
        self.max_batch_tokens, self.share_samples = max_batch_tokens, share_samples
        self.batch_size, self.share_prefix, self.min_prefix, self.seed = batch_size, share_prefix, min_prefix, seed
        self.device = next(model.parameters()).device
        self.stats = {"prefill_tokens": 0, "prefix_tokens_reused": 0, "decode_steps": 0, "generated_tokens": 0,
                      "group_tokens_reused": 0, "shared_prompt_batches": 0}
        # Prefill needs the logits of the last position only: the vocabulary projection of every other
        # position is about a fifth of a small model's prefill work.
        # A peft model's forward takes **kwargs and hands them to the model it wraps: look at that one.
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        accepts = inspect.signature(inner.forward).parameters
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        # transformers 5.2x renamed past_key_values to cache (the old name warns on every call)
        self._cache_kw = "cache" if "cache" in accepts else "past_key_values"

    # -- prefill ---------------------------------------------------------------------------------
    def _prefix_cache(self, prompts: Sequence[Sequence[int]]):
        if not self.share_prefix or len(prompts) < 2:
            return 0, None
        n = min(common_prefix(prompts), min(len(p) for p in prompts) - 1)  # keep >= 1 token per suffix
        if n < self.min_prefix:
            return 0, None
        ids = torch.tensor([list(prompts[0][:n])], device=self.device)
        out = self.model(input_ids=ids, use_cache=True, **self._last_only)
        self.stats["prefill_tokens"] += n
        layers = [(layer.keys, layer.values) for layer in _cache_of(out).layers]
        return n, layers

    def _prefill(self, prompts: Sequence[Sequence[int]], prefix_len: int, prefix_layers, new_tokens: int = 0):
        """Prefill of a batch after the common prefix, with its groups' shared parts computed once when it has some."""
        groups = group_prompts(prompts, prefix_len, self.min_group) if self.share_groups and len(prompts) > 1 else []
        if any(shared for _, shared in groups):
            return self._grouped_prefill(prompts, prefix_len, prefix_layers, groups, new_tokens)
        return self._plain_prefill(prompts, prefix_len, prefix_layers, new_tokens)

    def _plain_prefill(self, prompts: Sequence[Sequence[int]], prefix_len: int, prefix_layers, new_tokens: int = 0,
                       keep: bool = True):
        """Left-padded prefill of the prompts' suffixes after the shared prefix; logits of the last position.

        The cache reserves room for ``new_tokens`` more positions; without ``keep`` (scoring) it keeps nothing
        of the batch's own tokens.
        """
        suffixes = [list(p[prefix_len:]) for p in prompts]
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, s in enumerate(suffixes):
            ids[row, width - len(s):] = torch.tensor(s)
            mask[row, width - len(s):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (prefix_len + mask.cumsum(-1) - 1).clamp(min=0)
        cache = None if keep else context_cache(self.model.config)
        if cache is None:
            cache = reserved_cache(self.model.config, reserve=new_tokens + (width if prefix_layers is not None else 0))
        if prefix_layers is not None:
            b = len(prompts)
            for layer, (k, v) in zip(cache.layers, prefix_layers):
                if isinstance(layer, ContextLayer):
                    layer.hold(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
                else:
                    layer.update(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
            mask = torch.cat([torch.ones((b, prefix_len), dtype=torch.long, device=self.device), mask], 1)
            self.stats["prefix_tokens_reused"] += prefix_len * b
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self._cache_kw: cache}, **self._last_only)
        self.stats["prefill_tokens"] += int(sum(len(s) for s in suffixes))
        return out.logits[:, -1], _cache_of(out), mask, positions[:, -1]

    def _left_padded(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of the sequences left-padded to the longest; an empty sequence is all padding."""
        width = max(1, max(len(s) for s in seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            if len(s):
                ids[row, width - len(s):] = torch.tensor(list(s))
                mask[row, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _group_parts(self, parts: Sequence[Sequence[int]], prefix_len: int, prefix_layers):
        """Key/values of each group's shared part (its tokens after the common prefix), over the common prefix.

        One left-padded forward per ``batch_size`` parts; for each part, per layer, (keys, values) of
        shape [heads, part length, head_dim], copied out of the batch so the batch's cache is freed.
        """
        out = []
        for begin in range(0, len(parts), max(1, self.batch_size)):
            batch = parts[begin:begin + max(1, self.batch_size)]
            ids, mask = self._left_padded(batch)
            rows, width = ids.shape
            positions = (prefix_len + mask.cumsum(-1) - 1).clamp(min=0)
            cache = reserved_cache(self.model.config, reserve=width if prefix_layers is not None else 0)
            head = 0
            if prefix_layers is not None:
                for layer, (k, v) in zip(cache.layers, prefix_layers):
                    layer.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                mask = torch.cat([torch.ones((rows, prefix_len), dtype=torch.long, device=self.device), mask], 1)
                head = prefix_len
            result = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                **{self._cache_kw: cache}, **self._last_only)
            layers = [(layer.keys, layer.values) for layer in _cache_of(result).layers]
            for row, part in enumerate(batch):
                at = head + width - len(part)
                out.append([(k[row, :, at:at + len(part)].clone(), v[row, :, at:at + len(part)].clone())
                            for k, v in layers])
            self.stats["prefill_tokens"] += sum(len(p) for p in batch)
        return out

    def _tree_prefill(self, prompts: Sequence[Sequence[int]], prefix_len: int, prefix_layers,
                      parts: Sequence[Optional[list]], new_tokens: int = 0, keep: bool = True):
        """``_prefill`` for prompts whose groups' shared parts are computed (``_group_parts``; None: no part).

        The cache of a row is [common prefix | its group's part, left-padded | its rest, left-padded]:
        padding in the middle is masked out, as the common-prefix layout already does, and holds zeros
        (finite scores under the mask).
        """
        b = len(prompts)
        lens = [0 if part is None else part[0][0].shape[1] for part in parts]
        g_width = max(lens)
        suffixes = [list(p[prefix_len + n:]) for p, n in zip(prompts, lens)]
        ids, mask = self._left_padded(suffixes)
        width = ids.shape[1]
        head = prefix_len if prefix_layers is not None else 0
        g_mask = torch.zeros((b, head + g_width), dtype=torch.long, device=self.device)
        g_mask[:, :head] = 1
        for row, n in enumerate(lens):
            g_mask[row, head + g_width - n:] = 1
        some = next(part for part in parts if part is not None)
        cache = None if keep else context_cache(self.model.config)
        if cache is None:
            cache = reserved_cache(self.model.config, reserve=new_tokens + width)
        for number, layer in enumerate(cache.layers):
            like_k, like_v = some[number]
            keys = like_k.new_zeros((b, like_k.shape[0], head + g_width, like_k.shape[2]))
            values = like_v.new_zeros((b, like_v.shape[0], head + g_width, like_v.shape[2]))
            if prefix_layers is not None:
                keys[:, :, :head], values[:, :, :head] = prefix_layers[number]
            for row, part in enumerate(parts):
                if part is not None:
                    keys[row, :, head + g_width - lens[row]:] = part[number][0]
                    values[row, :, head + g_width - lens[row]:] = part[number][1]
            layer.hold(keys, values) if isinstance(layer, ContextLayer) else layer.update(keys, values)
        mask = torch.cat([g_mask, mask], 1)
        positions = (prefix_len + torch.tensor(lens, device=self.device)[:, None]
                     + mask[:, -width:].cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self._cache_kw: cache}, **self._last_only)
        self.stats["prefill_tokens"] += sum(len(s) for s in suffixes)
        self.stats["prefix_tokens_reused"] += head * b
        self.stats["group_tokens_reused"] += sum(lens)
        return out.logits[:, -1], _cache_of(out), mask, positions[:, -1]

    def _grouped_prefill(self, prompts: Sequence[Sequence[int]], prefix_len: int, prefix_layers,
                         groups: list[tuple[list[int], int]], new_tokens: int):
        """``_prefill`` of one batch with its groups' shared parts computed first (one forward), then the rest."""
        shared = [(members, n) for members, n in groups if n]
        computed = self._group_parts([prompts[members[0]][prefix_len:prefix_len + n] for members, n in shared],
                                     prefix_len, prefix_layers)
        parts: list[Optional[list]] = [None] * len(prompts)
        for (members, _), part in zip(shared, computed):
            for i in members:
                parts[i] = part
        self.stats["group_tokens_reused"] -= sum(n for _, n in shared)  # computed once, not reused
        return self._tree_prefill(prompts, prefix_len, prefix_layers, parts, new_tokens)

    def _scoring_batches(self, prompts: Sequence[Sequence[int]], prefix_len: int, prefix_layers,
                         skip: Optional[Callable[[list[int]], bool]]):
        """(batch indices, each row's group part or None) for ``next_token_logprobs``, ``skip``ped batches left out.

        Without groups the parts are None. With them, a window's group parts are computed when its
        first batch that is not skipped comes.
        """
        if not self.share_groups or len(prompts) < 2:
            for chunk in self._chunks(prompts, self.batch_size, self.max_batch_tokens):
                if skip is None or not skip(list(chunk)):
                    yield chunk, None
            return
        for groups, batches in self._windows(prompts, prefix_len, self.batch_size, self.max_batch_tokens,
                                             self.window * max(1, self.batch_size)):
            parts: Optional[dict] = None
            for chunk in batches:
                if skip is not None and skip(list(chunk)):
                    continue
                if parts is None:
                    shared = [(members, n) for members, n in groups if n]
                    computed = self._group_parts([prompts[m[0]][prefix_len:prefix_len + n] for m, n in shared],
                                                 prefix_len, prefix_layers)
                    parts = {i: part for (members, _), part in zip(shared, computed) for i in members}
                    self.stats["group_tokens_reused"] -= sum(n for _, n in shared)  # computed once, not reused
                yield chunk, [parts.get(i) for i in chunk]

    def _windows(self, prompts: Sequence[Sequence[int]], start: int, size: int, max_tokens: Optional[int],
                 window: int):
        """Scoring batches with a prefix tree: (groups of the window, its batches), window after window.

        Prompts sharing a prefix beyond ``start`` form groups; groups are taken longest first into
        windows of about ``window`` prompts, so that a group's shared part is computed once and kept
        only while its window runs. Inside a window the batches are cut as ``_chunks`` cuts them, by the
        length of what each prompt computes beyond its group's part, so they carry little padding.
        """
        groups = group_prompts(prompts, start, self.min_group)
        longest = lambda members: max(len(prompts[i]) for i in members)  # noqa: E731
        groups.sort(key=lambda g: (-longest(g[0]), g[0][0]))
        begin = 0
        while begin < len(groups):
            end, rows = begin, 0
            while end < len(groups) and (rows == 0 or rows + len(groups[end][0]) <= window):
                rows += len(groups[end][0])
                end += 1
            taken = groups[begin:end]
            rest = {i: len(prompts[i]) - n for members, n in taken for i in members}
            order = sorted(rest, key=lambda i: (-rest[i], i))
            batches, at = [], 0
            while at < len(order):
                n = size if max_tokens is None else max(1, min(size, max_tokens // max(1, len(prompts[order[at]]))))
                batches.append(order[at:at + n])
                at += n
            yield taken, batches
            begin = end

    def _chunks(self, prompts: Sequence[Sequence[int]], size: int, max_tokens: Optional[int] = None,
                new_tokens: int = 0, samples: int = 1):
        """Batches of prompt indices, longest first; with ``max_tokens``, a batch of long prompts has fewer prompts
        (prompts x samples x (longest + new_tokens) <= max_tokens), so that its padded prefill, attention and
        key/value cache stay within bounds."""
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        start = 0
        while start < len(order):
            per_prompt = samples * (len(prompts[order[start]]) + new_tokens)
            rows = size if max_tokens is None else max(1, min(size, max_tokens // max(1, per_prompt)))
            yield order[start:start + rows]
            start += rows

    # -- public ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def next_token_logprobs(self, prompts: Sequence[Sequence[int]],
                            on_batch: Optional[Callable[[list[int], list[torch.Tensor]], None]] = None,
                            skip: Optional[Callable[[list[int]], bool]] = None) -> list[Optional[torch.Tensor]]:
        """log p(next token | prompt) for each prompt, [vocab] on the CPU each (one forward per prompt)."""
        prefix_len, layers = self._prefix_cache(prompts)
        out: list[Optional[torch.Tensor]] = [None] * len(prompts)
        # Scoring prompts (a judge's: rubric + question + reply) can run to thousands of tokens: batches are
        # bounded by tokens as well as rows.
        for chunk, parts in self._scoring_batches(prompts, prefix_len, layers, skip):
            batch = [prompts[i] for i in chunk]
            if parts is not None and any(part is not None for part in parts):
                logits, *_ = self._tree_prefill(batch, prefix_len, layers, parts, keep=False)
            else:
                logits, *_ = self._plain_prefill(batch, prefix_len, layers, keep=False)
            logprobs = torch.log_softmax(logits.float(), -1).cpu()
            for row, i in enumerate(chunk):
                out[i] = logprobs[row]
            if on_batch is not None:
                on_batch(list(chunk), [logprobs[row] for row in range(len(chunk))])
        trim()  # the batches' activations and key/values go back to the system between calls
        return out

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], n: int, cfg: Sampling,
                 on_batch: Optional[Callable[[list[int], list[list[Sample]]], None]] = None,
                 skip: Optional[Callable[[list[int]], bool]] = None, seed: Optional[int] = None) -> list[list[Sample]]:
        """``n`` samples for each prompt (token ids).

        ``on_batch(prompt_indices, samples)`` is called as each batch of prompts completes, so callers
        can write results as they come. Batches are a fixed partition of the prompts (by their lengths,
        ``batch_size`` and ``max_batch_tokens``) with a fixed seed each, so a resumed call that ``skip``s the
        batches already written samples the rest exactly as an uninterrupted call would have. Skipped prompts
        get ``None``.
        """
        prefix_len, layers = self._prefix_cache(prompts)
        per_call = max(1, self.batch_size)
        base_seed = self.seed if seed is None else seed
        results: list[Optional[list[Sample]]] = [None] * len(prompts)
        # A batch's key/values are its prompts (once when the samples share them, else n times) and the samples'
        # new tokens: batches are bounded by those tokens, so that a generative judge (k samples of long rubric
        # prompts) holds no more than candidates do.
        share = n > 1 and self.share_samples and shared_kv.supported(self.model, reserved_cache(self.model.config, 0))
        batches = (self._chunks(prompts, per_call, self.max_batch_tokens, n * cfg.max_new_tokens) if share else
                   self._chunks(prompts, per_call, self.max_batch_tokens, cfg.max_new_tokens, n))
        for number, chunk in enumerate(batches):
            if skip is not None and skip(list(chunk)):
                continue
            generator = torch.Generator(device=self.device).manual_seed(derive_seed(base_seed, number))
            # one prefill per prompt; its key/values serve its n samples as one copy (shared_kv) or n
            logits, cache, mask, last_pos = self._prefill([prompts[i] for i in chunk], prefix_len, layers,
                                                          0 if share else cfg.max_new_tokens)
            shared = None
            if share:
                self.stats["shared_prompt_batches"] += 1
                shared, cache, mask = SharedPrompts(cache, mask, n), reserved_cache(self.model.config,
                                                                                    cfg.max_new_tokens), None
            elif n > 1:
                cache.batch_repeat_interleave(n)
                mask = mask.repeat_interleave(n, 0)
            if n > 1:
                logits, last_pos = logits.repeat_interleave(n, 0), last_pos.repeat_interleave(n, 0)
            samples = self._decode(logits, cache, mask, last_pos, cfg, generator, shared)
            grouped = [samples[k * n:(k + 1) * n] for k in range(len(chunk))]
            for i, group in zip(chunk, grouped):
                results[i] = group
            if on_batch is not None:
                on_batch(list(chunk), grouped)
            # before the next batch's prefill: else this batch's key/values (rows x prompt and new tokens x
            # layers, about 0.8 GB for a generative judge's 8 x 3 rows) live on beside the next batch's
            del logits, cache, mask, last_pos, samples, grouped, shared
        trim()
        return results  # type: ignore[return-value]

    def _decode(self, logits, cache, mask, last_pos, cfg: Sampling, generator,
                shared: Optional[SharedPrompts] = None) -> list[Sample]:
        """Sample from the prefill's ``logits`` on; with ``shared``, ``cache`` holds only the new tokens and
        attention reads each row's prompt from ``shared`` (``mask`` is None)."""
        attend = shared_kv.shared_prompt_attention_of(self.model) if shared is not None else nullcontext()
        with attend:
            return self._decode_steps(logits, cache, mask, last_pos, cfg, generator, shared)

    def _decode_steps(self, logits, cache, mask, last_pos, cfg: Sampling, generator, shared) -> list[Sample]:
        rows = logits.shape[0]
        tokens: list[list[int]] = [[] for _ in range(rows)]
        logps = [0.0] * rows
        finished = [False] * rows
        live = list(range(rows))  # live[j] = original row of batch position j
        for step in range(cfg.max_new_tokens):
            logits = logits.float()
            nxt = _top_p_sample(logits, cfg, generator)
            # log p under the unprocessed logits, without materialising a vocabulary-wide log_softmax
            lp = logits.gather(-1, nxt[:, None])[:, 0] - torch.logsumexp(logits, -1)
            nxt_list, lp_list = nxt.tolist(), lp.tolist()
            keep = []
            for j, row in enumerate(live):
                tokens[row].append(nxt_list[j])
                logps[row] += lp_list[j]
                if nxt_list[j] in self.eos_ids:
                    finished[row] = True
                else:
                    keep.append(j)
            self.stats["generated_tokens"] += len(live)
            if not keep or step == cfg.max_new_tokens - 1:
                break
            if len(keep) < len(live):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                nxt, last_pos = nxt[index], last_pos[index]
                if shared is not None:
                    shared.select(index)
                else:
                    mask = mask[index]
                live = [live[j] for j in keep]
            last_pos = last_pos + 1
            if shared is not None:
                step = {"shared_prompts": shared}
            else:
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
                step = {"attention_mask": mask}
            out = self.model(input_ids=nxt[:, None], position_ids=last_pos[:, None], use_cache=True,
                             **{self._cache_kw: cache}, **step)
            logits = out.logits[:, -1]
            self.stats["decode_steps"] += 1
        return [Sample(tokens[r], logps[r], finished[r]) for r in range(rows)]
