"""What a stage gets from the context: batches cut to a process's region, the parallelism of each stage."""

import pytest

from ddcnn.config import parallelism
from ddcnn.train.protocol import Experiment


@pytest.mark.parametrize("augment, whole", [([], False), (["data.augment.crop_padding=2"], True),
                                            (["data.augment.hflip=true"], True)])
def test_a_shards_batches_hold_only_its_region_unless_augmentation_moves_pixels(tmp_path, tiny_config, augment,
                                                                                  whole):
    ctx = Experiment(tiny_config(overrides=augment), tmp_path / "run", verbose=False).setup()
    shard = range(0, 2)  # the top row of the 2x2 grid of 16x16 images
    x, _ = next(iter(ctx.batches("local", shard=shard)))
    start, stop = ctx.decomposition.region(shard)
    assert (start, stop) == ((0, 0), (8, 16))
    assert tuple(x.shape[2:]) == ((16, 16) if whole else (8, 16))
    assert tuple(next(iter(ctx.batches("local")))[0].shape[2:]) == (16, 16)  # no shard: whole images
    sub = ctx.decomposition.split(x, shard)
    assert tuple(sub.shape[1:]) == (2, 1, 8, 8)


def test_each_stage_has_one_parallelism(tiny_config):
    cfg = tiny_config(overrides=["stages.coherent.parallel=data"])
    assert [parallelism(cfg, s) for s in ("global", "local", "combine", "coherent", "transfer")] == [
        "data", "model", "single", "data", "model"]
