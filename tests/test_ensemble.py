import copy

import pytest
import torch
from torch import nn

from ddcnn import LocalEnsemble, local_loss
from ddcnn.errors import ConfigError, ShapeError
from ddcnn.train.runtime import Runtime

CASES = [
    dict(backbone="vgg", dims=2, sub=(8, 8)),
    dict(backbone="resnet", dims=2, sub=(8, 6)),
    dict(backbone="vgg", dims=3, sub=(4, 4, 4)),
    dict(backbone="resnet", dims=3, sub=(4, 4, 4)),
]
N, C, K = 3, 2, 5


def _pair(case, seed=0, backend="grouped", **kw):
    args = dict(n_local=N, in_channels=C, num_classes=K, backbone=case["backbone"], width=4, depth=(1, 1, 1),
                dims=case["dims"], seed=seed, **kw)
    return LocalEnsemble(backend=backend, **args), LocalEnsemble(backend="loop", **args)


def _batch(case, b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, N, C, *case["sub"], generator=g), torch.randint(0, K, (b,), generator=g)


@pytest.mark.parametrize("backend", ["grouped", "vmap"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['backbone']}{c['dims']}d")
def test_batched_and_loop_backends_agree_in_train_and_eval(case, backend):
    grouped, loop = _pair(case, backend=backend)
    x, _ = _batch(case)
    for mode in (True, False):
        grouped.train(mode), loop.train(mode)
        out = grouped(x)
        assert out.shape == (6, N, K)
        torch.testing.assert_close(out, loop(x), rtol=1e-5, atol=1e-5)
    # train-mode forwards updated the BatchNorm statistics of both the same way
    for i in range(N):
        a, b = grouped.local_model(i).state_dict(), loop.local_model(i).state_dict()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["grouped", "vmap"])
@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: f"{c['backbone']}{c['dims']}d")
def test_local_model_is_a_standalone_cnn_equal_to_its_slot(case, backend):
    grouped, _ = _pair(case, backend=backend)
    grouped.eval()
    x, _ = _batch(case)
    local = grouped(x)
    for i in range(N):
        single = grouped.local_model(i)
        assert not any(type(m).__name__ == "GroupedLinear" for m in single.modules())
        torch.testing.assert_close(single(x[:, i]), local[:, i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["grouped", "vmap", "loop"])
def test_set_local_model_is_the_inverse_of_local_model(backend):
    case = CASES[0]
    a, _ = _pair(case, seed=0, backend=backend)
    b, _ = _pair(case, seed=7, backend=backend)
    b.set_local_model(1, a.local_model(1))
    x, _ = _batch(case)
    a.eval(), b.eval()
    torch.testing.assert_close(b(x)[:, 1], a(x)[:, 1])
    assert not torch.allclose(b(x)[:, 0], a(x)[:, 0])
    with pytest.raises(ShapeError):
        b.set_local_model(0, LocalEnsemble(1, C, K, width=8, depth=(1, 1, 1), backend="loop").local_model(0))
    with pytest.raises(ConfigError):
        b.local_model(N)


def test_initialisation_depends_only_on_seed_and_global_index():
    full = LocalEnsemble(4, 1, 3, width=4, seed=11)
    shard = LocalEnsemble(2, 1, 3, width=4, seed=11, indices=[2, 3], backend="loop")
    for j, i in enumerate([2, 3]):
        for key, value in full.local_model(i).state_dict().items():
            assert torch.equal(value, shard.local_model(j).state_dict()[key])
    other = LocalEnsemble(4, 1, 3, width=4, seed=12)
    assert not torch.equal(other.net.stage1[0][0].weight, full.net.stage1[0][0].weight)
    # the caller's random stream is not consumed by a seeded construction
    torch.manual_seed(0)
    LocalEnsemble(4, 1, 3, width=4, seed=11)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))


def _separate_training(models, batches, make_opt, steps_fn):
    opts = [make_opt(m.parameters()) for m in models]
    for x, y in batches:
        for i, (m, opt) in enumerate(zip(models, opts)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x[:, i]), y).backward()
            steps_fn(m)
            opt.step()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("backend", ["grouped", "loop", "vmap"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=lambda c: f"{c['backbone']}{c['dims']}d")
def test_training_the_ensemble_equals_training_each_local_cnn_alone(case, backend, optimizer):
    _check_ensemble_training_equals_separate_training(case, backend, optimizer)


@pytest.mark.parametrize("backend", ["grouped", "vmap"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=lambda c: f"{c['backbone']}{c['dims']}d")
def test_channels_last_ensemble_trains_like_separate_default_layout_cnns(case, backend):
    # the layout training runs use (Runtime.prepare) against separate CNNs in the default layout
    runtime = Runtime(torch.device("cpu"), channels_last=True, channels_last_3d=True)
    _check_ensemble_training_equals_separate_training(case, backend, "adam",
                                                      prepare=lambda m: runtime.prepare(m, case["dims"]))


def _check_ensemble_training_equals_separate_training(case, backend, optimizer, prepare=lambda m: m):
    make_opt = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4),
    }[optimizer]
    ensemble = LocalEnsemble(N, C, K, backbone=case["backbone"], width=4, depth=(1, 1, 1), dims=case["dims"],
                             backend=backend, seed=3)
    separate = [copy.deepcopy(ensemble.local_model(i)) for i in range(N)]
    ensemble = prepare(ensemble)
    batches = [_batch(case, seed=s) for s in range(4)]
    opt = make_opt(ensemble.parameters())
    for x, y in batches:
        opt.zero_grad()
        loss, per_slot = local_loss(ensemble(x), y)
        loss.backward()
        opt.step()
    _separate_training(separate, batches, make_opt, lambda m: None)
    ensemble.eval()
    x, _ = _batch(case, seed=99)
    out = ensemble(x)
    for i, m in enumerate(separate):
        m.eval()
        torch.testing.assert_close(out[:, i], m(x[:, i]), rtol=1e-4, atol=1e-4)
        got = ensemble.local_model(i).state_dict()
        for key, value in m.state_dict().items():  # BatchNorm running statistics included
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("backend", ["grouped", "loop", "vmap"])
def test_gradient_clipping_is_per_local_cnn(backend):
    case = CASES[0]
    ensemble = LocalEnsemble(N, C, K, width=4, depth=(1, 1, 1), backend=backend, seed=5)
    separate = [copy.deepcopy(ensemble.local_model(i)) for i in range(N)]
    batches = [_batch(case, seed=s) for s in range(3)]
    opt = torch.optim.SGD(ensemble.parameters(), lr=0.1)
    for x, y in batches:
        opt.zero_grad()
        local_loss(ensemble(x), y)[0].backward()
        norms = ensemble.clip_grad_norm_(0.05)
        assert norms.shape == (N,)
        opt.step()
    _separate_training(separate, batches, lambda p: torch.optim.SGD(p, lr=0.1),
                       lambda m: nn.utils.clip_grad_norm_(m.parameters(), 0.05))
    ensemble.eval()
    x, _ = _batch(case, seed=42)
    for i, m in enumerate(separate):
        torch.testing.assert_close(ensemble(x)[:, i], m.eval()(x[:, i]), rtol=1e-4, atol=1e-4)


def test_local_loss_sums_independent_mean_cross_entropies():
    logits = torch.randn(5, 3, 4)
    y = torch.randint(0, 4, (5,))
    total, per_slot = local_loss(logits, y)
    expected = [nn.functional.cross_entropy(logits[:, i], y) for i in range(3)]
    torch.testing.assert_close(per_slot, torch.stack(expected))
    torch.testing.assert_close(total, sum(expected))


def test_wrong_input_shape_and_bad_arguments():
    e = LocalEnsemble(2, 1, 3, width=4)
    with pytest.raises(ShapeError, match=r"\(B, 2, 1"):
        e(torch.zeros(1, 3, 1, 8, 8))
    with pytest.raises(ShapeError, match="smaller"):
        e(torch.zeros(1, 2, 1, 2, 2))
    with pytest.raises(ConfigError, match="did you mean 'grouped'"):
        LocalEnsemble(2, 1, 3, backend="grouper")
    with pytest.raises(ConfigError, match="resnet"):
        LocalEnsemble(2, 1, 3, backbone="resnt")
    with pytest.raises(ConfigError, match="n_local"):
        LocalEnsemble(0, 1, 3)
    with pytest.raises(ConfigError, match="width"):
        LocalEnsemble(2, 1, 3, width=True)  # a bool is not a width


def test_the_grouped_and_vmap_backends_share_state_dict_keys_and_layout():
    """A built-in ensemble's state moves between grouped and vmap with load_state_dict (checkpoints of a CNN-DNN)."""
    grouped, _ = _pair(CASES[1], backend="grouped", seed=4)
    vmapped, _ = _pair(CASES[1], backend="vmap", seed=9)
    vmapped.load_state_dict(grouped.state_dict())
    x, _ = _batch(CASES[1])
    torch.testing.assert_close(vmapped.eval()(x), grouped.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", ["grouped", "loop", "vmap"])
@pytest.mark.parametrize("target", ["grouped", "loop", "vmap"])
def test_stacked_state_and_optimizer_state_move_training_between_backends(source, target):
    """Train 2 steps on one backend, move weights and Adam state to the other, train 2 more: equals 4 steps."""
    case = CASES[0]
    batches = [_batch(case, seed=s) for s in range(4)]

    def steps(ensemble, opt, some):
        for x, y in some:
            opt.zero_grad()
            local_loss(ensemble(x), y)[0].backward()
            opt.step()

    kw = dict(width=4, depth=(1, 1, 1), seed=2)
    ref = LocalEnsemble(N, C, K, backend=source, **kw)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    steps(ref, ref_opt, batches)
    a = LocalEnsemble(N, C, K, backend=source, **kw)
    a_opt = torch.optim.Adam(a.parameters(), lr=1e-2)
    steps(a, a_opt, batches[:2])
    b = LocalEnsemble(N, C, K, backend=target, **kw)
    b_opt = torch.optim.Adam(b.parameters(), lr=1e-2)
    b.load_stacked_state_dict(a.stacked_state_dict())
    b.load_stacked_optimizer_state(b_opt, a.stacked_optimizer_state(a_opt))
    steps(b, b_opt, batches[2:])
    for key, value in ref.stacked_state_dict().items():
        torch.testing.assert_close(b.stacked_state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_the_auto_backend_fuses_builtins_and_picks_loop_or_vmap_for_other_networks():
    from ddcnn.models.ensemble import VMAP_FROM, resolve_backend

    def net(in_channels, num_classes, width):
        return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(width, num_classes))

    assert LocalEnsemble(4, C, K, backbone="vgg", width=2, depth=(1,)).backend == "grouped"  # auto, the default
    assert LocalEnsemble(4, C, K, backbone=net, width=2).backend == "loop"
    assert LocalEnsemble(VMAP_FROM, C, K, backbone=net, width=2).backend == "vmap"
    assert resolve_backend("vmap", False, 2) == "vmap" and resolve_backend("loop", True, 64) == "loop"


def test_vmap_with_adaptive_pooling_in_channels_last_does_not_warn():
    """torch warns that vmap runs as_strided_ (adaptive pooling of a channels-last tensor) slot by slot; the
    ensemble silences exactly that warning, and no other."""
    import warnings

    def net(in_channels, num_classes, width):
        return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    ensemble = LocalEnsemble(4, 3, K, backbone=net, width=8, backend="vmap", seed=0)
    ensemble.to(memory_format=torch.channels_last)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ensemble(torch.randn(8, 4, 3, 14, 14)).sum().backward()
        message = "There is a performance drop because we have not yet implemented the batching rule for " \
            "aten::as_strided_. (elsewhere)"
        warnings.warn(message, stacklevel=1)  # outside the ensemble's forward: still shown
    assert [str(w.message) for w in caught] == [message]
