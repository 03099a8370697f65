"""Model parallelism of a CNN-DNN (ddcnn.train.parallel.model.ModelParallel): coherent and transfer under torchrun
by default. Its gathers and gradients against one process are tests/test_distributed.py's."""

from ddcnn.train.parallel.model import ModelParallel, ShardedCNNDNN
from ddcnn.train.parallel.savers import CNNDNNState
from ddcnn.train.parallel.sync import ReplicatedSync
from parallel_cases import way


def test_each_process_holds_a_contiguous_shard_of_the_local_cnns_and_the_whole_dnn():
    model_parallel, models = way("transfer", world=2, rank=1)
    assert isinstance(model_parallel, ModelParallel)
    assert model_parallel.record() == {"parallelism": "model", "processes": 2} and model_parallel.shares_model
    shard = model_parallel.shard(models.n_local)
    assert shard == range(2, 4)
    model = model_parallel.cnn_dnn(models.decomposition, models.ensemble(shard), models.dnn("transfer"))
    assert isinstance(model, ShardedCNNDNN) and model.shard == shard and model.ensemble.n_local == 2
    assert model_parallel.batch_options(model) == {"shard": shard}  # the batches are cut to the shard's region
    assert model_parallel.clip(model) == model.clip_grad_norm_  # one norm over the whole CNN-DNN
    assert isinstance(model_parallel.sync(), ReplicatedSync)
    saver = model_parallel.saver(model)
    assert isinstance(saver, CNNDNNState) and saver.sharded and saver.shard == shard


def test_one_process_never_shards():
    single, _ = way("coherent", world=1)
    assert not isinstance(single, ModelParallel)
