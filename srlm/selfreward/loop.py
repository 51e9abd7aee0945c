"""The self-rewarding loop, top to bottom: M1 by SFT, then for t = 1..T create AIFT(M_t) and train M_{t+1} by DPO.

Each phase runs on a fresh Trainer (re-calling ``fit`` on a used Trainer is fragile) and marks
itself done in the run's manifest; a rerun of the same command skips finished phases, resumes a
cut-short fit from its ``last.ckpt`` and a cut-short generation or judging step from its records.
The generation and judging step is a Callback on the fit that produced M_t.

Under a multi-process strategy (``--trainer.strategy=ddp``) every rank runs ``run_loop``: the
processes and the process group start here, before the first phase, and stay for every later
Trainer; rank 0 alone writes the run folder (see srlm/selfreward/distributed.py).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback

from srlm.data.datamodule import PreferenceDataModule, SFTDataModule
from srlm.data.records import write_json
from srlm.models.dpo import DPOModule
from srlm.models.sft import SFTModule
from srlm.selfreward.config import DPORoundConfig, EvalConfig, SelfRewardConfig
from srlm.selfreward import distributed as dist
from srlm.selfreward.creator import InstructionCreator, SelfRewardCallback
from srlm.selfreward.meta_judge import JUDGE_PAIRS
from srlm.selfreward.rundir import RunDir
from srlm.selfreward.select import SELECTION_FILE, SelectionConfig, selection_callbacks

if TYPE_CHECKING:
    from srlm.trainer import SRLMTrainer

log = logging.getLogger(__name__)


def config_text(trainer, fallback: dict) -> str:
    """The CLI's full configuration (for config.yaml and the rerun check), or the loop's own arguments."""
    for cb in trainer.callbacks:
        if isinstance(cb, SaveConfigCallback):
            text = cb.parser.dump(cb.config, skip_none=False)
            # Options that steer this invocation, not the run's content, stay out of the comparison.
            lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith(("force:", "config:"))]
            return "\n".join(lines) + "\n"
    return json.dumps(fallback, indent=2, default=str, sort_keys=True) + "\n"


class PhaseTrained(L.Callback):
    """Marks a training phase done in the run manifest when its fit ends, its model exported.

    List it before ``SelfRewardCallback``: callbacks run in list order, and a run killed during the
    creation that follows must continue with this model, not fit another M_t whose candidates
    would then be judged beside the first one's.
    """

    def __init__(self, run: RunDir, phase: str, counts: Callable[[L.Trainer], dict]):
        self.run, self.phase, self.counts = run, phase, counts

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = {**self.counts(trainer), "steps": trainer.global_step}
        chosen = Path(trainer.default_root_dir) / SELECTION_FILE  # written by SelectBest when the phase selects
        if chosen.exists():
            summary = json.loads(chosen.read_text(encoding="utf-8"))
            counts["selection"] = {k: summary.get(k) for k in ("metric", "best_step", "best_value", "final_step",
                                                               "final_value")}
        self.run.mark_done(self.phase, counts)


def phase_trainer(trainer: "SRLMTrainer", root: Path, checkpoint_every: int, extra_callbacks: list, **overrides):
    """A fresh Trainer for one phase: its own folder, its own checkpoints, the user's other callbacks."""
    inherited = [cb for cb in trainer.init_kwargs.get("callbacks") or []
                 if not isinstance(cb, (ModelCheckpoint, SaveConfigCallback))]
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=0,
                                  every_n_train_steps=checkpoint_every)
    return trainer.fresh(default_root_dir=str(root), callbacks=inherited + [checkpoints] + extra_callbacks,
                         enable_checkpointing=True, **overrides)


def fit_phase(trainer, module, datamodule, root: Path) -> None:
    last = root / "checkpoints" / "last.ckpt"
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.exists() else None)


@dist.on_rank0
def evaluate_phase(run: RunDir, name: str, model, ev: EvalConfig, batch_size: int,
                   opponents: Sequence[tuple[str, Path]] = ()) -> None:
    """Measure one model of the run: reward metrics on held-out ranked replies (phase ``eval/<name>``),
    IFEval (``ifeval/<name>``), and head-to-head against each of ``opponents`` (``h2h/<name>``, then
    ``h2h/<name>/vs_<label>``). ``model`` is an exported model folder or, for the base model, its name.
    Each part is skipped when its phase is done; the numbers also go to ``<name>/metrics.json``."""
    from srlm.evaluation.head_to_head import compare
    from srlm.inference.loading import load_engine, release

    wanted = [f"eval/{name}"] + ([f"ifeval/{name}"] if ev.ifeval_file else [])
    if not all(run.done(p) for p in wanted):
        engine, tok = load_engine(str(model), batch_size=batch_size)
        try:
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
        finally:
            release(engine)
    for k, (label, other) in enumerate(opponents if ev.h2h_prompts > 0 else ()):
        phase = f"h2h/{name}" if k == 0 else f"h2h/{name}/vs_{label}"
        if run.done(phase):
            continue
        folder = run.root / name / ("h2h" if k == 0 else f"h2h_vs_{label}")
        summary = compare(str(model), model_b=str(other), prompts_file=ev.h2h_prompts_file, output_dir=str(folder),
                          judge_model=ev.h2h_judge_model or str(run.manifest.get("base_model")),
                          judge_mode=ev.h2h_judge_mode, max_prompts=ev.h2h_prompts,
                          max_new_tokens=ev.max_new_tokens, batch_size=batch_size)
        run.mark_done(phase, {**summary, "against": label})
    _write_model_metrics(run, name)


def _write_model_metrics(run: RunDir, name: str) -> None:
    """``<name>/metrics.json`` gets this model's evaluation (merged into what creation wrote there)."""
    path = run.root / name / "metrics.json"
    current = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    current["evaluation"] = {kind: run.info(f"{kind}/{name}").get("counts", {})
                             for kind in ("eval", "ifeval") if run.done(f"{kind}/{name}")}
    write_json(path, current)


def run_loop(trainer: "SRLMTrainer", model: SFTModule, datamodule: SFTDataModule, run_dir: str, iterations: int,
             m1_adapter: Optional[str], self_reward: SelfRewardConfig, dpo: DPORoundConfig, checkpoint_every: int,
             force: bool, evaluation: Optional[EvalConfig] = None, sft_baseline: bool = False,
             selection: Optional[SelectionConfig] = None) -> dict:
    dist.check_loop_strategy(trainer)
    dist.ensure_process_group(trainer)  # every rank runs this function from here on, rank 0 writes
    run = dist.SharedRunDir(run_dir)
    run.claim(config_text(trainer, {"run_dir": run_dir, "iterations": iterations, "m1_adapter": m1_adapter,
                                    "self_reward": dataclasses.asdict(self_reward), "dpo": dataclasses.asdict(dpo)}),
              trainer.world_size, force)
    backbone = model.backbone_config
    run.manifest["base_model"] = backbone.model_name_or_path
    ev = evaluation or EvalConfig()

    def creator_for(t: int) -> InstructionCreator:
        anchor = {"m1": m1_adapter or run.root / "m1" / "model", "sft": sft_dir}.get(self_reward.rejected_from)
        return InstructionCreator(self_reward, run, t, backbone, device=trainer.strategy.root_device,
                                  show_progress=dist.is_rank0(), anchor_dir=anchor)

    if self_reward.rejected_from == "sft" and not sft_baseline:
        raise ValueError("self_reward.rejected_from: sft takes its rejected answers from the IFT-only SFT baseline: "
                         "set sft_baseline: true")

    batch = ev.batch_size
    sft_dir = None
    # The curve's starting point, and the paper's comparison point: M0 and the IFT-only SFT baseline.
    if ev.enabled and ev.evaluate_base:
        evaluate_phase(run, "base", backbone.model_name_or_path, ev, batch)
    if sft_baseline:
        sft_dir = _sft_baseline(trainer, run, model, datamodule, checkpoint_every, self_reward.seed,
                                selection_callbacks(selection, "sft"))
        if ev.enabled:
            evaluate_phase(run, "sft", sft_dir, ev, batch)
    against_sft = [("SFT", sft_dir)] if sft_dir is not None else []

    # M1: SFT on IFT + EFT (or an M1 given by the user), with iteration 1's creation as its callback.
    if m1_adapter:
        model_dir = m1_adapter
        pending = None
    else:
        root = run.root / "m1"
        model_dir = root / "model"
        pending = creator_for(1) if iterations >= 1 else None
        if not run.done("m1"):
            L.seed_everything(self_reward.seed, verbose=False)
            model.export_dir = str(model_dir)
            callbacks = selection_callbacks(selection, "m1")
            callbacks += [PhaseTrained(run, "m1", lambda tr: {"train_examples": len(tr.datamodule.train_dataset)})]
            callbacks += [SelfRewardCallback(pending)] if pending else []
            fit_phase(phase_trainer(trainer, root, checkpoint_every, callbacks), model, datamodule, root)
    if ev.enabled:
        evaluate_phase(run, "m1", model_dir, ev, batch)
    for t in range(1, iterations + 1):
        creator = pending or creator_for(t)
        if not creator.complete():
            creator.run(model_dir)  # the fit that made M_t finished earlier (resume or given M1)
        it_dir = run.iter_dir(t)
        phase = f"iter_{t}/train"
        next_creator = creator_for(t + 1) if t < iterations else None
        pending = next_creator
        if run.done(phase):
            previous, model_dir = (f"M{t}", model_dir), Path(run.info(phase)["counts"]["model"])
            if ev.enabled and run.info(phase)["counts"].get("pairs"):
                evaluate_phase(run, f"iter_{t}", model_dir, ev, batch, [previous] + against_sft)
            continue
        pair_counts = run.info(f"iter_{t}/pairs").get("counts", {})
        n_pairs = pair_counts.get("pairs", 0)
        n_judge = (pair_counts.get("meta_judge") or {}).get("judge_pairs", 0)  # capped: 0 without actor pairs
        # Each phase seeds itself: a resumed run reaches it with another RNG state than a fresh one.
        L.seed_everything(self_reward.seed + t, verbose=False)
        if self_reward.positive_only:
            if (positive := _positive_round(run, phase, model, datamodule, model_dir, it_dir)) is None:
                continue  # no positive examples: M_{t+1} = M_t, marked done
            module, data = positive
        elif n_pairs == 0:
            log.warning("iteration %d produced no preference pairs: M%d = M%d", t, t + 1, t)
            run.mark_done(phase, {"pairs": 0, "model": str(model_dir)})
            continue
        else:
            module = DPOModule(dataclasses.replace(backbone, adapter_path=str(model_dir)), dpo.optimizer, dpo.beta,
                               dpo.loss_type, dpo.label_smoothing, dpo.precompute_reference,
                               export_dir=str(it_dir / "model"), sparse_lm_head=model.sparse_lm_head)
            # the meta-judge's judge pairs train in the same round as the actor pairs
            files = [str(it_dir / "pairs.jsonl")] + ([str(it_dir / JUDGE_PAIRS)] if n_judge else [])
            data = PreferenceDataModule(pair_files=files, batch_size=dpo.batch_size,
                                        max_length=dpo.max_length, max_prompt_length=dpo.max_prompt_length)
        root = it_dir / "dpo"
        previous = (f"M{t}", model_dir)
        model_dir = it_dir / "model"
        counts = {"pairs": n_pairs, "model": str(model_dir), **({"judge_pairs": n_judge} if n_judge else {})}
        callbacks = selection_callbacks(selection, "dpo")
        callbacks += [PhaseTrained(run, phase, lambda tr, counts=counts: counts)]
        callbacks += [SelfRewardCallback(next_creator)] if next_creator else []
        fit_phase(phase_trainer(trainer, root, checkpoint_every, callbacks, max_epochs=dpo.max_epochs,
                                max_steps=dpo.max_steps), module, data, root)
        if ev.enabled:
            evaluate_phase(run, f"iter_{t}", model_dir, ev, batch, [previous] + against_sft)
    run.manifest["final_model"] = str(model_dir)
    run.save()
    if ev.enabled and dist.is_rank0():
        from srlm.evaluation.report import write_report

        log.info("report: %s", write_report(str(run.root)))
    return run.manifest


def same_data(datamodule: SFTDataModule, **changes) -> SFTDataModule:
    """A new SFT DataModule with every setting of ``datamodule`` but ``changes``. (Its saved hyperparameters
    may carry LightningCLI's ``_class_path`` and the like: only the constructor's own arguments are kept.)"""
    accepted = inspect.signature(SFTDataModule.__init__).parameters
    settings = {k: v for k, v in dict(datamodule.hparams).items() if k in accepted and k != "self"}
    return SFTDataModule(**{**settings, **changes})


def _sft_baseline(trainer, run: RunDir, model: SFTModule, datamodule: SFTDataModule, checkpoint_every: int,
                  seed: int, extra_callbacks: list) -> Path:
    """The paper's SFT baseline: the base model fine-tuned on the IFT data alone, as M1's SFT is otherwise run
    (same backbone, optimiser, steps and batch); exported to ``sft/model``."""
    root = run.root / "sft"
    model_dir = root / "model"
    if not run.done("sft"):
        L.seed_everything(seed, verbose=False)
        module = SFTModule(model.backbone_config, model.optim_config, export_dir=str(model_dir),
                           sparse_lm_head=model.sparse_lm_head)
        data = same_data(datamodule, eft_files=[])
        callbacks = extra_callbacks + [PhaseTrained(run, "sft",
                                                    lambda tr: {"train_examples": len(tr.datamodule.train_dataset)})]
        fit_phase(phase_trainer(trainer, root, checkpoint_every, callbacks), module, data, root)
    return model_dir


def _positive_round(run: RunDir, phase: str, model: SFTModule, datamodule: SFTDataModule, model_dir, it_dir: Path):
    """The paper's 'positive examples only' variant: SFT of M_t on M1's IFT + EFT data plus its own top-scoring
    responses, with every setting of M1's data module. Without positive examples there is nothing new to learn:
    M_{t+1} = M_t, the phase is marked done (as a round without pairs) and None returned."""
    from srlm.data.records import read_jsonl

    positives = it_dir / "positives.jsonl"
    if not read_jsonl(positives):
        log.warning("%s: no positive examples: M_{t+1} = M_t", phase)
        run.mark_done(phase, {"pairs": 0, "positive_examples": 0, "model": str(model_dir)})
        return None
    module = SFTModule(dataclasses.replace(model.backbone_config, adapter_path=str(model_dir)), model.optim_config,
                       export_dir=str(it_dir / "model"), sparse_lm_head=model.sparse_lm_head)
    data = same_data(datamodule, extra_files=[*datamodule.extra_files, str(positives)])
    return module, data
