"""How work is cut among processes: contiguous, nearly equal shards, the first ones one larger."""

from __future__ import annotations


def shard_range(n: int, rank: int, world: int) -> range:
    """Contiguous share of ``n`` items (local CNNs, or the images of a batch) for ``rank`` of ``world``: the first
    ``n % world`` ranks get one more, as ``torch.tensor_split`` cuts."""
    q, r = divmod(n, world)
    start = rank * q + min(rank, r)
    return range(start, start + q + (1 if rank < r else 0))
