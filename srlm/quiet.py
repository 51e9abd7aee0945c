"""A quiet console: the few third-party messages that repeat on every phase of a loop, filtered by their text.

Only these messages are dropped; every other warning, progress bar and summary line stays.
"""

from __future__ import annotations

import logging
import warnings

# (logger name, text in the message): advice that repeats per phase and asks nothing of srlm's user
_LOG_NOISE = (
    ("lightning.pytorch.utilities.rank_zero", "litlogger"),  # Lightning's advertisement for its cloud logger
    ("bitsandbytes.backends.cpu.ops", "kernels-community"),  # optional CPU 4-bit kernels package, absent
)
# (message regex, category): deprecations inside the libraries, not in srlm's calls
_WARNING_NOISE = (
    (r".*is_gradient_checkpointing.*", FutureWarning),  # transformers, raised from Lightning's model summary
    (r".*gradient_checkpointing_enable.*deprecated.*", FutureWarning),  # transformers' rename, on every phase
    (r".*isinstance\(treespec, LeafSpec\).*", Warning),  # torch's pytree API, used by Lightning
)


class _DropText(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet() -> None:
    """Install the filters (idempotent)."""
    for name, text in _LOG_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropText) and f.text == text for f in logger.filters):
            logger.addFilter(_DropText(text))
    for message, category in _WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
