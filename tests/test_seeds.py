"""derive_seed and shard_range: the two rules every stage and process shares."""

import itertools

import torch
from hypothesis import given
from hypothesis import strategies as st

from ddcnn.seeds import derive_seed
from ddcnn.shards import shard_range


@given(st.lists(st.one_of(st.integers(0, 2**64), st.text(max_size=8)), max_size=4))
def test_derived_seeds_are_deterministic_and_fit_a_torch_generator(keys):
    seed = derive_seed(*keys)
    assert seed == derive_seed(*keys)
    assert 0 <= seed < 2**63
    torch.Generator().manual_seed(seed)  # accepted


def test_the_streams_of_a_run_never_share_a_seed():
    """Init, dropout per epoch, image order and augmentation per epoch, local CNN init: all different."""
    keys = [(0, stage, epoch) for stage in ("global", "local", "combine", "coherent", "transfer", "batches")
            for epoch in range(6)]
    keys += [(0, epoch, stream) for epoch, stream in itertools.product(range(6), (0, 1))]
    keys += [(0, "local CNN", i) for i in range(16)]
    keys += [(seed, "global", 1) for seed in range(1, 50)]
    seeds = [derive_seed(*k) for k in keys]
    assert len(set(seeds)) == len(keys)


def test_keys_are_separated_so_that_neighbouring_tuples_differ():
    assert len({derive_seed(0, 1, 2), derive_seed(0, 12), derive_seed(0, 1, 2, 0), derive_seed(1, 2)}) == 4


def test_shards_are_contiguous_nearly_equal_and_match_tensor_split():
    for n in range(0, 12):
        for world in range(1, 6):
            shards = [shard_range(n, r, world) for r in range(world)]
            assert [i for s in shards for i in s] == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
            parts = torch.arange(n).tensor_split(world)
            assert [list(s) for s in shards] == [p.tolist() for p in parts]
