"""Spatial parallelism as the global stage's way (ddcnn.train.parallel.spatial.SpatialParallel). Its layers against
one process are tests/test_spatial.py's."""

import pytest
import torch

from ddcnn.errors import ConfigError
from ddcnn.train.engine.loop import ModelState
from ddcnn.train.parallel.spatial import SpatialCNN, SpatialParallel
from ddcnn.train.parallel.sync import ReplicatedSync
from parallel_cases import tiny, way

SPATIAL = ["stages.global.parallel=spatial"]


def test_each_process_trains_the_whole_cnn_on_its_slab_of_every_image_and_saves_the_plain_cnn():
    spatial, models = way("global", world=2, rank=1, overrides=SPATIAL)
    assert isinstance(spatial, SpatialParallel)
    assert spatial.record() == {"parallelism": "spatial", "processes": 2} and spatial.shares_model
    assert not spatial.compiles  # the halo exchange runs eagerly
    cnn = models.global_cnn()
    wrapped = spatial.wrap(cnn, torch.device("cpu"))
    assert isinstance(wrapped, SpatialCNN) and wrapped.cnn is cnn
    assert spatial.batch_options(wrapped) == {"slab": range(8, 16)}  # rank 1 of 2: the lower half of 16 rows
    assert spatial.trained(cnn, wrapped) is wrapped and spatial.evaluated(cnn, wrapped) is wrapped
    saver = spatial.saver(cnn)
    assert isinstance(saver, ModelState) and saver.module is cnn  # the checkpoint is the plain CNN's
    assert spatial.plain(wrapped) is cnn
    assert isinstance(spatial.sync(), ReplicatedSync)


def test_spatial_needs_several_processes():
    one, _ = way("global", world=1, overrides=SPATIAL)
    assert not isinstance(one, SpatialParallel)


def test_its_admission_refuses_slabs_that_would_not_stay_aligned():
    cfg = tiny(SPATIAL)[0]
    with pytest.raises(ConfigError, match="stages.global.parallel = spatial splits"):
        way("global", world=3, overrides=SPATIAL)[0].admit(cfg)
    way("global", world=2, overrides=SPATIAL)[0].admit(cfg)  # 16 rows in two slabs of 8: aligned
