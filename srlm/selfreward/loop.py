"""The self-rewarding loop, top to bottom: M1 by SFT, then for t = 1..T create AIFT(M_t) and train M_{t+1} by DPO.

Each phase runs on a fresh Trainer (re-calling ``fit`` on a used Trainer is fragile) and marks
itself done in the run's manifest; a rerun of the same command skips finished phases, resumes a
cut-short fit from its ``last.ckpt`` and a cut-short generation or judging step from its records.
Creating the next training set (AIFT(M_t): prompts, candidates, judgements, pairs) is a Callback at
the end of the fit that produced M_t (``SelfRewardCallback``); the loop asks for it again at the start
of each iteration (``InstructionCreator.ensure``, idempotent), which is the whole of resume: a fit
killed during the creation, or an M1 given by the user, goes through the same code.

Under a multi-process strategy (``--trainer.strategy=ddp``) every rank runs ``run_loop``: the
processes and the process group start here, before the first phase, and stay for every later
Trainer; rank 0 alone writes the run folder (see srlm/selfreward/distributed.py).
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import json
import logging
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback

from srlm.allocator import trim
from srlm.data.datamodule import SFTDataModule
from srlm.data.records import read_jsonl, write_json
from srlm.models.dpo import DPOModule
from srlm.models.sft import SFTModule
from srlm.seeds import derive_seed
from srlm.selfreward import distributed as dist
from srlm.selfreward.config import DPORoundConfig, EvalConfig, SelfRewardConfig
from srlm.selfreward.creator import InstructionCreator, SelfRewardCallback
from srlm.selfreward.meta_judge import JUDGE_PAIRS
from srlm.selfreward.rundir import RunDir
from srlm.selfreward.select import SelectionConfig, selection_callbacks

log = logging.getLogger(__name__)


class LoopTrainer(Protocol):
    """What the loop needs of the Trainer it is given (``SRLMTrainer`` is one): a fresh Trainer per phase made
    from its arguments, and what it runs under (its strategy, world size and the CLI's callbacks)."""

    init_kwargs: dict
    callbacks: list
    strategy: Any
    world_size: int

    def fresh(self, **overrides: Any) -> L.Trainer: ...


def run_loop(trainer: LoopTrainer, *, model: SFTModule, datamodule: SFTDataModule, run_dir: str, iterations: int,
             m1_adapter: Optional[str], self_reward: SelfRewardConfig, dpo: DPORoundConfig, evaluation: EvalConfig,
             checkpoint_every: int, force: bool, sft_baseline: bool = False,
             selection: Optional[SelectionConfig] = None) -> dict:
    """The self-rewarding loop (``SRLMTrainer.loop`` documents the arguments, in the same order): M1, then for each
    iteration create AIFT(M_t) -> train M_{t+1} -> evaluate it. Returns the run manifest."""
    dist.check_loop_strategy(trainer)
    dist.ensure_process_group(trainer)  # every rank runs this function from here on, rank 0 writes
    if self_reward.rejected_from == "sft" and not sft_baseline:
        raise ValueError("self_reward.rejected_from: sft takes its rejected answers from the IFT-only SFT baseline: "
                         "set sft_baseline: true")
    run = dist.SharedRunDir(run_dir)
    run.claim(config_text(trainer, {"run_dir": run_dir, "iterations": iterations, "m1_adapter": m1_adapter,
                                    "self_reward": dataclasses.asdict(self_reward), "dpo": dataclasses.asdict(dpo)}),
              trainer.world_size, force)
    run.manifest["base_model"] = model.backbone_config.model_name_or_path
    phases = Phases(trainer=trainer, run=run, model=model, datamodule=datamodule, iterations=iterations,
                    m1_adapter=m1_adapter, self_reward=self_reward, dpo=dpo, ev=evaluation,
                    checkpoint_every=checkpoint_every, selection=selection)

    phases.evaluate("base", model.backbone_config.model_name_or_path, base=True)  # the curve's starting point M0
    if sft_baseline:  # the paper's comparison point: the base model fine-tuned on the IFT data alone
        phases.sft_dir = phases.train_sft_baseline()
        phases.evaluate("sft", phases.sft_dir)
    model_dir = phases.train_m1()  # or the M1 given
    phases.evaluate("m1", model_dir)
    for t in range(1, iterations + 1):
        phases.creator(t).ensure(model_dir)  # AIFT(M_t): done at the end of M_t's fit unless that was cut short
        previous, model_dir = model_dir, phases.train_round(t, model_dir)
        if model_dir != previous:  # M_{t+1} = M_t when the round had nothing to train on
            phases.evaluate(f"iter_{t}", model_dir, [(f"M{t}", previous)] + phases.against_sft)
    run.manifest["final_model"] = str(model_dir)
    run.save()
    if evaluation.enabled and dist.is_rank0():
        from srlm.evaluation.report import write_report

        log.info("report: %s", write_report(str(run.root)))
    return run.manifest


@dataclasses.dataclass
class Phases:
    """The loop's phases over one run folder (``run_loop``'s arguments); each is skipped when the manifest marks
    it done. Every training phase ends with ``SelfRewardCallback``, which marks it done and creates the next
    iteration's data."""

    trainer: LoopTrainer
    run: RunDir
    model: SFTModule
    datamodule: SFTDataModule
    iterations: int
    m1_adapter: Optional[str]
    self_reward: SelfRewardConfig
    dpo: DPORoundConfig
    ev: EvalConfig
    checkpoint_every: int
    selection: Optional[SelectionConfig]
    sft_dir: Optional[Path] = None
    """The IFT-only SFT baseline, once trained (sft_baseline)."""

    @property
    def m1_dir(self) -> Path:
        return Path(self.m1_adapter) if self.m1_adapter else self.run.root / "m1" / "model"

    @property
    def against_sft(self) -> list[tuple[str, Path]]:
        return [("SFT", self.sft_dir)] if self.sft_dir is not None else []

    def creator(self, t: int) -> InstructionCreator:
        """Iteration t's self-instruction creation (AIFT(M_t))."""
        anchor = {"m1": self.m1_dir, "sft": self.sft_dir}.get(self.self_reward.rejected_from)
        return InstructionCreator(self.self_reward, self.run, t, self.model.backbone_config,
                                  device=self.trainer.strategy.root_device, show_progress=dist.is_rank0(),
                                  anchor_dir=anchor)

    def train(self, phase: str, root: Path, module, data, counts, selects: str, next_t: Optional[int] = None,
              **overrides) -> None:
        """Fit ``module`` on ``data`` in ``root`` (resuming from its last checkpoint) unless ``phase`` is done; at
        the end of the fit the phase is marked done and iteration ``next_t``'s data created with the new model."""
        if self.run.done(phase):
            return
        creator = self.creator(next_t) if next_t is not None and next_t <= self.iterations else None
        callbacks = selection_callbacks(self.selection, selects) + [SelfRewardCallback(self.run, phase, counts,
                                                                                       creator)]
        last = root / "checkpoints" / "last.ckpt"
        phase_trainer(self.trainer, root, self.checkpoint_every, callbacks, **overrides).fit(
            module, datamodule=data, ckpt_path=str(last) if last.exists() else None)
        gc.collect()  # the phase's trainer, optimiser state and activations: gone before the next phase
        trim()

    def train_m1(self) -> Path:
        """M1: SFT of the base model on IFT + EFT (unless given); iteration 1's creation runs at the end of its fit."""
        if not self.m1_adapter and not self.run.done("m1"):
            L.seed_everything(self.self_reward.seed, verbose=False)
            self.model.export_dir = str(self.m1_dir)
            self.train("m1", self.m1_dir.parent, self.model, self.datamodule, _examples, "m1", next_t=1)
        return self.m1_dir

    def train_sft_baseline(self) -> Path:
        """The paper's SFT baseline: the base model fine-tuned on the IFT data alone, as M1's SFT is otherwise run
        (same backbone, optimiser, steps and batch); exported to ``sft/model``."""
        root = self.run.root / "sft"
        if not self.run.done("sft"):
            L.seed_everything(self.self_reward.seed, verbose=False)
            module = SFTModule(self.model.backbone_config, self.model.optim_config, export_dir=str(root / "model"),
                               sparse_lm_head=self.model.sparse_lm_head)
            self.train("sft", root, module, same_data(self.datamodule, eft_files=[]), _examples, "sft")
        return root / "model"

    def train_round(self, t: int, model_dir: Path) -> Path:
        """M_{t+1} from M_t on AIFT(M_t): a DPO round (or, with ``positive_only``, SFT on the top-scored answers);
        iteration t+1's creation runs at the end of its fit. Returns M_{t+1}'s folder (M_t's without data)."""
        phase, it_dir = f"iter_{t}/train", self.run.iter_dir(t)
        if self.run.done(phase):
            return Path(self.run.info(phase)["counts"]["model"])
        pair_counts = self.run.info(f"iter_{t}/pairs").get("counts", {})
        n_pairs = pair_counts.get("pairs", 0)
        n_judge = (pair_counts.get("meta_judge") or {}).get("judge_pairs", 0)  # capped: 0 without actor pairs
        # Each phase seeds itself: a resumed run reaches it with another RNG state than a fresh one.
        L.seed_everything(derive_seed(self.self_reward.seed, "round", t), verbose=False)
        if self.self_reward.positive_only:
            modules = positive_round(self.model, self.datamodule, model_dir, it_dir)
            empty = {"pairs": 0, "positive_examples": 0}
        else:
            modules = dpo_round(self.model, self.dpo, model_dir, it_dir, n_judge) if n_pairs else None
            empty = {"pairs": 0}
        if modules is None:  # nothing to learn: M_{t+1} = M_t
            log.warning("%s: no training data (pairs or positive examples): M%d = M%d", phase, t + 1, t)
            self.run.mark_done(phase, {**empty, "model": str(model_dir)})
            return model_dir
        counts = {"pairs": n_pairs, "model": str(it_dir / "model"), **({"judge_pairs": n_judge} if n_judge else {})}
        self.train(phase, it_dir / "dpo", *modules, lambda tr: counts, "dpo", next_t=t + 1,
                   max_epochs=self.dpo.max_epochs, max_steps=self.dpo.max_steps)
        return it_dir / "model"

    def evaluate(self, name: str, model, opponents: Sequence[tuple[str, Path]] = (), base: bool = False) -> None:
        if self.ev.enabled and (self.ev.evaluate_base or not base):
            evaluate_phase(self.run, name, model, self.ev, self.ev.batch_size, opponents, **self.self_reward.serving)


def _examples(trainer: L.Trainer) -> dict:
    return {"train_examples": len(trainer.datamodule.train_dataset)}


def dpo_round(model: SFTModule, dpo: DPORoundConfig, model_dir: Path, it_dir: Path, n_judge: int):
    """A DPO round's module (M_t as policy start and reference) and data (the pairs, and the meta-judge's judge
    pairs, which train in the same round)."""
    module = DPOModule.from_config(dataclasses.replace(model.backbone_config, adapter_path=str(model_dir)), dpo,
                                   export_dir=str(it_dir / "model"), sparse_lm_head=model.sparse_lm_head)
    files = [str(it_dir / "pairs.jsonl")] + ([str(it_dir / JUDGE_PAIRS)] if n_judge else [])
    return module, dpo.datamodule(files)


def positive_round(model: SFTModule, datamodule: SFTDataModule, model_dir: Path, it_dir: Path):
    """The paper's 'positive examples only' variant: SFT of M_t on M1's IFT + EFT data plus its own top-scoring
    responses, with every setting of M1's module and data. None without positive examples."""
    positives = it_dir / "positives.jsonl"
    if not read_jsonl(positives):
        return None
    module = SFTModule(dataclasses.replace(model.backbone_config, adapter_path=str(model_dir)), model.optim_config,
                       export_dir=str(it_dir / "model"), sparse_lm_head=model.sparse_lm_head)
    return module, same_data(datamodule, extra_files=[*datamodule.extra_files, str(positives)])


def same_data(datamodule: SFTDataModule, **changes) -> SFTDataModule:
    """A new SFT DataModule with every setting of ``datamodule`` but ``changes``. (Its saved hyperparameters
    may carry LightningCLI's ``_class_path`` and the like: only the constructor's own arguments are kept.)"""
    accepted = inspect.signature(SFTDataModule.__init__).parameters
    settings = {k: v for k, v in dict(datamodule.hparams).items() if k in accepted and k != "self"}
    return SFTDataModule(**{**settings, **changes})


def config_text(trainer, fallback: dict) -> str:
    """The CLI's full configuration (for config.yaml and the rerun check), or the loop's own arguments."""
    for cb in trainer.callbacks:
        if isinstance(cb, SaveConfigCallback):
            text = cb.parser.dump(cb.config, skip_none=False)
            # Options that steer this invocation, not the run's content, stay out of the comparison.
            lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith(("force:", "config:"))]
            return "\n".join(lines) + "\n"
    return json.dumps(fallback, indent=2, default=str, sort_keys=True) + "\n"


def phase_trainer(trainer: LoopTrainer, root: Path, checkpoint_every: int, extra_callbacks: list, **overrides):
    """A fresh Trainer for one phase: its own folder, its own checkpoints, the user's other callbacks."""
    inherited = [cb for cb in trainer.init_kwargs.get("callbacks") or []
                 if not isinstance(cb, (ModelCheckpoint, SaveConfigCallback))]
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=0,
                                  every_n_train_steps=checkpoint_every)
    return trainer.fresh(default_root_dir=str(root), callbacks=inherited + [checkpoints] + extra_callbacks,
                         enable_checkpointing=True, **overrides)


@dist.on_rank0
def evaluate_phase(run: RunDir, name: str, model, ev: EvalConfig, batch_size: int,
                   opponents: Sequence[tuple[str, Path]] = (), **serving) -> None:
    """Measure one model of the run: reward metrics on held-out ranked replies (phase ``eval/<name>``),
    IFEval (``ifeval/<name>``), and head-to-head against each of ``opponents`` (``h2h/<name>``, then
    ``h2h/<name>/vs_<label>``). ``model`` is an exported model folder or, for the base model, its name.
    ``serving``: ``load_engine``'s backend options (the loop's ``SelfRewardConfig.serving``), for every engine here.
    Each part is skipped when its phase is done; the numbers also go to ``<name>/metrics.json``."""
    from srlm.evaluation.head_to_head import compare
    from srlm.inference.loading import loaded_engine

    wanted = [f"eval/{name}"] + ([f"ifeval/{name}"] if ev.ifeval_file else [])
    if not all(run.done(p) for p in wanted):
        with loaded_engine(str(model), batch_size=batch_size, **serving) as (engine, tok):
            if not run.done(f"eval/{name}"):
                from srlm.evaluation.reward import evaluate_reward_with, load_ranked

                metrics = evaluate_reward_with(engine, tok, load_ranked(ev.eval_file, ev.max_prompts),
                                               run.root / name / "eval", judge_mode=ev.judge_mode,
                                               samples=ev.judge_samples, model=str(model))
                run.mark_done(f"eval/{name}", metrics)
            if ev.ifeval_file and not run.done(f"ifeval/{name}"):
                from srlm.evaluation.ifeval import evaluate_ifeval_with, load_ifeval

                metrics = evaluate_ifeval_with(engine, tok, load_ifeval(ev.ifeval_file, ev.ifeval_max_prompts),
                                               run.root / name / "ifeval", max_new_tokens=ev.ifeval_max_new_tokens,
                                               model=str(model))
                run.mark_done(f"ifeval/{name}", metrics)
    for k, (label, other) in enumerate(opponents if ev.h2h_prompts > 0 else ()):
        phase = f"h2h/{name}" if k == 0 else f"h2h/{name}/vs_{label}"
        if run.done(phase):
            continue
        folder = run.root / name / ("h2h" if k == 0 else f"h2h_vs_{label}")
        summary = compare(str(model), model_b=str(other), prompts_file=ev.h2h_prompts_file, output_dir=str(folder),
                          judge_model=ev.h2h_judge_model or str(run.manifest.get("base_model")),
                          judge_mode=ev.h2h_judge_mode, max_prompts=ev.h2h_prompts,
                          max_new_tokens=ev.max_new_tokens, batch_size=batch_size, **serving)
        run.mark_done(phase, {**summary, "against": label})
    _write_model_metrics(run, name)


def _write_model_metrics(run: RunDir, name: str) -> None:
    """``<name>/metrics.json`` gets this model's evaluation (merged into what creation wrote there)."""
    path = run.root / name / "metrics.json"
    current = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    current["evaluation"] = {kind: run.info(f"{kind}/{name}").get("counts", {})
                             for kind in ("eval", "ifeval") if run.done(f"{kind}/{name}")}
    write_json(path, current)
