"""One rule for every seed ddcnn derives: the run's seed plus the keys that name one random stream.

``derive_seed(seed, "local", 3)`` initialises local CNN 3, ``derive_seed(seed, "transfer", epoch)`` drives dropout
in one epoch of the transfer stage, ``derive_seed(seed, epoch, 0)`` orders the training images of an epoch. A hash,
not arithmetic on the keys: nearby keys give unrelated streams, and no two key tuples meet by accident.
"""

from __future__ import annotations

import hashlib


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed (non-negative, fits a torch generator) from the keys' text, e.g. ``(0, "global", 2)``."""
    text = "ddcnn:" + ":".join(str(int(k)) if not isinstance(k, str) else k for k in keys)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1
