"""The one scoring path of a run's models (ddcnn.train.scoring), on tiny models in one process."""

import torch

from ddcnn import DNN, Decomposition, LocalEnsemble
from ddcnn.strategies import STRATEGIES
from ddcnn.train.scoring import score_strategies


def test_every_strategy_is_scored_once_from_the_local_logits_and_without_a_graph():
    decomposition = Decomposition((8, 8), (2, 2))
    ensemble = LocalEnsemble(4, 1, 3, width=2, depth=[1, 1], seed=0).eval()
    trained = {"local": ensemble, "combine": DNN(4, 3).eval()}
    calls = []

    def predict(fn, images):  # as the run's batched inference: no gradient
        calls.append(fn)
        with torch.no_grad():
            return fn(images)

    images = torch.rand(5, 1, 8, 8)
    scores, local = score_strategies(trained, decomposition, 3, predict, images)
    assert set(scores) == {name for name, s in STRATEGIES.items() if set(s.stages) <= set(trained)
                           and "spatial" in s.kinds}
    width, _ = score_strategies(trained, decomposition, 3, predict, images, kind="width")
    assert set(width) == set(scores) | {"sub_networks"}  # the sub-networks' ensemble of a width decomposition
    calls.pop()
    assert len(calls) == 1 and local.shape == (5, 4, 3)  # the local CNNs run once for every combining strategy
    with torch.no_grad():
        expected = trained["combine"](ensemble(decomposition.split(images)))
    assert torch.allclose(scores["cnn_dnn"], expected)
    assert not any(s.requires_grad for s in scores.values())
