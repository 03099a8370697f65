"""Spatial parallelism of the global CNN: P processes (gloo, spawned) compute what one process computes."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import tiny_dict
from ddcnn.errors import ConfigError
from ddcnn.train.parallel.spatial import slab_rows
from test_distributed import ENV, _finish, _run, _weights

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

CASES = [("vgg", 2), ("resnet", 2), ("vgg", 3), ("resnet", 3)]
STEPS = 3


def _size(dims):
    return (16, 8) if dims == 2 else (8, 4, 4)


def _data(dims):
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 1, *_size(dims), generator=g), torch.randint(0, 3, (4,), generator=g)


def _model(backbone, dims):
    from ddcnn import GlobalCNN

    torch.manual_seed(0)
    return GlobalCNN(1, 3, backbone, width=4, depth=(1, 1), dims=dims)


def _train(model, forward, x, y, after_step=lambda: None):
    """A few Adam steps with a clipped gradient (so that the gradient norm must agree too); the logits."""
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        after_step()
    model.eval()
    with torch.no_grad():
        return forward(x)


def _conv_cases():
    """(kernel, stride, padding) of the built-ins' convolutions: 3x3, 3x3 stride 2, 1x1 stride 2."""
    return [(3, 1, 1), (3, 2, 1), (1, 2, 0)]


def _worker(rank, world, store_path, out_dir):
    import torch.distributed as dist

    from ddcnn.train.dist import DistEnv
    from ddcnn.train.parallel.halo import CommMeter, halo, sum_gradients
    from ddcnn.train.parallel.spatial import SpatialCNN

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    env = DistEnv(rank, world)
    results = {}
    g = torch.Generator().manual_seed(2)
    x, grad_out = torch.randn(2, 3, 16, 5, generator=g), torch.randn(2, 4, 16, 5, generator=g)
    w = torch.randn(4, 3, 3, 3, generator=g)
    rows = slab_rows((16, 5), world, (1, 1, 1), "vgg")[rank]
    for k, s, p in _conv_cases():
        slab = x[:, :, rows.start:rows.stop].clone().requires_grad_()
        weight = w[:, :, :k, :k].clone().requires_grad_()
        out = F.conv2d(halo(slab, p, max(0, k - s - p), rank, world), sum_gradients(weight, world), None, s, (0, p))
        out.backward(grad_out[:, :, rows.start // s:rows.stop // s, :out.shape[3]])
        results[f"conv{k}{s}{p}"] = (out.detach(), slab.grad, weight.grad)
    for backbone, dims in CASES:
        model = _model(backbone, dims)
        meter = CommMeter()
        spatial = SpatialCNN(model, env, _size(dims), meter)
        per_step = []
        logits = _train(spatial, spatial, *_data(dims), after_step=lambda m=meter, s=per_step: s.append(m.total))
        results[f"{backbone}{dims}"] = (logits, model.state_dict(), torch.tensor(per_step))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _spawn(tmp_path_factory, world):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp(f"spatial{world}")
    mp.spawn(_worker, args=(world, str(out / "store"), str(out)), nprocs=world)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.heavy)])
def ranks(request, tmp_path_factory):
    return _spawn(tmp_path_factory, request.param)


def test_halo_exchange_convolutions_equal_the_convolution_of_the_whole_image(ranks):
    """Forward, input gradient and (summed) weight gradient of each slab's convolution, put together, are the
    plain convolution's on the whole image."""
    world = len(ranks)
    g = torch.Generator().manual_seed(2)
    x, grad_out = torch.randn(2, 3, 16, 5, generator=g), torch.randn(2, 4, 16, 5, generator=g)
    w = torch.randn(4, 3, 3, 3, generator=g)
    for k, s, p in _conv_cases():
        whole = x.clone().requires_grad_()
        weight = w[:, :, :k, :k].clone().requires_grad_()
        out = F.conv2d(whole, weight, None, s, p)
        out.backward(grad_out[:, :, :out.shape[2], :out.shape[3]])
        parts = [r[f"conv{k}{s}{p}"] for r in ranks]
        torch.testing.assert_close(torch.cat([part[0] for part in parts], dim=2), out.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.cat([part[1] for part in parts], dim=2), whole.grad, rtol=0, atol=1e-5)
        for part in parts:
            torch.testing.assert_close(part[2], weight.grad, rtol=0, atol=1e-4)
        assert world == len(parts)


@pytest.mark.parametrize("backbone,dims", CASES)
def test_p_processes_train_the_global_cnn_as_one_process(ranks, backbone, dims):
    """The same steps from the same initialisation: weights, BatchNorm statistics and logits agree to float32
    rounding, and every process holds the same model."""
    model = _model(backbone, dims)
    logits = _train(model, model, *_data(dims))
    for rank_logits, state, _ in (r[f"{backbone}{dims}"] for r in ranks):
        torch.testing.assert_close(rank_logits, logits, rtol=1e-4, atol=1e-4)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-4, msg=key)


def test_every_process_holds_identical_weights(ranks):
    for name in (f"{b}{d}" for b, d in CASES):
        first = ranks[0][name][1]
        for other in ranks[1:]:
            for key, value in first.items():
                assert torch.equal(other[name][1][key], value), (name, key)


def test_the_bytes_sent_per_step_are_the_formula_of_ddcnn_show(ranks):
    """What the exchange code counted in each training step, on the busiest process, is
    :func:`ddcnn.train.parallel.spatial.step_bytes` of the model (what `ddcnn show` prints) and the batch."""
    from ddcnn.train.parallel.spatial import step_bytes

    for backbone, dims in CASES:
        counted = torch.stack([r[f"{backbone}{dims}"][2] for r in ranks]).max(0).values
        steps = torch.diff(counted, prepend=torch.zeros(1, dtype=counted.dtype))
        expected = step_bytes(_model(backbone, dims), tuple(_data(dims)[0].shape), len(ranks))
        assert steps.tolist() == [expected] * STEPS, (backbone, dims)


def test_slabs_that_do_not_stay_aligned_are_refused_with_the_sizes_that_work():
    assert slab_rows((32, 32), 4, (2, 2, 2), "vgg") == [range(0, 8), range(8, 16), range(16, 24), range(24, 32)]
    with pytest.raises(ConfigError, match=r"H must be a multiple of 4 x 4 = 16; use data.image_size with H = 16 "
                                          r"or 32; or start 2, 3, 6 processes"):
        slab_rows((24, 32), 4, (2, 2, 2), "vgg")
    with pytest.raises(ConfigError, match="along D"):
        slab_rows((6, 8, 8), 4, (1, 1), "resnet")


def _cli_config(tmp_path, dims, backbone):
    data = tiny_dict(dims, generated_train=96, generated_test=32)
    data["model"]["backbone"] = backbone
    for stage in ("local", "combine", "coherent", "transfer"):
        data["stages"][stage]["enabled"] = False
    data["stages"]["global"].update({"epochs": 2, "batch_size": 16, "lr": 0.01})
    path = tmp_path / f"spatial{dims}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("dims,backbone", [(2, "vgg"), pytest.param(3, "resnet", marks=pytest.mark.heavy)])
def test_torchrun_spatial_trains_the_global_cnn_of_one_process(tmp_path, dims, backbone):
    """``torchrun --nproc-per-node 2 -m ddcnn run CONFIG --set stages.global.parallel=spatial``: the checkpoint of
    the global CNN is the one-process run's to float32 rounding, and it loads with one process (``evaluate``)."""
    cfg = _cli_config(tmp_path, dims, backbone)
    spatial = ["--set", "stages.global.parallel=spatial"]
    one, two = _run(["run", cfg], tmp_path / "one"), _run(["run", cfg, *spatial], tmp_path / "two", processes=2)
    _finish(one), _finish(two)
    a, b = _weights(tmp_path / "one", "global"), _weights(tmp_path / "two", "global")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4, msg=key)
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    _finish(subprocess.Popen([sys.executable, "-m", "ddcnn", "evaluate", str(tmp_path / "two")], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    again = json.loads((tmp_path / "two" / "evaluation.json").read_text())
    assert again["strategies"]["global"]["test_accuracy"] == results["strategies"]["global"]["test_accuracy"]


def test_spatial_refuses_a_foreign_backbone_and_other_stages(tiny_config, tmp_path):
    from ddcnn.train.protocol import Experiment

    cfg = tiny_config(overrides=["stages.global.parallel=spatial", "model.backbone=torch.nn.Identity",
                                 "model.backend=loop"])
    with pytest.raises(ConfigError, match="splits the layers of the built-in backbones"):
        Experiment(cfg, tmp_path / "r", verbose=False).setup()
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="stages.coherent.parallel = 'spatial' is not valid"):
        tiny_config(overrides=["stages.coherent.parallel=spatial"])


def test_an_image_that_does_not_split_is_refused_before_anything_is_written(tiny_config, tmp_path):
    from ddcnn.train.dist import DistEnv
    from ddcnn.train.protocol import Experiment

    others = [f"stages.{s}.enabled=false" for s in ("local", "combine", "coherent", "transfer")]
    cfg = tiny_config(overrides=["stages.global.parallel=spatial", "data.image_size=[12, 16]", *others])
    with pytest.raises(ConfigError, match=r"\[12, 16\] images along H \(12\) over 4 processes"):
        Experiment(cfg, tmp_path / "r", verbose=False, env=DistEnv(rank=0, world=4)).setup()
    assert not (tmp_path / "r").exists()
