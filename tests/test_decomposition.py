import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddcnn import Decomposition
from ddcnn.errors import ConfigError, ShapeError


@st.composite
def layouts(draw):
    dims = draw(st.sampled_from([2, 3]))
    size = [draw(st.integers(4, 24 if dims == 2 else 12)) for _ in range(dims)]
    grid = [draw(st.integers(1, min(4, s))) for s in size]
    overlap = [draw(st.integers(0, 3)) for _ in range(dims)]
    return size, grid, overlap


def _make(size, grid, overlap):
    try:
        return Decomposition(size, grid, overlap)
    except ConfigError:
        return None  # overlap too large for this size: refusing it is tested separately


def _slices(d, loc):
    return tuple(slice(a, b) for a, b in zip(loc[: d.dims], loc[d.dims :]))


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_split_equals_plain_slicing_and_invariants_hold(layout):
    d = _make(*layout)
    if d is None:
        return
    x = torch.randn(2, 3, *d.image_size)
    sub = d.split(x)
    assert sub.shape == (2, d.n_subdomains, 3, *d.subimage_size)
    assert d.n_subdomains == math.prod(d.grid)
    assert d.locations.shape == (d.n_subdomains, 2 * d.dims)
    covered = torch.zeros(d.image_size, dtype=torch.bool)
    for i, loc in enumerate(d.locations.tolist()):
        window = _slices(d, loc)
        assert torch.equal(sub[:, i], x[(..., *window)])
        assert [b - a for a, b in zip(loc[: d.dims], loc[d.dims :])] == list(d.subimage_size)
        assert all(a >= 0 for a in loc[: d.dims]) and all(b <= s for b, s in zip(loc[d.dims :], d.image_size))
        covered[window] = True
    assert covered.all(), "the subimages must cover the image"
    # neighbours along every axis overlap by at least the requested overlap; first starts at 0, last ends at border
    for axis, starts in enumerate(d.axis_starts):
        size = d.subimage_size[axis]
        assert starts[0] == 0 and starts[-1] + size == d.image_size[axis]
        for a, b in zip(starts, starts[1:]):
            assert a + size - b >= d.overlap[axis]
            assert a < b, "neighbouring subimages must be distinct"


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=2, max_size=3), st.lists(st.integers(1, 6), min_size=3, max_size=3))
def test_dividing_sizes_without_overlap_tile_exactly(grid, factors):
    size = [g * f for g, f in zip(grid, factors)]
    d = Decomposition(size, grid)
    assert d.coverage().eq(1).all()
    assert d.subimage_size == tuple(f for f in factors[: len(grid)])


def test_rule_for_sizes_that_do_not_divide():
    # L = 28, n = 3, o = 0: s = ceil(28 / 3) = 10, starts round(i * 18 / 2) = 0, 9, 18
    d = Decomposition((28, 28), (3, 1))
    assert d.subimage_size == (10, 28)
    assert d.axis_starts[0] == (0, 9, 18)
    # L = 10, n = 4, o = 1: s = ceil(13 / 4) = 4, starts round(i * 6 / 3) = 0, 2, 4, 6
    d = Decomposition((10, 8), (4, 2), overlap=(1, 0))
    assert d.subimage_size == (4, 4)
    assert d.axis_starts == ((0, 2, 4, 6), (0, 4))


def test_locations_are_row_major_start_stop():
    d = Decomposition((4, 6), (2, 3))
    assert d.locations.tolist() == [
        [0, 0, 2, 2], [0, 2, 2, 4], [0, 4, 2, 6], [2, 0, 4, 2], [2, 2, 4, 4], [2, 4, 4, 6],
    ]


def test_uneven_starts_use_the_gather_path_and_still_match():
    d = Decomposition((11, 7), (3, 2), overlap=(0, 1))
    assert None in d._strides  # starts 0, 4, 7 along axis 0 are not evenly strided
    x = torch.arange(2 * 11 * 7, dtype=torch.float32).view(1, 2, 11, 7)
    sub = d.split(x)
    for i, loc in enumerate(d.locations.tolist()):
        assert torch.equal(sub[0, i], x[0, :, loc[0] : loc[2], loc[1] : loc[3]])


def test_merge_inverts_split_and_paint_averages_overlaps():
    d = Decomposition((9, 9), (2, 2), overlap=1)
    x = torch.randn(2, 1, 9, 9)
    assert torch.allclose(d.merge(d.split(x)), x)
    heat = d.paint([1.0, 2.0, 3.0, 4.0])
    assert heat[0, 0] == 1.0 and heat[-1, -1] == 4.0
    # d.subimage_size = 5 at starts 0, 4: pixel (4, 4) is covered by all four subdomains
    assert heat[4, 4] == pytest.approx(2.5)
    assert d.coverage()[4, 4] == 4


def test_split_on_3d_volumes():
    d = Decomposition((8, 6, 4), (2, 3, 1))
    x = torch.randn(1, 1, 8, 6, 4)
    sub = d.split(x)
    assert sub.shape == (1, 6, 1, 4, 2, 4)
    assert torch.equal(sub[0, 5], x[0, :, 4:8, 4:6, 0:4])


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(image_size=(28, 28), grid=(0, 2)), "grid"),
        (dict(image_size=(28, 28), grid=(2, 2, 2)), "dimensions"),
        (dict(image_size=(28, 28), grid=(2, 2), overlap=-1), "overlap"),
        (dict(image_size=(28, 28), grid=(2, 2), overlap=30), "overlap"),
        (dict(image_size=(4, 4), grid=(5, 1)), "at most 4"),
        (dict(image_size=(28,), grid=(2,)), "image_size"),
    ],
)
def test_bad_arguments_raise_config_errors(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Decomposition(**kwargs)


def test_wrong_image_shape_is_a_shape_error():
    d = Decomposition((28, 28), (2, 2))
    with pytest.raises(ShapeError, match="28, 28"):
        d.split(torch.zeros(1, 1, 32, 32))


@pytest.mark.parametrize("length, parts", [(28, 3), (10, 5), (16, 2), (7, 7), (9, 4)])
def test_max_overlap_is_the_largest_overlap_with_distinct_subimages(length, parts):
    from ddcnn.decomposition import max_overlap

    best = max_overlap(length, parts)
    d = Decomposition((length, 4), (parts, 1), (best, 0))
    starts = d.axis_starts[0]
    assert all(a < b for a, b in zip(starts, starts[1:]))
    with pytest.raises(ConfigError, match=f"at most {best}"):
        Decomposition((length, 4), (parts, 1), (best + 1, 0))


@settings(max_examples=40, deadline=None)
@given(layouts(), st.data())
def test_a_shard_of_subdomains_is_the_same_slice_of_the_full_split(layout, data):
    d = _make(*layout)
    if d is None:
        return
    start = data.draw(st.integers(0, d.n_subdomains - 1))
    stop = data.draw(st.integers(start + 1, d.n_subdomains))
    x = torch.randn(2, 3, *d.image_size)
    assert torch.equal(d.split(x, range(start, stop)), d.split(x)[:, start:stop])


@settings(max_examples=40, deadline=None)
@given(layouts(), st.data())
def test_images_cut_to_a_shards_region_give_the_same_subimages(layout, data):
    """A process that holds only the box of its subdomains' pixels cuts the same subimages as from whole images."""
    d = _make(*layout)
    if d is None:
        return
    start = data.draw(st.integers(0, d.n_subdomains - 1))
    shard = range(start, data.draw(st.integers(start + 1, d.n_subdomains)))
    low, high = d.region(shard)
    x = torch.randn(2, 3, *d.image_size)
    cut = x[(slice(None), slice(None), *[slice(a, b) for a, b in zip(low, high)])]
    assert torch.equal(d.split(cut, shard), d.split(x)[:, shard.start:shard.stop])
    for loc in d.locations[shard.start:shard.stop].tolist():  # the box holds every subimage of the shard
        assert all(a <= s and e <= b for a, b, s, e in zip(low, high, loc[: d.dims], loc[d.dims:]))
