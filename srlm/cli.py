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

from srlm.quiet import quiet
from srlm.trainer import SRLMTrainer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class SRLMCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict:
        return {**LightningCLI.subcommands(), "loop": {"model", "datamodule"}}


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


def _command(name: str):
    import importlib

    module, func = EXTRA_COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), func)


def command_table() -> str:
    """One line per command: Lightning's, ``loop``, then the data and evaluation commands (their docstrings' first lines)."""
    rows = [("fit", "train a model (SFT or DPO) from a config"), ("validate", "validation loss of a model"),
            ("test", "test loss of a model"), ("predict", "predictions of a model"),
            ("loop", (SRLMTrainer.loop.__doc__ or "").strip().splitlines()[0])]
    rows += [(name, (_command(name).__doc__ or "").strip().splitlines()[0]) for name in EXTRA_COMMANDS]
    width = max(len(name) for name, _ in rows)
    return "Commands (each takes --help):\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in rows)


def main(argv=None) -> None:
    quiet()
    args = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        from jsonargparse import auto_cli

        # Every argument by name (--input FILE ...), as in the README, whether it has a default or not.
        auto_cli(_command(argv[0]), args=argv[1:], as_positional=False)
        return
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print(command_table() + "\n")
    lightning_main(args)
