"""glibc malloc settings that keep a CPU run's resident memory near what its tensors use.

PyTorch's CPU tensors come from glibc malloc. By default malloc raises its mmap threshold after each large free
(up to 32 MiB), so the next activations of a few MiB are carved from its heaps, whose holes it keeps: the default
loop reached 5.6 GB resident by M1's SFT. With a fixed threshold (``MMAP_THRESHOLD``) every larger tensor is its
own mapping, handed back when freed, at the cost of faulting fresh pages in; transparent huge pages
(``glibc.malloc.hugetlb=1``) fault mappings of 2 MiB and more in 2 MiB pages rather than 4 KiB ones. A 10-step SFT
of configs/m1_sft.yaml (gradient checkpointing, 1 thread, two runs side by side) measured:

    glibc defaults          3.86-3.97 GB peak   6:09-6:25 wall
    threshold 4 MiB + THP   3.54 GB             6:09
    threshold 2 MiB + THP   2.32 GB             6:48   <- MMAP_THRESHOLD
    threshold 1 MiB + THP   1.77 GB             7:45
    threshold 1 MiB         1.77 GB             9:42

benchmarks/run.py's ``loop`` section measures defaults against these settings on one whole loop.

glibc reads ``GLIBC_TUNABLES`` only at start-up, so ``main.py`` re-executes itself once with it set
(``reexec_tuned``). A ``GLIBC_TUNABLES`` already in the environment, even empty, is the user's and is left as
it is: ``GLIBC_TUNABLES= python main.py ...`` runs with glibc's defaults. ``trim`` hands the heaps' free pages
back between phases.
"""

from __future__ import annotations

import ctypes
import os
import sys
from functools import lru_cache
from typing import Mapping, Optional

MMAP_THRESHOLD = 2 << 20
"""Bytes from which malloc maps an allocation by itself (glibc: 128 KiB, raised up to 32 MiB as it goes)."""
TUNABLES = f"glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold={MMAP_THRESHOLD}"


@lru_cache(maxsize=1)
def _glibc() -> Optional[ctypes.CDLL]:
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
        return ctypes.CDLL("libc.so.6")
    except (ValueError, OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return None


def tuned_environ(environ: Mapping[str, str]) -> Optional[dict]:
    """``environ`` with ``GLIBC_TUNABLES`` set to ``TUNABLES``; None when there is nothing to do (not glibc, or
    ``GLIBC_TUNABLES`` already set: the user's, or this process's own after ``reexec_tuned``)."""
    if "GLIBC_TUNABLES" in environ or _glibc() is None:
        return None
    return {**environ, "GLIBC_TUNABLES": TUNABLES}


def reexec_tuned() -> None:
    """Replace this process by itself started with ``tuned_environ`` (same pid, arguments and interpreter flags);
    returns only when nothing needs doing. Call it first thing, before anything large is allocated."""
    env = tuned_environ(os.environ)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)


def trim() -> None:
    """Hand the heaps' free pages back to the system: a finished phase's holes are not the next phase's."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
