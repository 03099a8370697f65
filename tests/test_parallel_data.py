"""Data parallelism (ddcnn.train.parallel.data.DataParallel): the global stage under torchrun, and coherent and
transfer with ``parallel: data``. The step's equality with one process is tests/test_distributed.py's."""

from ddcnn.models import CNNDNN
from ddcnn.train.parallel.data import DataParallel
from ddcnn.train.parallel.savers import CNNDNNState
from ddcnn.train.parallel.sync import DataParallelSync
from parallel_cases import way


class Batches:
    def __init__(self):
        self.sharded = None

    def shard(self, rank, world):
        self.sharded = (rank, world)
        return self


def test_the_global_stage_is_data_parallel_under_torchrun_and_each_process_takes_its_part_of_every_batch():
    data, _ = way("global", world=3, rank=1)
    assert isinstance(data, DataParallel) and data.record() == {"parallelism": "data", "processes": 3}
    assert data.batch_options(None) == {"parts": 3}  # the last batch must split into parts of two images or more
    batches = Batches()
    assert data.split(batches) is batches and batches.sharded == (1, 3)
    assert isinstance(data.sync(), DataParallelSync)
    assert data.shard(4) is None and not data.shares_model


def test_a_data_parallel_cnn_dnn_is_whole_on_every_process_and_saved_whole():
    data, models = way("coherent", world=2, overrides=["stages.coherent.parallel=data"])
    assert isinstance(data, DataParallel)
    model = data.cnn_dnn(models.decomposition, models.ensemble(data.shard(4)), models.dnn("coherent"))
    assert isinstance(model, CNNDNN) and model.ensemble.n_local == 4
    saver = data.saver(model)
    assert isinstance(saver, CNNDNNState) and not saver.sharded
