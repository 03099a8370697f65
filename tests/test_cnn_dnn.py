import pytest
import torch

from ddcnn import (
    CNNDNN,
    DNN,
    Decomposition,
    GlobalCNN,
    LocalEnsemble,
    MeanProbability,
    count_parameters,
    forward_flops,
    transfer_cnn_dnn,
)
from ddcnn.errors import ConfigError, ShapeError


def _model(dims=2, grid=(2, 2), size=(16, 16), overlap=0):
    d = Decomposition(size, grid, overlap)
    e = LocalEnsemble(d.n_subdomains, 1, 4, width=4, depth=(1, 1), dims=dims, seed=0)
    return CNNDNN(d, e, DNN(d.n_subdomains, 4, hidden=[8]))


@pytest.mark.parametrize("dims, grid, size", [(2, (2, 2), (16, 16)), (3, (2, 1, 2), (8, 8, 8))])
def test_cnn_dnn_composes_split_ensemble_and_combiner(dims, grid, size):
    model = _model(dims, grid, size).eval()
    x = torch.randn(3, 1, *size)
    out, local = model(x, return_local=True)
    assert out.shape == (3, 4) and local.shape == (3, model.decomposition.n_subdomains, 4)
    sub = model.decomposition.split(x)
    for i in range(local.shape[1]):
        torch.testing.assert_close(local[:, i], model.ensemble.local_model(i)(sub[:, i]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, model.combiner(local))


def test_transfer_copies_trained_modules_into_a_trainable_coherent_model():
    model = _model().eval()
    for p in model.ensemble.parameters():
        p.requires_grad_(False)  # as frozen for the combine stage
    coherent = transfer_cnn_dnn(model.decomposition, model.ensemble, model.combiner).eval()
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(coherent(x), model(x))
    assert all(p.requires_grad for p in coherent.parameters())
    with torch.no_grad():
        next(coherent.ensemble.parameters()).add_(1.0)
    assert not torch.allclose(coherent(x), model(x)), "the transferred model must not share weights"
    fresh = transfer_cnn_dnn(model.decomposition, model.ensemble)
    assert isinstance(fresh.combiner, DNN)


def test_grids_whose_subimages_are_too_small_are_refused_with_a_grid_that_fits():
    d = Decomposition((16, 16), (8, 8))
    e = LocalEnsemble(64, 1, 4, width=4, depth=(1, 1, 1))
    with pytest.raises(ConfigError, match=r"coarser grid such as \[4, 4\]"):
        CNNDNN(d, e, MeanProbability(64, 4))


def test_mismatched_parts_are_refused():
    d = Decomposition((16, 16), (2, 2))
    with pytest.raises(ConfigError, match="subdomains"):
        CNNDNN(d, LocalEnsemble(3, 1, 4, width=4), MeanProbability(3, 4))
    with pytest.raises(ConfigError, match="combiner"):
        CNNDNN(d, LocalEnsemble(4, 1, 4, width=4), MeanProbability(4, 5))
    with pytest.raises(ShapeError, match="channels"):
        _model()(torch.zeros(1, 3, 16, 16))


def test_flops_of_the_ensemble_are_the_sum_of_its_local_cnns_and_match_a_hand_count():
    model = _model()
    e = model.ensemble
    single = e.local_model(0)
    assert forward_flops(e, (4, 1, 8, 8)) == 4 * forward_flops(single, (1, 8, 8))
    # hand count for a one-conv-per-stage VGG of width 4 on 8x8: conv 1->4 (3x3) on 8x8, conv 4->8 on 4x4, fc 8->4
    expected = 2 * (8 * 8 * 4 * 1 * 9 + 4 * 4 * 8 * 4 * 9 + 8 * 4)
    assert forward_flops(single, (1, 8, 8)) == expected
    assert count_parameters(model) == count_parameters(e) + count_parameters(model.combiner)
    g = GlobalCNN(1, 4, width=8, depth=(1, 1))
    assert forward_flops(g, (1, 16, 16)) > forward_flops(e, (4, 1, 8, 8))
