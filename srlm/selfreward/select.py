"""Checkpoint selection inside a training phase: keep the weights that scored best on a validation set.

The paper picks its checkpoints on a validation set rather than taking whatever the last step
left. ``SelectBest`` is a Lightning Callback that does this in place, during the fit:

- every ``every_n_steps`` optimizer steps (and once more at the end of training) it measures the
  model being trained with ``measure`` (greedy answers to held-out constraint prompts checked by
  IFEval's checkers, or the logit judge's pairwise accuracy on held-out human-ranked replies);
- when a value is the best so far it keeps a CPU copy of the trainable (adapter) weights;
- in ``on_train_end``, which Lightning runs for callbacks *before* the module's own
  ``on_train_end`` (``fit_loop.on_run_end``), it loads the best copy back into the module, so the
  adapter the module then exports (``AdapterModule.on_train_end``) is the selected one, and writes
  ``<default_root_dir>/selection.json`` (and hands the same dict to ``record``).

Step 0 (the model the phase starts from) is measured too, for the record, but is never selected:
the exported model must be a trained one, since the next DPO round merges it as M_t and its
lineage says it was trained in this phase. A phase that only made things worse exports its least
bad trained step. Ties keep the earlier step.

The validation data are never the data the reported numbers come from: "ifeval" answers our own
held-out constraint prompts (``seed:ift_constraints_heldout.jsonl``, IFEval's format and checkers,
none of IFEval's prompts), "judge" scores held-out ranked replies (``seed:eft_eval.jsonl``).

How the loop uses it: for a phase named in ``SelectionConfig.phases`` (``m1``, ``sft``, ``dpo``)
with ``metric != "none"``, add ``SelectBest(config, record)`` to that phase's Trainer callbacks
(``selection_callbacks`` does this check). Nothing else changes: the module exports as before.
Under DDP every rank measures (same data, same weights: same numbers) and loads the same copy; no
collectives are used. Sharded strategies (FSDP, DeepSpeed) are not supported. The history and the
best copy are callback state, saved in every checkpoint (plain tensors, ints, floats and lists:
``torch.load(weights_only=True)`` reads them), so a fit killed and resumed from ``last.ckpt``
selects over the whole phase.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch

from srlm.data.chat import encode_prompt
from srlm.data.records import write_json
from srlm.inference.engine import Engine, Sampling

log = logging.getLogger(__name__)

METRICS = ("none", "ifeval", "judge")
PHASES = ("m1", "sft", "dpo")
SELECTION_FILE = "selection.json"


@dataclass
class SelectionConfig:
    """Which checkpoint of a training phase is exported: the last one, or the best on a validation set."""

    metric: str = "none"
    """``none`` (export the last step), ``ifeval`` (greedy answers to held-out constraint prompts, checked by
    IFEval's checkers: mean of prompt-level and instruction-level strict accuracy) or ``judge`` (the logit
    judge's pairwise accuracy against human rankings of held-out replies)."""
    every_n_steps: int = 8
    """Measure every this many optimizer steps (and once more at the end of training)."""
    ifeval_file: str = "seed:ift_constraints_heldout.jsonl"
    """Prompts with verifiable instructions in IFEval's format (``key`` or ``id``, ``prompt``,
    ``instruction_id_list``, ``kwargs``). Our own held-out constraint prompts, never IFEval's, so that the
    reported IFEval numbers are not tuned on."""
    ranked_file: str = "seed:eft_eval.jsonl"
    """Held-out human-ranked replies (``{"id", "prompt", "replies": [{"text", "rank"}]}``) for the judge metric."""
    max_prompts: Optional[int] = None
    """Use only the first this many prompts of the file (None: all)."""
    max_new_tokens: int = 128
    """Longest greedy answer in tokens (ifeval)."""
    batch_size: int = 16
    """Prompts per forward of the sampling engine."""
    phases: list[str] = field(default_factory=lambda: ["m1", "dpo"])
    """Training phases that select: ``m1`` (SFT to M1), ``sft`` (the SFT baseline), ``dpo`` (every DPO round)."""

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"selection metric '{self.metric}': expected one of {', '.join(METRICS)}")
        if int(self.every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {self.every_n_steps}")
        unknown = [p for p in self.phases if p not in PHASES]
        if unknown:
            raise ValueError(f"selection phases {unknown}: expected some of {', '.join(PHASES)}")

    def selects(self, phase: str) -> bool:
        """Whether a training phase (``m1``, ``sft``, ``dpo``) selects its checkpoint."""
        return self.metric != "none" and phase in self.phases


# -- measuring -------------------------------------------------------------------------------------
def load_constraint_prompts(path: str, max_prompts: Optional[int] = None) -> list[dict]:
    """IFEval-format prompts, validated by ``load_ifeval`` (which takes ``id`` for a missing ``key``)."""
    from srlm.metrics.ifeval import load_ifeval

    return load_ifeval(path, max_prompts)


def make_engine(model, tokenizer, batch_size: int = 16) -> Engine:
    """An Engine on the model being trained (a peft model or a plain HF causal LM), unmerged."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Engine(model, [tokenizer.eos_token_id], pad, batch_size=batch_size)


def _nan_if_none(value) -> float:
    return math.nan if value is None else float(value)


def _ifeval_value(engine: Engine, tokenizer, config: SelectionConfig) -> float:
    from srlm.metrics.ifeval import check_response, ifeval_metrics

    items = load_constraint_prompts(config.ifeval_file, config.max_prompts)
    prompts = [encode_prompt(tokenizer, item["prompt"]) for item in items]
    samples = engine.generate(prompts, 1, Sampling(0.0, 1.0, config.max_new_tokens))
    rows = []
    for item, group in zip(items, samples):
        response = tokenizer.decode(group[0].token_ids, skip_special_tokens=True)
        verdict = check_response(item, response)
        rows.append({"instruction_id_list": item["instruction_id_list"],
                     "follow_instruction_list": verdict["follow_instruction_list"],
                     "follow_instruction_list_loose": verdict["follow_instruction_list_loose"]})
    metrics = ifeval_metrics(rows)
    # Prompt-level accuracy alone moves in steps of 1/n_prompts (2.5% on 40 prompts) and flips on a
    # single instruction of a multi-instruction prompt; the instruction-level accuracy counts ~2x more
    # events. Their mean (the Open LLM Leaderboard's IFEval number) is the less noisy criterion.
    values = [v for v in (metrics["prompt_level_strict"], metrics["inst_level_strict"]) if v is not None]
    return sum(values) / len(values) if values else math.nan


def _judge_value(engine: Engine, tokenizer, config: SelectionConfig) -> float:
    from srlm.data.oasst import read_ranked
    from srlm.metrics.reward_scores import reward_metrics_from_scores
    from srlm.inference.judge import make_judge
    from srlm.prompts import JUDGE_TEMPLATE, load_template

    ranked = read_ranked(config.ranked_file, config.max_prompts)
    judge = make_judge("logit", engine, tokenizer, load_template(JUDGE_TEMPLATE, "question", "response"))
    results = judge.score([(p.prompt, reply.text) for p in ranked for reply in p.replies])
    rows, k = [], 0
    for p in ranked:
        for reply in p.replies:
            rows.append({"prompt_id": p.id, "human_rank": reply.rank, "model_score": results[k].score})
            k += 1
    return _nan_if_none(reward_metrics_from_scores(rows)["pairwise_accuracy"])


def measure(model, tokenizer, config: SelectionConfig) -> float:
    """The selection metric of ``model`` (the HF or peft model being trained), computed in place, in [0, 1].

    Runs in eval mode (no dropout) under ``torch.inference_mode``; the train/eval flag of every
    submodule is restored afterwards, so LoRA dropout stays active in training. Consumes no global
    random state (greedy decoding, a logit judge), so training continues exactly as without it.
    NaN when nothing could be measured (every instruction skipped, no ranked pair).
    """
    if config.metric not in ("ifeval", "judge"):
        raise ValueError(f"nothing to measure for selection metric '{config.metric}'")
    modes = {name: m.training for name, m in model.named_modules()}
    model.eval()
    try:
        with torch.inference_mode():
            engine = make_engine(model, tokenizer, config.batch_size)
            if config.metric == "ifeval":
                return _ifeval_value(engine, tokenizer, config)
            return _judge_value(engine, tokenizer, config)
    finally:
        for name, m in model.named_modules():
            if name in modes:
                m.training = modes[name]


# -- the callback ----------------------------------------------------------------------------------
def _json_value(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


class SelectBest(L.Callback):
    """Measure the module every ``every_n_steps`` steps; at the end of training, load the best trained weights.

    Args:
        config: the metric, its data and how often to measure (``metric`` must not be ``none``).
        record: called once at the end of training (on every rank) with the selection summary
            ``{"metric", "best_step", "best_value", "final_step", "final_value", "history": [[step, value], ...]}``,
            the dict also written (by rank 0) to ``<trainer.default_root_dir>/selection.json``.

    The module must have ``model`` (the HF/peft model) and ``tokenizer`` attributes (``AdapterModule``).
    Step 0 is measured for the record but never selected (see the module docstring). With no trained
    step measured (a fit of 0 steps) nothing is loaded. NaN values (nothing measurable) are never selected.
    """

    def __init__(self, config: SelectionConfig, record: Optional[Callable[[dict], None]] = None):
        if config.metric == "none":
            raise ValueError("SelectBest needs a selection metric (ifeval or judge), not 'none'")
        self.config, self.record = config, record
        self.history: list[list] = []  # [[step, value], ...] in the order measured
        self.best_step: Optional[int] = None
        self.best_value: Optional[float] = None
        self.best_weights: Optional[dict[str, torch.Tensor]] = None
        self.summary: Optional[dict] = None

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"metric": self.config.metric, "history": [[int(s), float(v)] for s, v in self.history],
                "best_step": self.best_step, "best_value": self.best_value, "best_weights": self.best_weights}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("metric") != self.config.metric:
            log.warning("checkpoint selection state is for metric '%s', not '%s': starting afresh",
                        state_dict.get("metric"), self.config.metric)
            return
        self.history = [[int(s), float(v)] for s, v in state_dict.get("history", [])]
        self.best_step, self.best_value = state_dict.get("best_step"), state_dict.get("best_value")
        weights = state_dict.get("best_weights")
        self.best_weights = None if weights is None else {k: v.detach().cpu().clone() for k, v in weights.items()}

    # -- measuring -------------------------------------------------------------------------------
    def _measured(self, step: int) -> bool:
        return any(s == step for s, _ in self.history)

    def _value(self, step: int) -> Optional[float]:
        for s, v in self.history:
            if s == step:
                return v
        return None

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> float:
        with trainer.precision_plugin.val_step_context():  # the precision the module trains and validates in
            value = float(measure(pl_module.model, pl_module.tokenizer, self.config))
        self.history.append([int(step), value])
        selectable = step > 0 and math.isfinite(value)
        if selectable and (self.best_value is None or value > self.best_value):  # ties keep the earlier step
            self.best_step, self.best_value = int(step), value
            self.best_weights = {name: p.detach().cpu().clone() for name, p in pl_module.named_parameters()
                                 if p.requires_grad}
        log.info("selection: step %d %s = %.4f (best: step %s, %s)", step, self.config.metric, value,
                 self.best_step, self.best_value)
        if trainer.is_global_zero and math.isfinite(value):
            for logger in trainer.loggers:
                logger.log_metrics({f"select/{self.config.metric}": value}, step=step)
        return value

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0 and not self._measured(0):
            self._measure(trainer, pl_module, 0)  # the starting model: recorded, never selected

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end at the same global step: measured once.
        if step > 0 and step % self.config.every_n_steps == 0 and not self._measured(step):
            self._measure(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Callbacks' on_train_end runs before the module's, which exports: the export is the selected model.
        final = trainer.global_step
        if final > 0 and not self._measured(final):
            self._measure(trainer, pl_module, final)
        if self.best_weights is not None and self.best_step != final:
            params = dict(pl_module.named_parameters())
            missing = [name for name in self.best_weights if name not in params]
            if missing:
                raise RuntimeError(f"selected weights name parameters the module lacks: {missing[:3]}")
            with torch.no_grad():
                for name, saved in self.best_weights.items():
                    params[name].copy_(saved.to(device=params[name].device, dtype=params[name].dtype))
            log.info("selection: loaded the weights of step %d (%s = %.4f; final step %d: %s)", self.best_step,
                     self.config.metric, self.best_value, final, self._value(final))
        final_value = self._value(final)
        self.summary = {
            "metric": self.config.metric,
            "best_step": self.best_step,
            "best_value": self.best_value,
            "final_step": int(final),
            "final_value": None if final_value is None else _json_value(final_value),
            "history": [[s, _json_value(v)] for s, v in self.history],
        }
        if trainer.is_global_zero:
            write_json(Path(trainer.default_root_dir) / SELECTION_FILE, self.summary)
        if self.record is not None:
            self.record(dict(self.summary))


def selection_callbacks(config: Optional[SelectionConfig], phase: str,
                        record: Optional[Callable[[dict], None]] = None) -> list[L.Callback]:
    """``[SelectBest(config, record)]`` when ``phase`` selects its checkpoint under ``config``, else ``[]``."""
    if config is None or not config.selects(phase):
        return []
    return [SelectBest(config, record)]
