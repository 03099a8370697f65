"""One process (ddcnn.train.parallel.base.Parallelism): every stage of a run without torchrun but the local one,
and the combine stage under torchrun."""

import pytest
import torch

from ddcnn.models import CNNDNN
from ddcnn.train.parallel.base import Parallelism
from ddcnn.train.parallel.savers import CNNDNNState
from parallel_cases import way


@pytest.mark.parametrize("stage", ["global", "combine", "coherent", "transfer"])
def test_one_process_trains_every_stage_but_the_local_one_whole(stage):
    single, _ = way(stage)
    assert type(single) is Parallelism
    assert single.record() == {"parallelism": "single", "processes": 1}
    assert single.shard(4) is None and single.batch_options(None) == {"parts": 1} and single.sync() is None


def test_the_combine_stage_is_one_process_under_torchrun():
    combine, _ = way("combine", world=2)
    assert type(combine) is Parallelism and combine.record() == {"parallelism": "single", "processes": 1}


def test_a_whole_cnn_dnn_saves_in_the_whole_model_layout_and_loads_back(one_thread):
    single, models = way("coherent")
    torch.manual_seed(0)
    model = single.cnn_dnn(models.decomposition, models.ensemble(), models.dnn("coherent"))
    assert isinstance(model, CNNDNN) and single.wrap(model, torch.device("cpu")) is model
    saver = single.saver(model)
    assert isinstance(saver, CNNDNNState)
    weights = saver.weights()
    assert any(k.startswith("ensemble.net.") for k in weights) and any(k.startswith("combiner.") for k in weights)
    torch.manual_seed(1)
    other = single.cnn_dnn(models.decomposition, models.ensemble(), models.dnn("coherent"))
    single.saver(other).load_weights(weights)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_global_cnn_saves_its_own_state_dict():
    single, models = way("global")
    assert single.saver(models.global_cnn()) is None and single.plain(models.global_cnn()) is not None
