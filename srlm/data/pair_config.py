"""How preference pairs are cut and batched: the settings ``PreferenceDataModule`` takes besides its files.

The loop's DPO rounds (``DPORoundConfig``) extend it, and build each round's DataModule with
``PairDataConfig.datamodule``, so a round's data settings are named once.
"""

# No ``from __future__ import annotations``: DPORoundConfig inherits these fields (see srlm/models/dpo.py).
from dataclasses import dataclass, fields

from srlm.data.datamodule import PreferenceDataModule


@dataclass
class PairDataConfig:
    """Preference-pair data settings; the defaults are ``PreferenceDataModule``'s (a test holds them equal)."""

    batch_size: int = 2
    """Pairs per training step (per device); each step runs 2 x batch_size sequences."""
    max_length: int = 512
    """Longest prompt + response in tokens; the prompt is cut from the left first."""
    max_prompt_length: int = 256
    """Prompt tokens kept at least when a pair is cut."""

    def datamodule(self, pair_files: list[str], **kwargs) -> PreferenceDataModule:
        """A ``PreferenceDataModule`` over ``pair_files`` with these settings."""
        return PreferenceDataModule(pair_files=list(pair_files), **kwargs,
                                    **{f.name: getattr(self, f.name) for f in fields(PairDataConfig)})
