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


class _NewBlock(torch.nn.Module):
    """A block that backbones.py does not have (no twin of it anywhere): a residual pair of convolutions."""

    def __init__(self, channels: int):
        super().__init__()
        from ddcnn.models.backbones import ConvBNReLU

        self.body = torch.nn.Sequential(ConvBNReLU(channels, channels, 2, 1), ConvBNReLU(channels, channels, 2, 1))

    def forward(self, x):
        return torch.relu(x + self.body(x))


def _backbone_with_a_new_block():
    from collections import OrderedDict

    from ddcnn.models.backbones import Backbone, ConvBNReLU, Head

    torch.manual_seed(0)
    layers = OrderedDict(stem=ConvBNReLU(1, 4, 2, 1), stage1=torch.nn.Sequential(_NewBlock(4)),
                         stage2=torch.nn.Sequential(torch.nn.MaxPool2d(2), _NewBlock(4)), head=Head(4, 3, 2, 1))
    return _CNN(Backbone("vgg", 1, 3, 4, (1, 1), 2, 1, layers))


class _CNN(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def test_the_slab_layers_are_swapped_into_a_view_that_runs_the_blocks_own_forward():
    """One process's view of a CNN with a block backbones.py does not have computes the CNN's logits, and its
    gradients and BatchNorm statistics to float32 rounding (the view sums BatchNorm's statistics by its own
    formula); the CNN itself keeps its layers, and the wrapper trains its parameters in their order (the
    optimizer's)."""
    from ddcnn.train.dist import DistEnv
    from ddcnn.train.parallel.spatial import HaloConv, WholeImageBatchNorm, WholeImageMean

    plain, other = _backbone_with_a_new_block(), _backbone_with_a_new_block()
    wrapped = SpatialCNN(other, DistEnv(0, 1), (8, 8))
    assert list(wrapped.parameters()) == list(other.parameters())
    kinds = {type(m) for m in wrapped.on_slabs.modules()}
    assert {HaloConv, WholeImageBatchNorm, WholeImageMean, _NewBlock} <= kinds
    assert not {type(m) for m in other.modules()} & {HaloConv, WholeImageBatchNorm, WholeImageMean}
    x, y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])
    for model in (plain, wrapped):
        torch.nn.functional.cross_entropy(model.train()(x), y).backward()
    assert torch.equal(wrapped.eval()(x), plain.eval()(x))
    for (name, a), b in zip(plain.named_parameters(), other.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), b in zip(plain.named_buffers(), other.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_a_layer_that_looks_across_the_slabs_is_refused_when_the_view_is_built():
    from ddcnn.train.dist import DistEnv

    cnn = _backbone_with_a_new_block()
    cnn.net.stage2[0] = torch.nn.MaxPool2d(3, stride=2, padding=1)  # overlapping windows cross the slab border
    with pytest.raises(ConfigError, match="cannot split a MaxPool2d layer; use stages.global.parallel: data"):
        SpatialCNN(cnn, DistEnv(0, 2), (8, 8))
