"""What the unit tests of the ways of using the processes (tests/test_parallel_*.py) share: a tiny run's config and
models, and a process's place among ``world`` processes (no process group: the ways are built and asked, never run
together)."""

from conftest import tiny_dict
from ddcnn.build import Models, Shapes
from ddcnn.config import from_dict
from ddcnn.train.dist import DistEnv
from ddcnn.train.parallel.choose import choose

SHAPES = Shapes(1, 3, (16, 16))


def tiny(overrides=()):
    """A 2x2 grid of 16x16 images (four local CNNs), VGG-style, width 4: its config and its models."""
    cfg = from_dict(tiny_dict(2), list(overrides))
    return cfg, Models(cfg, SHAPES)


def way(stage: str, world: int = 1, rank: int = 0, overrides=()):
    cfg, models = tiny(overrides)
    return choose(cfg, stage, DistEnv(rank, world), SHAPES.image_size, models.n_local), models
