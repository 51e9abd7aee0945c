"""One way to derive a seed from another: every seeded stream of srlm (an iteration's sampling, a
fixed batch of requests, a decoding chunk, a loop phase) is ``derive_seed(seed, *parts)``.

The parts name the stream (``derive_seed(seed, "iteration", t)``), so two streams never share a seed
by arithmetic accident, as offsets such as ``seed + 1000 * t`` and ``seed + t`` can. The value is a
hash, the same on every machine and Python process (no ``hash()`` randomisation), and fits 32 bits:
``lightning.seed_everything`` accepts it, as do ``random.Random`` and ``torch.Generator``.
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: int | str) -> int:
    """A seed in [0, 2**32) determined by ``seed`` and ``parts`` (ints or short names)."""
    text = "\x1f".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
