"""The Trainer srlm's CLI builds: Lightning's own, with CSV (and TensorBoard) logging by default.

The self-rewarding loop (``python main.py loop``) is a method of this Trainer: LightningCLI turns
each parameter of ``loop`` into a command-line option. Each phase of the loop runs on a fresh
Trainer made from the same arguments (re-calling ``fit`` on a used Trainer is fragile).
"""

from __future__ import annotations

import copy
import importlib.util
import os
from typing import Any, Optional

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import Strategy

from srlm.data.datamodule import SFTDataModule
from srlm.models.sft import SFTModule
from srlm.selfreward.config import DPORoundConfig, EvalConfig, SelfRewardConfig
from srlm.selfreward.loop import run_loop
from srlm.selfreward.select import SelectionConfig


def default_loggers(root: str) -> list:
    csv = CSVLogger(save_dir=root, name="lightning_logs")
    loggers: list = [csv]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=root, name="lightning_logs", version=csv.version))
    return loggers


class SRLMTrainer(Trainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.init_kwargs = dict(kwargs)
        # A strategy object binds to the Trainer it is given to: keep an unused copy for fresh() ones.
        # (Read through self.init_kwargs: jsonargparse infers this signature from how `kwargs` is used.)
        if isinstance(self.init_kwargs.get("strategy"), Strategy):
            self.init_kwargs["strategy"] = copy.deepcopy(self.init_kwargs["strategy"])
        if kwargs.get("logger", True) is True:
            kwargs["logger"] = default_loggers(kwargs.get("default_root_dir") or os.getcwd())
        super().__init__(*args, **kwargs)

    def fresh(self, **overrides: Any) -> "SRLMTrainer":
        """A new Trainer with this one's arguments, some replaced (a loop phase)."""
        kwargs = {**self.init_kwargs, **overrides}
        if isinstance(kwargs.get("strategy"), Strategy):
            kwargs["strategy"] = copy.deepcopy(kwargs["strategy"])
        if "logger" not in overrides and not isinstance(self.init_kwargs.get("logger", True), bool):
            kwargs["logger"] = True  # loggers hold their folder; new phase, new loggers
        return type(self)(**kwargs)

    def loop(self, model: SFTModule, datamodule: Optional[SFTDataModule] = None, run_dir: str = "runs/loop",
             iterations: int = 2, m1_adapter: Optional[str] = None, self_reward: Optional[SelfRewardConfig] = None,
             dpo: Optional[DPORoundConfig] = None, evaluation: Optional[EvalConfig] = None,
             checkpoint_every: int = 10, force: bool = False, sft_baseline: bool = False,
             selection: Optional[SelectionConfig] = None) -> dict:
        """Run the self-rewarding loop: M1 by SFT, then T iterations of self-instruction creation and DPO.

        Args:
            model: the SFT module for M1 (its backbone is the base model of every round).
            datamodule: the IFT + EFT data for M1.
            run_dir: the run's folder; rerunning the same command on it resumes.
            iterations: number of self-rewarding iterations T (M1 -> M_{T+1}).
            m1_adapter: an existing M1 adapter folder; skips the SFT phase.
            self_reward: prompt generation, candidates, judging and pair settings.
            dpo: DPO round settings.
            evaluation: reward-modelling and head-to-head evaluation of each model, and the report.
            checkpoint_every: save a resumable checkpoint every this many training steps.
            force: continue a run folder whose saved config differs from this one.
            sft_baseline: also train the paper's comparison point, the base model fine-tuned on the IFT data
                alone (no EFT), and evaluate it like every M_t.
            selection: checkpoint selection inside the training phases (the paper picks checkpoints on a
                validation set): measure every N steps, export the best step, record the choice in the manifest.
        """
        return run_loop(self, model=model, datamodule=datamodule or SFTDataModule(), run_dir=run_dir,
                        iterations=iterations, m1_adapter=m1_adapter, self_reward=self_reward or SelfRewardConfig(),
                        dpo=dpo or DPORoundConfig(), evaluation=evaluation or EvalConfig(),
                        checkpoint_every=checkpoint_every, force=force, sft_baseline=sft_baseline, selection=selection)
