"""The local stage's shards (ddcnn.train.parallel.local.LocalShards): one process is the shard of all N local CNNs,
P processes a contiguous shard each. Its runs against one process are tests/test_distributed.py's."""

import torch

from ddcnn.train.parallel.local import LocalShards
from ddcnn.train.parallel.model import ShardedLocalCNNs
from ddcnn.train.parallel.savers import EnsembleSaver
from ddcnn.train.parallel.sync import ShardSync
from parallel_cases import way


def test_one_process_holds_every_local_cnn_and_scores_them_on_subimages(one_thread):
    local, models = way("local")
    assert isinstance(local, LocalShards) and local.record() == {"parallelism": "single", "processes": 1}
    assert local.shard() == range(4) and local.batch_options(None) == {"shard": range(4)}
    ensemble = models.ensemble(local.shard()).eval()
    assert local.scored(models.decomposition, ensemble) is ensemble  # it takes subimages
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(local.on_images(models.decomposition, ensemble)(x), ensemble(models.decomposition.split(x)))
    sync = local.sync()
    assert isinstance(sync, ShardSync) and sync.distributed  # the NaN guard looks at the end of the epoch


def test_the_saver_writes_the_full_stacked_state_and_loads_it_back(one_thread):
    local, models = way("local")
    torch.manual_seed(0)
    ensemble = models.ensemble(local.shard())
    saver = local.saver(ensemble)
    assert isinstance(saver, EnsembleSaver)
    weights = saver.weights()
    torch.manual_seed(1)
    other = models.ensemble(local.shard())
    local.saver(other).load_weights(weights)
    for key, value in other.stacked_state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_p_processes_hold_contiguous_shards_gathered_for_scoring():
    local, models = way("local", world=3, rank=2)
    assert local.record() == {"parallelism": "shards", "processes": 3} and local.shares_model
    assert local.shard() == range(3, 4)  # four local CNNs over three processes: 2, 1, 1
    scored = local.scored(models.decomposition, models.ensemble(local.shard()))
    assert isinstance(scored, ShardedLocalCNNs) and scored.shard == range(3, 4)
