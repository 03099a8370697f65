"""Shared fixtures: tiny configs on generated data, and one finished run reused by several tests."""

import pytest

from ddcnn.config import from_dict

TINY_STAGES = {
    "global": {"epochs": 2, "batch_size": 32},
    "local": {"epochs": 2, "batch_size": 32},
    "combine": {"epochs": 2, "batch_size": 32},
    "coherent": {"epochs": 1, "batch_size": 32},
    "transfer": {"epochs": 2, "batch_size": 32},
}


def tiny_dict(dims: int = 2, **data) -> dict:
    size = [16, 16] if dims == 2 else [8, 8, 8]
    grid = [2, 2] if dims == 2 else [2, 1, 2]
    return {
        "name": f"tiny{dims}d",
        "device": "cpu",
        "data": {"name": "generated", "image_size": size, "num_classes": 3, "generated_train": 160,
                 "generated_test": 64, "val_fraction": 0.2, **data},
        "decomposition": {"grid": grid},
        "model": {"width": 4, "depth": [1, 1]},
        "combiner": {"hidden": [16]},
        "stages": {k: dict(v) for k, v in TINY_STAGES.items()},
    }


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and the two cores are shared with other jobs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_config():
    return lambda dims=2, overrides=(), **data: from_dict(tiny_dict(dims, **data), list(overrides))


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A complete 2D run (all stages), made once for the tests that only read it."""
    from ddcnn.train.protocol import Experiment

    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = from_dict(tiny_dict(2))
    results = Experiment(cfg, out, verbose=False).run()
    return out, results
