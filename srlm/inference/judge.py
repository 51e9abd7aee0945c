"""LLM-as-a-Judge: the model scores a response to a question with the judge template.

Two modes, chosen by config:
- ``generative`` (the paper's): sample the judgement k times (one prefill per judge prompt for
  its k samples), parse ``Score: N`` from each sample's own text, average the parsed scores;
  unparsed or out-of-range samples are counted and left out.
- ``logit``: one forward pass with the ``Score:`` cue forced as the start of the answer, then the
  expectation of the score under the probabilities of the digit tokens 0..max_score. Always
  yields a score, with no sampling; ``mass`` tells how much probability the digits carried.
- ``reasoned``: the logit judge after a written judgement: sample k judgements, cut each before
  any score line it wrote, force ``Score:`` after it and read the digits as ``logit`` does. Every
  sample gets a score and its text ends in ``Score: d`` (d the most probable digit), which is what
  the meta-judge compares when the model rarely writes a parsable score itself.

Both compute the key/values of the part shared by every judge prompt (system turn and rubric)
once per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from srlm.data.chat import encode_prompt
from srlm.prompts import PromptTemplate
from srlm.inference.engine import Engine, Sampling
from srlm.inference.scoring import before_score, parse_score

JUDGE_SAMPLES = 3
"""Judgements sampled per response in the generative and reasoned modes, averaged (paper: 3)."""
JUDGE_SAMPLING = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=128)
"""How a judgement is sampled (the one default of the judge's length: the loop, ``judge`` and ``evaluate``)."""


@dataclass
class JudgeResult:
    score: Optional[float]
    """Mean of the valid sample scores (generative) or the expected score (logit); None if no sample parsed."""
    scores: list = field(default_factory=list)
    """Each sample's parsed score (None where unparsed)."""
    outputs: list = field(default_factory=list)
    """Each sample's judgement text (generative mode)."""
    mass: Optional[float] = None
    """Probability carried by the score digits after the cue (logit mode)."""

    def to_json(self) -> dict:
        out = {"score": self.score, "scores": self.scores}
        if self.outputs:
            out["outputs"] = self.outputs
        if self.mass is not None:
            out["mass"] = self.mass
        return out


class Judge:
    def __init__(self, engine: Engine, tokenizer, template: PromptTemplate, max_score: int = 5):
        self.engine, self.tokenizer, self.max_score = engine, tokenizer, max_score
        self.template = template.require("question", "response")

    def judge_prompt(self, question: str, response: str) -> str:
        return self.template.fill(question=question, response=response)

    def prompt_ids(self, question: str, response: str) -> list[int]:
        return encode_prompt(self.tokenizer, self.judge_prompt(question, response))

    def score(self, items: Sequence[tuple[str, str]],
              on_batch: Optional[Callable[[list[int], list[JudgeResult]], None]] = None,
              skip: Optional[Callable[[list[int]], bool]] = None, seed: Optional[int] = None) -> list[Optional[JudgeResult]]:
        """Judge each (question, response); batches for which ``skip(indices)`` is true are not run (None)."""
        raise NotImplementedError


class GenerativeJudge(Judge):
    """Sample k judgements per response and average the parsed scores."""

    def __init__(self, engine: Engine, tokenizer, template: PromptTemplate, samples: int = JUDGE_SAMPLES,
                 sampling: Sampling = JUDGE_SAMPLING, max_score: int = 5):
        super().__init__(engine, tokenizer, template, max_score)
        self.samples, self.sampling = samples, sampling

    def _result(self, samples) -> JudgeResult:
        texts = [self.tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in samples]
        # Parse only what the judge wrote: the echoed rubric and response are not in these texts.
        scores = [parse_score(t, max_score=self.max_score) for t in texts]
        valid = [s for s in scores if s is not None]
        return JudgeResult(sum(valid) / len(valid) if valid else None, scores, texts)

    def score(self, items, on_batch=None, skip=None, seed=None):
        prompts = [self.prompt_ids(q, r) for q, r in items]
        callback = None
        if on_batch is not None:
            callback = lambda idx, groups: on_batch(idx, [self._result(g) for g in groups])  # noqa: E731
        results = self.engine.generate(prompts, self.samples, self.sampling, on_batch=callback, skip=skip, seed=seed)
        return [self._result(g) if g is not None else None for g in results]


def digit_token_ids(tokenizer, cue: str, max_score: int) -> tuple[list[int], list[int]]:
    """(cue token ids, one token id per score 0..max_score) such that cue + digit tokenises as cue then digit."""
    for cue_text, fmt in ((cue + " ", "{d}"), (cue, " {d}"), (cue, "{d}")):
        cue_ids = tokenizer(cue_text, add_special_tokens=False)["input_ids"]
        digits = []
        for d in range(max_score + 1):
            ids = tokenizer(cue_text + fmt.format(d=d), add_special_tokens=False)["input_ids"]
            if ids[:len(cue_ids)] != cue_ids or len(ids) != len(cue_ids) + 1:
                break
            digits.append(ids[-1])
        if len(digits) == max_score + 1 and len(set(digits)) == len(digits):
            return cue_ids, digits
    raise ValueError(f"the tokenizer has no single-token digits after the cue '{cue}': use judge_mode generative")


def choice_token_ids(tokenizer, cue: str, choices: Sequence[str] = ("A", "B")) -> tuple[list[int], list[int]]:
    """(cue token ids, one token id per choice) such that cue + choice tokenises as the cue then one token."""
    for cue_text, fmt in ((cue, " {c}"), (cue + " ", "{c}"), (cue, "{c}")):
        cue_ids = tokenizer(cue_text, add_special_tokens=False)["input_ids"]
        ids = []
        for c in choices:
            full = tokenizer(cue_text + fmt.format(c=c), add_special_tokens=False)["input_ids"]
            if full[:len(cue_ids)] != cue_ids or len(full) != len(cue_ids) + 1:
                break
            ids.append(full[-1])
        if len(ids) == len(choices) and len(set(ids)) == len(ids):
            return cue_ids, ids
    raise ValueError(f"the tokenizer has no single-token {'/'.join(choices)} after the cue '{cue}': use the generative mode")


class LogitJudge(Judge):
    """Force the cue, read the score digits' probabilities, take their expectation."""

    def __init__(self, engine: Engine, tokenizer, template: PromptTemplate, cue: str = "Score:", max_score: int = 5):
        super().__init__(engine, tokenizer, template, max_score)
        self.cue_ids, self.digit_ids = digit_token_ids(tokenizer, cue, max_score)

    def _result(self, logprobs: torch.Tensor) -> JudgeResult:
        lp = logprobs[self.digit_ids].double()
        mass = float(lp.exp().sum())
        probs = torch.softmax(lp, 0)
        score = float((probs * torch.arange(len(self.digit_ids), dtype=torch.float64)).sum())
        if not math.isfinite(score):
            return JudgeResult(None, [None], mass=mass)
        return JudgeResult(score, [score], mass=mass)

    def score(self, items, on_batch=None, skip=None, seed=None):
        prompts = [self.prompt_ids(q, r) + self.cue_ids for q, r in items]
        callback = None
        if on_batch is not None:
            callback = lambda idx, rows: on_batch(idx, [self._result(r) for r in rows])  # noqa: E731
        logprobs = self.engine.next_token_logprobs(prompts, on_batch=callback, skip=skip)
        return [self._result(row) if row is not None else None for row in logprobs]


class ReasonedJudge(GenerativeJudge):
    """Sample k judgements, then force the cue after each and take the expected score over the digits."""

    def __init__(self, engine: Engine, tokenizer, template: PromptTemplate, samples: int = JUDGE_SAMPLES,
                 sampling: Sampling = JUDGE_SAMPLING, cue: str = "Score:",
                 max_score: int = 5):
        super().__init__(engine, tokenizer, template, samples, sampling, max_score)
        self.cue = cue
        self.cue_ids, self.digit_ids = digit_token_ids(tokenizer, cue, max_score)

    def _bodies(self, samples) -> list[str]:
        """Each judgement's text up to the first score line it wrote (the forced cue then gives the score)."""
        texts = [self.tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in samples]
        return [before_score(t).rstrip() for t in texts]

    def _cued(self, prompt: list[int], body: str) -> list[int]:
        written = self.tokenizer(body + "\n", add_special_tokens=False)["input_ids"] if body else []
        return prompt + written + self.cue_ids

    def _reasoned(self, prompts: list[list[int]], groups: list[list]) -> list[JudgeResult]:
        bodies = [self._bodies(g) for g in groups]
        rows = self.engine.next_token_logprobs([self._cued(p, b) for p, bs in zip(prompts, bodies) for b in bs])
        results, k = [], 0
        for bs in bodies:
            texts, scores = [], []
            for body in bs:
                lp = rows[k][self.digit_ids].double()
                k += 1
                probs = torch.softmax(lp, 0)
                expected = float((probs * torch.arange(len(self.digit_ids), dtype=torch.float64)).sum())
                verdict = f"{self.cue} {int(probs.argmax())}"
                texts.append(f"{body}\n{verdict}" if body else verdict)
                scores.append(expected if math.isfinite(expected) else None)
            valid = [s for s in scores if s is not None]
            results.append(JudgeResult(sum(valid) / len(valid) if valid else None, scores, texts))
        return results

    def score(self, items, on_batch=None, skip=None, seed=None):
        prompts = [self.prompt_ids(q, r) for q, r in items]
        results: list[Optional[JudgeResult]] = [None] * len(items)

        def scored(idx, groups):  # each batch's cue pass right after its samples, so on_batch can write them
            batch = self._reasoned([prompts[i] for i in idx], groups)
            for i, r in zip(idx, batch):
                results[i] = r
            if on_batch is not None:
                on_batch(idx, batch)

        self.engine.generate(prompts, self.samples, self.sampling, on_batch=scored, skip=skip, seed=seed)
        return results


JUDGE_MODES = ("generative", "logit", "reasoned")


def make_judge(mode: str, engine: Engine, tokenizer, template: PromptTemplate, samples: int = JUDGE_SAMPLES,
               sampling: Optional[Sampling] = None, max_score: int = 5) -> Judge:
    if mode == "generative":
        return GenerativeJudge(engine, tokenizer, template, samples, sampling or JUDGE_SAMPLING, max_score)
    if mode == "logit":
        return LogitJudge(engine, tokenizer, template, max_score=max_score)
    if mode == "reasoned":
        return ReasonedJudge(engine, tokenizer, template, samples, sampling or JUDGE_SAMPLING, max_score=max_score)
    raise ValueError(f"judge mode '{mode}': expected one of {', '.join(JUDGE_MODES)}")
