"""ddcnn.models.deployed: the layouts compute what the ensemble computes, for every backend; the standardisation is
the normaliser's; the outputs are probabilities or vote shares with the strategy's argmax; the split exports."""

import pytest
import torch

from ddcnn import Decomposition, LocalEnsemble, MajorityVote, MeanProbability
from ddcnn.data.loading import Normalizer
from ddcnn.errors import ConfigError
from ddcnn.models.deployed import Branches, Deployed, Standardise, scores_to_probabilities, with_layout


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("backend", ["grouped", "vmap", "loop"])
def test_both_layouts_compute_what_the_ensemble_computes(one_thread, backend, dims):
    sub = (6, 6) if dims == 2 else (4, 4, 4)
    ensemble = LocalEnsemble(3, 2, 4, "vgg", 4, (1, 1), dims, backend, seed=1).eval()
    x = torch.randn(5, 3, 2, *sub)
    with torch.no_grad():
        expected = ensemble(x)
        grouped, separate = with_layout(ensemble, "grouped"), with_layout(ensemble, "separate")
        assert isinstance(separate, Branches) and len(separate.cnns) == 3
        assert isinstance(grouped, LocalEnsemble) and grouped.backend == "grouped" and not grouped.training
        torch.testing.assert_close(grouped(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(separate(x), expected, rtol=1e-5, atol=1e-6)
    assert with_layout(ensemble, None) is ensemble


def test_a_foreign_backbone_has_no_grouped_layout():
    def tiny(in_channels, num_classes, width):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * 16, num_classes))

    ensemble = LocalEnsemble(2, 1, 3, tiny, 4, backend="loop", seed=0)
    with pytest.raises(ConfigError, match="layout 'grouped' fuses the built-in backbones.*'separate'"):
        with_layout(ensemble, "grouped")
    with pytest.raises(ConfigError, match="layout must be one of grouped, separate"):
        with_layout(ensemble, "fused")


def test_standardise_is_the_normaliser():
    normalizer = Normalizer([0.2, 0.5], [0.3, 2.0])
    x = torch.rand(4, 2, 5, 6)
    assert torch.equal(Standardise(normalizer.mean, normalizer.std, 2)(x), normalizer(x))


def test_probabilities_and_vote_shares_keep_the_decision():
    logits = torch.randn(50, 4, 3)
    for combiner, shares in ((MeanProbability(4, 3), False), (MajorityVote(4, 3), True)):
        scores = combiner(logits)
        out = scores_to_probabilities(scores, shares)
        torch.testing.assert_close(out.sum(-1), torch.ones(50))
        assert torch.equal(out.argmax(-1), scores.argmax(-1))
    mean = scores_to_probabilities(MeanProbability(4, 3)(logits))
    torch.testing.assert_close(mean, logits.softmax(-1).mean(1))  # exactly the mean of the local probabilities
    votes = scores_to_probabilities(MajorityVote(4, 3)(logits), shares=True)
    counts = torch.nn.functional.one_hot(logits.argmax(-1), 3).sum(1).float()
    assert ((votes - counts / 4).abs() < 1e-6).all()  # the share of the 4 votes, up to the tie-break


def test_a_vote_share_reads_what_it_means_and_ties_keep_the_vote_decision():
    unanimous = torch.tensor([[[3.0, 0.0, 0.0]] * 4])  # 4 of 4 votes for class 0
    split = torch.tensor([[[0.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 1.0]]])  # 2 and 2
    for logits, text in ((unanimous, ["1.000", "0.000", "0.000"]), (split, ["0.000", "0.500", "0.500"])):
        shares = scores_to_probabilities(MajorityVote(4, 3)(logits), shares=True)
        assert [f"{v:.3f}" for v in shares[0].tolist()] == text
    # the tied classes 1 and 2: class 2 has the higher summed probability, and wins in the scores and the shares
    scores = MajorityVote(4, 3)(split)
    assert scores.argmax(-1).item() == 2 == scores_to_probabilities(scores, shares=True).argmax(-1).item()
    many = torch.randn(2000, 4, 5).round()  # rounded logits: many exact ties of votes and of summed probability
    scores = MajorityVote(4, 5)(many)
    assert torch.equal(scores_to_probabilities(scores, shares=True).argmax(-1), scores.argmax(-1))


def test_a_split_that_needs_a_gather_exports_with_a_dynamic_batch(one_thread):
    d = Decomposition((17, 16), (3, 2))  # starts 0, 6, 11 along the first axis: not evenly strided
    assert d.axis_starts[0] == (0, 6, 11)
    ensemble = LocalEnsemble(6, 1, 3, "vgg", 4, (1, 1), 2, seed=0).eval()
    model = Deployed.combined(Standardise([0.5], [0.25], 2), d, with_layout(ensemble, "separate"),
                              MeanProbability(6, 3)).eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.rand(2, 1, 17, 16),), dynamic_shapes={"images": {0: batch}})
    x = torch.rand(5, 1, 17, 16)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))
        expected = MeanProbability(6, 3)(ensemble(d.split((x - 0.5) / 0.25))).exp()
        torch.testing.assert_close(model(x), expected)
