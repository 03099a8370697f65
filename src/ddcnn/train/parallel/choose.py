"""The one choice of a stage's way of using the processes (:func:`choose`), from the config's
``stages.<stage>.parallel`` (:func:`ddcnn.config.parallelism`) and the processes torchrun started."""

from __future__ import annotations

from collections.abc import Sequence

from ddcnn.config import Config, parallelism
from ddcnn.train.dist import DistEnv
from ddcnn.train.parallel.base import Parallelism
from ddcnn.train.parallel.data import DataParallel
from ddcnn.train.parallel.local import LocalShards
from ddcnn.train.parallel.model import ModelParallel
from ddcnn.train.parallel.spatial import SpatialParallel

# Every way a config may name for a stage of several processes (ddcnn.config.PARALLEL lists which stage takes which).
WAYS: dict[str, type[Parallelism]] = {"single": Parallelism, "data": DataParallel, "model": ModelParallel,
                                      "spatial": SpatialParallel}


def choose(cfg: Config, stage: str, env: DistEnv, image_size: Sequence[int], n_local: int,
           way: str | None = None) -> Parallelism:
    """How ``stage`` uses ``env``'s processes: the local CNNs sharded in the local stage; one process without
    torchrun and for the combine stage (rank 0 trains the DNN); else the config's way (or ``way``, a name of
    :data:`WAYS`: how ``ddcnn show`` compares the ways)."""
    if stage == "local":
        return LocalShards(env, image_size, n_local)
    name = way or (parallelism(cfg, stage) if env.enabled else "single")
    return WAYS[name](env, image_size, n_local)
