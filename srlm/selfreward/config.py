"""Settings of the self-rewarding loop: self-instruction creation and the DPO rounds."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from srlm.data.pair_config import PairDataConfig
from srlm.inference.engine import Sampling
from srlm.inference.judge import JUDGE_MODES, JUDGE_SAMPLES, JUDGE_SAMPLING
from srlm.inference.loading import BACKEND, BACKENDS, GPU_MEMORY_UTILIZATION, TENSOR_PARALLEL_SIZE
from srlm.models.dpo import DPOConfig
from srlm.prompts import JUDGE_TEMPLATE

PROMPT_SAMPLING = Sampling(temperature=0.6, top_p=0.9, max_new_tokens=96)
"""How new prompts are sampled (paper: T=0.6, p=0.9): the loop's and ``generate-prompts``' default."""
CANDIDATE_SAMPLING = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=192)
"""How candidate responses are sampled (paper: T=0.7, p=0.9): the loop's, ``generate-candidates``' and
``build-eft-checked``'s default."""


@dataclass
class SelfRewardConfig:
    """Self-instruction creation with M_t: new prompts, N candidates, self-judging, pairs."""

    num_prompts: int = 32
    """New prompts to create per iteration (the paper: thousands)."""
    max_requests: Optional[int] = None
    """Few-shot requests to try at most (default 4 x num_prompts)."""
    few_shot: int = 8
    """Seed prompts shown per request (paper: 8)."""
    seed_prompts_file: str = "seed:ift.jsonl"
    """Where the few-shot examples come from (the IFT seed's prompts)."""
    prompt_template: str = "self_instruct"
    """Few-shot prompt-generation template (bundled name or path; placeholder {examples})."""
    prompt_model: str = "base"
    """Which model writes new prompts: ``base`` (the fixed base model, as the paper used a fixed model), ``current`` (M_t)."""
    prompt_sampling: Sampling = field(default_factory=lambda: replace(PROMPT_SAMPLING))
    """Sampling for prompt generation (paper: T=0.6, p=0.9)."""
    num_candidates: int = 4
    """Responses per prompt (paper: N=4)."""
    candidate_sampling: Sampling = field(default_factory=lambda: replace(CANDIDATE_SAMPLING))
    """Sampling for candidates (paper: T=0.7, p=0.9)."""
    judge_mode: str = "generative"
    """``generative`` (sample, parse ``Score: N``, average), ``logit`` (expected score from the digit probabilities
    after a forced ``Score:``) or ``reasoned`` (sample a judgement, then read the digits after a forced ``Score:``)."""
    judge_samples: int = JUDGE_SAMPLES
    """Judge samples per candidate in generative mode, averaged (paper: 3)."""
    judge_sampling: Sampling = field(default_factory=lambda: replace(JUDGE_SAMPLING))
    """Sampling for generative judging."""
    judge_template: str = JUDGE_TEMPLATE
    """Judge prompt template (bundled name or path; placeholders {question} and {response})."""
    min_margin: float = 0.0
    """A pair needs best - worst > min_margin; equal scores are always dropped."""
    allow_unfinished_chosen: bool = False
    """Let a candidate cut at ``candidate_sampling.max_new_tokens`` be chosen (its pair then trains no
    end-of-turn token). Off: DPO would teach stopping mid-sentence. For quick checks whose short candidates
    rarely finish."""
    length_control: Optional[float] = None
    """Meta-Rewarding's length control: the chosen answer is the shortest of those scoring within this much of the
    best (None: the best-scored one). The chosen/rejected length ratio is recorded either way."""
    rejected_from: str = "current"
    """Anchored rejection (Temporal Self-Rewarding): the rejected answer is the lowest-scored sample of ``current``
    (M_t, the paper), ``m1`` or ``sft`` (the IFT-only baseline; needs sft_baseline) for the same prompt, judged by
    M_t. The anchor's samples are written to anchor_candidates.jsonl and anchor_judgements.jsonl."""
    positive_only: bool = False
    """The paper's 'positive examples only' variant: add top-scoring responses to SFT data instead of DPO."""
    positive_min_score: float = 4.5
    """Score a response needs to count as a positive example."""
    meta_judge: bool = False
    """Meta-Rewarding's meta-judge: M_t compares its own disagreeing judgements of a candidate (both orders), and
    the best against the worst judgement trains the judge in the same DPO round (srlm/selfreward/meta_judge.py).
    Needs judge_samples >= 2 written judgements: with judge_mode logit the judge writes them first and reads the
    score after each (judge_mode reasoned)."""
    meta_judge_share: float = 0.25
    """Largest share of a DPO round's pairs that are judge pairs (the rest are actor pairs); a round with actor
    pairs keeps at least one judge pair while the share is above 0."""
    meta_judge_template: str = "meta_judge"
    """Meta-judge template (bundled name or path; {rubric}, {question}, {response}, {judgement_a}, {judgement_b})."""
    batch_size: int = 8
    """Prompts per generate call (each with its N samples)."""
    seed: int = 0
    """Seed for few-shot sampling and generation."""
    backend: str = BACKEND
    """What generates and judges, in the loop's creation and its evaluation (reward metrics, IFEval, head-to-head):
    ``native`` (srlm's engine) or ``vllm`` (pip install 'srlm[vllm]'; M_t merged once per iteration, vLLM shut down
    before each training phase; its candidates' reference log-probs are recomputed)."""
    tensor_parallel_size: int = TENSOR_PARALLEL_SIZE
    """vLLM: GPUs one model is split over."""
    gpu_memory_utilization: Optional[float] = GPU_MEMORY_UTILIZATION
    """vLLM: share of the device's memory it reserves (on CPU, of system RAM); None: 0.9 on a GPU, 0.15 on CPU."""

    @property
    def serving(self) -> dict:
        """The serving options (``backend``, ``tensor_parallel_size``, ``gpu_memory_utilization``) as keywords of
        ``load_engine``: one choice for everything the loop generates and judges."""
        return {"backend": self.backend, "tensor_parallel_size": self.tensor_parallel_size,
                "gpu_memory_utilization": self.gpu_memory_utilization}

    @property
    def judging(self) -> str:
        """The judge mode the loop runs: the meta-judge needs written judgements, so logit becomes reasoned."""
        return "reasoned" if self.meta_judge and self.judge_mode == "logit" else self.judge_mode

    def __post_init__(self):
        if self.judge_mode not in JUDGE_MODES:
            raise ValueError(f"self_reward.judge_mode: expected one of {', '.join(JUDGE_MODES)}, got {self.judge_mode!r}")
        if self.meta_judge and self.judge_samples < 2:
            raise ValueError("self_reward.meta_judge compares a candidate's judgements with each other: it needs "
                             f"judge_samples >= 2 (got {self.judge_samples})")
        if self.backend not in BACKENDS:
            raise ValueError(f"self_reward.backend: expected one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.rejected_from not in ("current", "m1", "sft"):
            raise ValueError(f"self_reward.rejected_from: expected current, m1 or sft, got {self.rejected_from!r}")
        if not 0.0 <= self.meta_judge_share < 1.0:
            raise ValueError(f"self_reward.meta_judge_share must be in [0, 1), got {self.meta_judge_share}")


@dataclass
class DPORoundConfig(PairDataConfig, DPOConfig):
    """How each DPO round trains (M_t -> M_{t+1}).

    The DPO settings are ``DPOConfig``'s (what ``DPOModule`` takes), the pair data's ``PairDataConfig``'s (what
    ``PreferenceDataModule`` takes); the round adds its length. The loop builds both from this one config."""

    max_epochs: int = 1
    """Epochs over the pairs."""
    max_steps: int = -1
    """Stop after this many steps (-1: no limit)."""


@dataclass
class EvalConfig:
    """Measuring each model of the loop: reward modelling on held-out ranked replies, and head-to-head."""

    enabled: bool = True
    """Evaluate M1 and every M_{t+1}, and write report.md with plots."""
    evaluate_base: bool = True
    """Evaluate the base model M0 as well: the learning curve's starting point."""
    ifeval_file: Optional[str] = "seed:ifeval_dev.jsonl"
    """IFEval prompts (Google's input_data.jsonl format) scored by IFEval's own checkers; None turns IFEval off."""
    ifeval_max_prompts: Optional[int] = None
    """Score only the first this many IFEval prompts (None: all)."""
    ifeval_max_new_tokens: int = 256
    """Longest IFEval response (greedy)."""
    batch_size: int = 32
    """Prompts per forward when evaluating (greedy answers are one row each: wider batches keep the cores busy)."""
    eval_file: str = "seed:eft_eval.jsonl"
    """Held-out questions with human-ranked replies (ranked jsonl or an OpenAssistant export)."""
    max_prompts: Optional[int] = None
    """Evaluate on at most this many questions (None: all)."""
    judge_mode: str = "logit"
    """Judge used for the reward metrics: logit (one pass) or generative (k samples)."""
    judge_samples: int = JUDGE_SAMPLES
    """Judge samples per reply in generative mode."""
    h2h_prompts: int = 8
    """Held-out prompts for M_{t+1} vs M_t head-to-head (0 turns it off)."""
    h2h_prompts_file: str = "seed:eft_eval.jsonl"
    """Where the head-to-head prompts come from."""
    h2h_judge_model: Optional[str] = None
    """The head-to-head judge (a hub id, folder or embedded:...); None: the base model."""
    h2h_judge_mode: str = "logit"
    """Head-to-head judge mode: logit or generative."""
    max_new_tokens: int = 128
    """Longest response (greedy) in head-to-head."""
