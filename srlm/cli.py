"""Command line: one table of every command, each with the first sentence of its docstring in ``--help``.

    python main.py --help                          # every command, a line each
    python main.py fit --config configs/m1_sft.yaml
    python main.py loop [--config configs/loop.yaml]
    python main.py prepare-oasst --input FILE --output_dir DIR

The Trainer's methods (Lightning's ``fit``, ``validate``, ``test``, ``predict`` and srlm's ``loop``)
run through LightningCLI; the others are functions whose arguments jsonargparse turns into options.
Every command takes ``--help``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from srlm.models.base import deferred_loading
from srlm.quiet import quiet
from srlm.trainer import SRLMTrainer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TRAINER = "trainer"
"""Marks a command that is a method of SRLMTrainer, run by LightningCLI."""

# Every command, in the order --help lists them: name -> TRAINER or "module:function".
COMMANDS = {
    "fit": TRAINER,
    "validate": TRAINER,
    "test": TRAINER,
    "predict": TRAINER,
    "loop": TRAINER,
    "evaluate": "srlm.evaluation.reward:evaluate_reward",
    "ifeval": "srlm.evaluation.ifeval:ifeval",
    "head-to-head": "srlm.evaluation.head_to_head:compare",
    "report": "srlm.evaluation.report:write_report",
    "generate-prompts": "srlm.selfreward.commands:generate_prompts",
    "generate-candidates": "srlm.selfreward.commands:generate_candidates",
    "judge": "srlm.selfreward.commands:judge",
    "make-pairs": "srlm.selfreward.commands:make_pairs",
    "prepare-oasst": "srlm.data.oasst:convert_oasst",
    "split-ranked": "srlm.data.oasst:split_ranked",
    "build-eft": "srlm.selfreward.build_eft:build_eft",
    "build-eft-checked": "srlm.selfreward.checked_eft:build_checked_eft",
}


class SRLMCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict:
        return {**LightningCLI.subcommands(), "loop": {"model", "datamodule"}}

    def instantiate_classes(self) -> None:
        if self.subcommand != "loop":
            return super().instantiate_classes()
        with deferred_loading():  # the loop trains its M1 module only when M1 is not done yet
            return super().instantiate_classes()


def lightning_main(args=None) -> None:
    parser_kwargs = {}
    default_loop = CONFIG_DIR / "loop.yaml"
    if default_loop.exists():
        parser_kwargs["loop"] = {"default_config_files": [str(default_loop)]}
    SRLMCLI(
        model_class=None, datamodule_class=None, trainer_class=SRLMTrainer,
        subclass_mode_model=True, subclass_mode_data=True,
        save_config_kwargs={"overwrite": True}, parser_kwargs=parser_kwargs, args=args,
    )


def command(name: str):
    """The function or Trainer method that runs command ``name``."""
    target = COMMANDS[name]
    if target == TRAINER:
        return getattr(SRLMTrainer, name)
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def summary(doc: str | None) -> str:
    """The first sentence of a docstring, on one line."""
    first = " ".join((doc or "").strip().split("\n\n")[0].split())
    return first.split(". ")[0].rstrip(".") + "."


def command_table() -> str:
    """One line per command: its name and the first sentence of its docstring."""
    rows = [(name, summary(command(name).__doc__)) for name in COMMANDS]
    width = max(len(name) for name, _ in rows)
    return "Commands (each takes --help):\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in rows)


def main(args=None) -> None:
    quiet()
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: main.py COMMAND [--help] [options]\n\n{__doc__}\n{command_table()}")
        sys.exit(0 if argv else 2)
    if COMMANDS.get(argv[0], TRAINER) != TRAINER:
        from jsonargparse import auto_cli

        # Every argument by name (--input FILE ...), as in the README, whether it has a default or not.
        auto_cli(command(argv[0]), args=argv[1:], as_positional=False)
        return
    lightning_main(args)  # None from the command line: LightningCLI reads sys.argv itself
