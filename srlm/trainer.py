"""The Trainer srlm's CLI builds: Lightning's own, with CSV (and TensorBoard) logging by default.

The self-rewarding loop (``python main.py loop``) is a method of this Trainer: LightningCLI turns
each parameter of ``loop`` into a command-line option. Each phase of the loop runs on a fresh
Trainer made from the same arguments (re-calling ``fit`` on a used Trainer is fragile).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger


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
        if kwargs.get("logger", True) is True:
            kwargs["logger"] = default_loggers(kwargs.get("default_root_dir") or os.getcwd())
        super().__init__(*args, **kwargs)

    def fresh(self, **overrides: Any) -> "SRLMTrainer":
        """A new Trainer with this one's arguments, some replaced (a loop phase)."""
        kwargs = {**self.init_kwargs, **overrides}
        if "logger" not in overrides and not isinstance(self.init_kwargs.get("logger", True), bool):
            kwargs["logger"] = True  # loggers hold their folder; new phase, new loggers
        return type(self)(**kwargs)
