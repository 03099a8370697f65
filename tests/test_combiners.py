import math

import pytest
import torch

from ddcnn import DNN, MajorityVote, MeanProbability, WeightedMean, build_combiner
from ddcnn.errors import ConfigError, ShapeError


def _logits_from_probs(probs):
    return torch.tensor(probs, dtype=torch.float32).log()


def test_mean_probability_is_the_log_of_the_average_distribution():
    probs = [[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]
    out = MeanProbability(2, 3)(_logits_from_probs(probs))
    torch.testing.assert_close(out.exp(), torch.tensor([[0.4, 0.15, 0.45]]))


def test_one_confident_subdomain_outweighs_many_unsure_ones_in_the_mean_but_not_in_the_vote():
    unsure = [0.4, 0.35, 0.25]
    probs = [[unsure, unsure, unsure, [0.0001, 0.9998, 0.0001]]]
    logits = _logits_from_probs(probs)
    # mean: class 0 -> (3 * 0.4 + 0.0001) / 4 = 0.300, class 1 -> (3 * 0.35 + 0.9998) / 4 = 0.512
    assert MeanProbability(4, 3)(logits).argmax(1).item() == 1
    # vote: three subdomains vote class 0, one votes class 1
    scores = MajorityVote(4, 3)(logits)
    assert scores.argmax(1).item() == 0
    assert math.floor(scores[0, 0].item()) == 3 and math.floor(scores[0, 1].item()) == 1


def test_unanimous_vote():
    probs = [[[0.6, 0.3, 0.1]] * 5]
    scores = MajorityVote(5, 3)(_logits_from_probs(probs))
    assert scores.argmax(1).item() == 0 and math.floor(scores[0, 0].item()) == 5


def test_tie_is_broken_by_summed_probability_among_tied_classes():
    # two votes each for classes 0 and 2; summed probability: class 0 = 0.5 + 0.5 + 0.0 + 0.1 = 1.1,
    # class 2 = 0.0 + 0.1 + 0.9 + 0.8 = 1.8, class 1 (no votes) = 0.5 + 0.4 + 0.1 + 0.1 = 1.1
    probs = [[[0.5, 0.5 - 1e-3, 1e-3], [0.5, 0.4, 0.1], [1e-3, 0.1 - 1e-3, 0.9], [0.1, 0.1, 0.8]]]
    assert MajorityVote(4, 3)(_logits_from_probs(probs)).argmax(1).item() == 2
    # and the other way round when class 0 is more probable in sum
    probs = [[[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.3, 0.3, 0.4], [0.3, 0.3, 0.4]]]
    assert MajorityVote(4, 3)(_logits_from_probs(probs)).argmax(1).item() == 0


def test_exact_tie_goes_to_the_lowest_class_deterministically():
    probs = [[[0.6, 0.4], [0.4, 0.6]]]
    assert MajorityVote(2, 2)(_logits_from_probs(probs)).argmax(1).item() == 0


def test_weighted_mean_starts_as_the_mean_and_learns_to_trust_the_right_subdomain():
    torch.manual_seed(0)
    combiner = WeightedMean(3, 2)
    y = torch.randint(0, 2, (64,))
    good = torch.nn.functional.one_hot(y, 2).float() * 4 - 2          # subdomain 0 knows the label
    noise = torch.randn(64, 2, 2)
    logits = torch.cat([good[:, None], noise], dim=1)
    torch.testing.assert_close(combiner(logits), MeanProbability(3, 2)(logits))
    opt = torch.optim.Adam(combiner.parameters(), lr=0.1)
    for _ in range(50):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(combiner(logits), y).backward()
        opt.step()
    weights = combiner.weight_logits.softmax(0)
    assert weights[0] > 0.8


def test_dnn_is_an_mlp_over_concatenated_probabilities():
    dnn = DNN(4, 3, hidden=[8], activation="tanh", dropout=0.1)
    linears = [m for m in dnn.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 8), (8, 3)]
    dnn.eval()
    logits = torch.randn(5, 4, 3)
    # the DNN sees probabilities: adding a constant to a subdomain's logits changes nothing
    torch.testing.assert_close(dnn(logits), dnn(logits + torch.randn(5, 4, 1)), rtol=1e-5, atol=1e-5)
    assert DNN(4, 3).trainable and not MajorityVote(4, 3).trainable


def test_build_combiner_and_errors():
    assert isinstance(build_combiner("dnn", 4, 10, hidden=[16]), DNN)
    with pytest.raises(ConfigError, match="majority_vote"):
        build_combiner("majority", 4, 10)
    with pytest.raises(ConfigError, match="no options"):
        build_combiner("mean_probability", 4, 10, hidden=[3])
    with pytest.raises(ConfigError, match="activation"):
        DNN(4, 10, activation="relu6")
    with pytest.raises(ShapeError, match=r"\(B, 4, 10\)"):
        MeanProbability(4, 10)(torch.zeros(2, 3, 10))
