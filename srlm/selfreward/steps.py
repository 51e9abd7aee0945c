"""The self-instruction creation steps, each resumable on its own output file.

Every record carries an id and is appended (and flushed) as soon as its batch is done; a rerun
reads what is there, skips those ids and continues, so after any kill every record ends up in
the file exactly once. A torn last line from a kill is dropped on reopening (JsonlAppender).
``ShardedWriter`` is that writing, shared by every step. Every seed is ``srlm.seeds.derive_seed``
of the step's seed and the fixed batch's number.

1. ``generate_prompts``: few-shot requests (8 seed prompts each by default); only the model's
   new text is harvested, filtered and deduplicated (PromptFilter). Request i always shows the
   same examples, so a resumed run asks the same questions.
2. ``generate_candidates``: N samples per prompt, with each sample's log-prob under the sampling
   model (the next DPO round's reference) when the text re-tokenises to the sampled tokens.
3. ``judge_candidates``: the judge's score for every candidate.
4. ``make_pairs``: best against worst per prompt; ties, identical texts, unscored and cut candidates
   handled in pairs.py.

Under several processes (``torch.distributed`` initialised) the fixed batches of steps 1-3 are
shared out, batch k to rank k % world, each batch keeping its seed; the records of each round of
batches are gathered to every rank (srlm.selfreward.distributed) and rank 0 alone writes them. The
files hold the same records as a one-process run; resume needs the same number of processes.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from srlm.data.chat import encode_prompt
from srlm.data.records import iter_jsonl, write_jsonl
from srlm.prompts import PromptTemplate
from srlm.inference.engine import Engine, Sampling
from srlm.inference.judge import Judge
from srlm.seeds import derive_seed
from srlm.selfreward import distributed as dist
from srlm.selfreward.config import CANDIDATE_SAMPLING, PROMPT_SAMPLING
from srlm.selfreward.pairs import build_pairs
from srlm.selfreward.prompt_filter import PromptFilter, extract_new_prompt

log = logging.getLogger(__name__)


def existing(path: Path) -> list[dict]:
    return [obj for _, obj in iter_jsonl(path)] if Path(path).exists() else []


class Progress:
    """A progress bar with count and rate (tqdm), shown on rank 0 only."""

    def __init__(self, desc: str, total: int, initial: int = 0, enabled: bool = True):
        self.bar = None
        if enabled and dist.is_rank0():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="rec", dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ShardedWriter:
    """The resumable, sharded writing every step shares: what ``out_path`` holds already (``seen``, by ``key``),
    the rows of each round of fixed batches gathered from every rank (``step``, then ``finish_round`` after
    this rank's last batch) and appended by rank 0, a progress bar, and a barrier on leaving, after which
    ``records()`` is the whole file on every rank.

        with ShardedWriter(path, "judging", total, show_progress) as out:
            ... out.step(rows) per batch this rank ran ...; out.finish_round()
        rows = out.records()
    """

    def __init__(self, out_path: Path, desc: str, total: int, show_progress: bool = True,
                 on_rows: Optional[Callable[[list[dict]], None]] = None, key: str = "id"):
        self.path, self.key = Path(out_path), key
        self.have = existing(self.path)
        self.seen = {r[key] for r in self.have}
        self.bar = Progress(desc, total, len(self.have), show_progress)
        self.on_rows = on_rows

    def __enter__(self) -> "ShardedWriter":
        self.out = dist.appender(self.path).__enter__()
        self.gather = dist.RoundGather(self.write)
        return self

    def write(self, rows: list[dict]) -> None:
        """Every rank, with rows every rank knows (gathered, or the same everywhere); rank 0 writes them."""
        self.out.write_many(rows)
        self.seen.update(r[self.key] for r in rows)
        self.bar.update(len(rows))
        if self.on_rows is not None:
            self.on_rows(rows)

    def step(self, rows: list[dict]) -> None:
        """This rank's rows of one fixed batch (each rank calls it once per batch it ran)."""
        self.gather.step(rows)

    def finish_round(self) -> None:
        """After this rank's last batch of a call: keep joining the gathering until every rank is done."""
        self.gather.finish()

    def __exit__(self, *exc) -> None:
        self.out.__exit__(*exc)
        self.bar.close()
        if exc[0] is None:
            dist.barrier()  # rank 0 has written everything

    def records(self) -> list[dict]:
        return existing(self.path)


# -- 1. prompts ------------------------------------------------------------------------------------
def few_shot_examples(seed_prompts: Sequence[str], request: int, k: int, seed: int) -> list[str]:
    rng = random.Random(derive_seed(seed, "few-shot", request))  # request i shows the same examples every run
    return rng.sample(list(seed_prompts), min(k, len(seed_prompts)))


def render_examples(examples: Sequence[str]) -> str:
    return "\n\n".join(f"Task {i}: {e.strip()}" for i, e in enumerate(examples, start=1))


def next_task_cue(examples: Sequence[str]) -> str:
    """Forced start of the answer: small chat models otherwise reply *about* the list instead of extending it."""
    return f"Task {len(examples) + 1}:"


def generate_prompts(engine: Engine, tokenizer, seed_prompts: Sequence[str], template: PromptTemplate, out_path: Path,
                     *, target: int, max_requests: Optional[int] = None, few_shot: int = 8,
                     sampling: Sampling = PROMPT_SAMPLING, seed: int = 0, id_prefix: str = "p",
                     requests_per_batch: int = 16, show_progress: bool = True) -> dict:
    """Write ``target`` new prompts to ``out_path``; the decision on every request goes to ``*.log.jsonl``.

    Requests are processed in fixed batches with fixed seeds, in order: a resumed run skips the
    requests already decided (logged, or kept) and reaches the same prompts as an uninterrupted one.
    Under several ranks, a round runs one pending batch per rank; the texts are gathered and every
    rank applies the filter to them in batch order, as one process would.
    """
    out_path = Path(out_path)
    template.require("examples")
    decisions_path = out_path.with_suffix(".log.jsonl")
    max_requests = max_requests or 4 * target
    writer = ShardedWriter(out_path, "prompts", target, show_progress)
    kept = list(writer.have)
    decisions = {d["request"]: d["reason"] for d in existing(decisions_path)}
    decisions.update({r["request"]: "kept" for r in kept})  # a kill between the two writes
    filt = PromptFilter(list(seed_prompts))
    for r in kept:
        filt.remember(r["prompt"])
    start = time.time()
    batches = [list(range(first, min(first + requests_per_batch, max_requests)))
               for first in range(0, max_requests, requests_per_batch)]
    pending = [(number, batch) for number, batch in enumerate(batches) if not all(r in decisions for r in batch)]
    world, rank = dist.world_size(), dist.rank()
    with writer as out, dist.appender(decisions_path) as dec:
        for first in range(0, len(pending), world):
            if len(kept) >= target:  # the same on every rank: all see the same gathered texts
                break
            texts = None
            if first + rank < len(pending):  # this round's batches: one per rank
                number, batch = pending[first + rank]
                shown = {r: few_shot_examples(seed_prompts, r, few_shot, seed) for r in batch}
                ids = [encode_prompt(tokenizer, template.fill(examples=render_examples(shown[r])))
                       + tokenizer(next_task_cue(shown[r]), add_special_tokens=False)["input_ids"] for r in batch]
                samples = engine.generate(ids, 1, sampling, seed=derive_seed(seed, "requests", number))
                texts = [extract_new_prompt(tokenizer.decode(group[0].token_ids, skip_special_tokens=True))
                         for group in samples]
            for (_, batch), batch_texts in zip(pending[first:first + world], dist.all_gather(texts)):
                for r, text in zip(batch, batch_texts):
                    if len(kept) >= target:
                        break
                    if r in decisions:
                        continue
                    reason = filt.check(text or "", few_shot_examples(seed_prompts, r, few_shot, seed))
                    if reason is None:
                        record = {"id": f"{id_prefix}{r}", "prompt": text, "request": r}
                        out.write([record])  # the record first: a request with a record is decided
                        kept.append(record)
                    dec.write({"request": r, "reason": reason or "kept"})
                    decisions[r] = reason or "kept"
    stats = {"kept": len(kept), "requests": len(decisions), "seconds": round(time.time() - start, 1)}
    for reason in decisions.values():
        if reason != "kept":
            stats[f"dropped_{reason}"] = stats.get(f"dropped_{reason}", 0) + 1
    if len(kept) < target:
        log.warning("prompt generation kept %d of %d prompts after %d requests", len(kept), target, max_requests)
    return stats


def shard_skip(done: Callable[[list[int]], bool]) -> Callable[[list[int]], bool]:
    """``skip`` for an Engine call under several ranks: the engine asks once per fixed batch, in order,
    so the k-th question is batch k, which this rank runs when k % world == rank and it is not done."""
    numbers = itertools.count()

    def skip(chunk: list[int]) -> bool:
        number = next(numbers)  # counted on every call, run or skipped
        return not dist.mine(number) or done(chunk)

    return skip


# -- 2. candidates ---------------------------------------------------------------------------------
def retokenizes(tokenizer, sample) -> bool:
    """Whether the decoded text tokenises back to the sampled tokens (BPE may pick another segmentation)."""
    body = sample.token_ids[:-1] if sample.finished else sample.token_ids
    ids = tokenizer(tokenizer.decode(body, skip_special_tokens=False), add_special_tokens=False)["input_ids"]
    return ids == body


def harvests_exactly(model) -> bool:
    """Whether log-probs summed while decoding equal a reference pass's: fp32 weights, none quantised.

    Measured (benchmarks/logprob_gap.py, SmolLM2-135M, ~50-token responses): fp32 differs by at most
    5e-4 nats per sequence; bf16 by up to 1.0 and 4-bit NF4 by up to 0.9, far more than the 0.05 a
    DPO margin bears at beta 0.1, so in those precisions the DPO round computes its reference instead.
    """
    if not isinstance(model, torch.nn.Module):  # a serving engine's (vLLM): not the training forward, recomputed
        return False
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return False
    return all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point())


def generate_candidates(engine: Engine, tokenizer, prompts: Sequence[dict], out_path: Path, *, n: int = 4,
                        sampling: Sampling = CANDIDATE_SAMPLING, show_progress: bool = True,
                        tag: str = "c") -> dict:
    """``n`` responses per prompt record ``{id, prompt}``, appended as each batch of prompts completes.

    Empty responses are recorded (``"empty": true``) so that a rerun knows they were made; they are
    never judged or paired. A finished response's summed log-prob (``logp``) is kept as its DPO
    reference only where it is exact (``harvests_exactly``); elsewhere it is null and recomputed.
    """
    harvest = harvests_exactly(engine.model)
    cid = lambda i, k: f"{prompts[i]['id']}-{tag}{k}"  # noqa: E731  (tag: c for M_t's, a for an anchor's)
    start, tokens = time.time(), 0

    def count_tokens(rows):
        nonlocal tokens
        tokens += sum(r["n_tokens"] for r in rows)

    with ShardedWriter(out_path, "candidates", len(prompts) * n, show_progress, on_rows=count_tokens) as out:
        def on_batch(indices, groups):
            rows = []
            for i, group in zip(indices, groups):
                for k, sample in enumerate(group):
                    if cid(i, k) in out.seen:
                        continue
                    body = sample.token_ids[:-1] if sample.finished else sample.token_ids
                    response = tokenizer.decode(body, skip_special_tokens=False)
                    # The sampled token ids travel with the text, so the DPO round trains on exactly these
                    # tokens and their log-prob under M_t (its reference) needs no reference pass.
                    rows.append({"id": cid(i, k), "prompt_id": prompts[i]["id"], "prompt": prompts[i]["prompt"],
                                 "candidate": k, "response": response, "finished": sample.finished,
                                 "n_tokens": len(sample.token_ids), "token_ids": sample.token_ids,
                                 "logp": sample.logp if sample.finished and harvest else None,
                                 "retokenizes": retokenizes(tokenizer, sample), "empty": not response.strip()})
            out.step(rows)

        if any(cid(i, k) not in out.seen for i in range(len(prompts)) for k in range(n)):
            engine.generate([encode_prompt(tokenizer, p["prompt"]) for p in prompts], n, sampling, on_batch=on_batch,
                            skip=shard_skip(lambda chunk: all(cid(i, k) in out.seen for i in chunk for k in range(n))))
            out.finish_round()
    rows = out.records()
    seconds = time.time() - start
    return {"prompts": len(prompts), "candidates": len(rows), "empty": sum(bool(r.get("empty")) for r in rows),
            "unfinished": sum(not r["finished"] for r in rows),
            "harvested_logp": sum(r.get("logp") is not None for r in rows),
            "retokenize_mismatch": sum(not r.get("retokenizes", True) for r in rows), "seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 and tokens else None}


# -- 3. judging ------------------------------------------------------------------------------------
def judge_candidates(judge: Judge, candidates: Sequence[dict], out_path: Path, *, part: int = 64,
                     seed: Optional[int] = None, show_progress: bool = True) -> dict:
    """One judgement record per candidate: ``{id, prompt_id, score, scores, outputs?}``.

    Candidates are judged in fixed parts with fixed seeds derived from ``seed`` (default: the judge
    engine's seed), so a resumed run judges the rest exactly as an uninterrupted run would, and
    another seed samples other judgements.
    """
    seed = judge.engine.seed if seed is None else seed
    start = time.time()
    with ShardedWriter(out_path, "judging", len(candidates), show_progress) as out:
        out.write([{"id": c["id"], "prompt_id": c["prompt_id"], "score": None, "scores": [], "skipped": "empty"}
                   for c in candidates if c.get("empty") and c["id"] not in out.seen])
        judged = [c for c in candidates if not c.get("empty")]
        for number, begin in enumerate(range(0, len(judged), part)):
            items = judged[begin:begin + part]
            if all(c["id"] in out.seen for c in items):
                continue

            def on_batch(indices, results, items=items):
                out.step([{"id": items[i]["id"], "prompt_id": items[i]["prompt_id"], **res.to_json()}
                          for i, res in zip(indices, results) if items[i]["id"] not in out.seen])

            judge.score([(c["prompt"], c["response"]) for c in items], on_batch=on_batch,
                        skip=shard_skip(lambda chunk, items=items: all(items[i]["id"] in out.seen for i in chunk)),
                        seed=derive_seed(seed, "judging", number))
            out.finish_round()
    rows = out.records()
    return {"judged": len(rows), "samples": sum(len(r["scores"]) for r in rows),
            "unparsed_samples": sum(s is None for r in rows for s in r["scores"]),
            "unscored": sum(r["score"] is None for r in rows), "seconds": round(time.time() - start, 1)}


# -- 4. pairs --------------------------------------------------------------------------------------
def make_pairs(candidates: Sequence[dict], judgements: Sequence[dict], out_path: Path, *, min_margin: float = 0.0,
               allow_unfinished_chosen: bool = False, length_control: Optional[float] = None,
               anchors: Sequence[dict] = ()) -> dict:
    """Join candidates with their scores and write the preference pairs (atomically; rank 0 only).

    Identical responses are never paired, and a response cut at max_new_tokens is never chosen unless
    ``allow_unfinished_chosen`` (see pairs.py); a cut one that is rejected is marked ``rejected_finished: false``,
    and training appends no end-of-turn token to it. ``anchors``: an earlier model's judged candidates for
    the same prompts, then the only rejectable ones (anchored rejection); their log-probs are the earlier
    model's, not M_t's, so such pairs get a reference pass.
    """
    scores = {j["id"]: j["score"] for j in judgements}
    joined = [{"prompt_id": c["prompt_id"], "prompt": c["prompt"], "candidate_id": c["id"], "response": c["response"],
               "score": scores.get(c["id"]), "logp": c.get("logp"), "finished": c.get("finished", True)}
              for c in candidates]
    joined += [{"prompt_id": c["prompt_id"], "prompt": c["prompt"], "candidate_id": c["id"], "response": c["response"],
                "score": scores.get(c["id"]), "logp": None, "finished": c.get("finished", True), "anchor": True}
               for c in anchors]
    pairs, stats = build_pairs(joined, min_margin=min_margin, allow_unfinished_chosen=allow_unfinished_chosen,
                               length_control=length_control, anchored=bool(anchors))
    by_id = {c["id"]: c for c in candidates}
    by_id.update({c["id"]: {**c, "logp": None} for c in anchors})
    for pair in pairs:  # harvested reference log-probs travel with the pair, with the tokens they score
        chosen, rejected = by_id[pair["chosen_id"]], by_id[pair["rejected_id"]]
        if chosen.get("logp") is not None and rejected.get("logp") is not None and "token_ids" in chosen:
            pair["chosen_token_ids"], pair["rejected_token_ids"] = chosen["token_ids"], rejected["token_ids"]
            pair["ref_chosen_logp"], pair["ref_rejected_logp"] = chosen["logp"], rejected["logp"]
    if dist.is_rank0():
        write_jsonl(out_path, pairs)
    dist.barrier()
    return stats
