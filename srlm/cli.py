"""Command line: LightningCLI (``fit``, ``validate``, ``loop`` ...) plus data and evaluation commands.

    python main.py fit --config configs/m1_sft.yaml
    python main.py fit --config configs/m2_dpo.yaml
    python main.py loop [--config configs/loop.yaml]
    python main.py prepare-oasst --input FILE --output_dir DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from srlm.trainer import SRLMTrainer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class SRLMCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict:
        commands = dict(LightningCLI.subcommands())
        if hasattr(SRLMTrainer, "loop"):
            commands["loop"] = {"model", "datamodule"}
        return commands


def lightning_main(args=None) -> None:
    parser_kwargs = {}
    default_loop = CONFIG_DIR / "loop.yaml"
    if default_loop.exists() and hasattr(SRLMTrainer, "loop"):
        parser_kwargs["loop"] = {"default_config_files": [str(default_loop)]}
    SRLMCLI(
        model_class=None, datamodule_class=None, trainer_class=SRLMTrainer,
        subclass_mode_model=True, subclass_mode_data=True,
        save_config_kwargs={"overwrite": True}, parser_kwargs=parser_kwargs, args=args,
    )


# Commands that are not Trainer methods: name -> "module:function" (run through jsonargparse).
EXTRA_COMMANDS = {
    "prepare-oasst": "srlm.data.oasst:convert_oasst",
    "generate-prompts": "srlm.selfreward.commands:generate_prompts",
    "generate-candidates": "srlm.selfreward.commands:generate_candidates",
    "judge": "srlm.selfreward.commands:judge",
    "make-pairs": "srlm.selfreward.commands:make_pairs",
    "evaluate": "srlm.evaluation.reward:evaluate_reward",
    "head-to-head": "srlm.evaluation.head_to_head:compare",
    "report": "srlm.evaluation.report:write_report",
    "build-eft": "srlm.selfreward.build_eft:build_eft",
    "build-eft-checked": "srlm.selfreward.checked_eft:build_checked_eft",
    "split-ranked": "srlm.data.oasst:split_ranked",
    "ifeval": "srlm.evaluation.ifeval:ifeval",
}


def main(argv=None) -> None:
    args = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        import importlib

        from jsonargparse import auto_cli

        module, func = EXTRA_COMMANDS[argv[0]].split(":")
        # Every argument by name (--input FILE ...), as in the README, whether it has a default or not.
        auto_cli(getattr(importlib.import_module(module), func), args=argv[1:], as_positional=False)
        return
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("Data and evaluation commands: " + ", ".join(EXTRA_COMMANDS) + " (each with --help)\n")
    lightning_main(args)
