"""Foreign backbones (torchvision, MONAI, the user's own) as global and local CNNs, and the vmap backend."""

import copy

import pytest
import torch
from torch import nn

from conftest import tiny_dict
from ddcnn import CNNDNN, DNN, Decomposition, GlobalCNN, LocalEnsemble, local_loss
from ddcnn.config import from_dict
from ddcnn.errors import ConfigError, ShapeError
from ddcnn.models.backbones import slot_state
from ddcnn.models.family import Family, import_backbone


class SmallNet(nn.Module):
    """A user's CNN with BatchNorm whose factory takes the three keywords ddcnn offers."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 4):
        super().__init__()
        self.width = width
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                                      nn.BatchNorm2d(2 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


N, C, K = 3, 1, 4


def _batches(size, n=N, steps=3, b=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(b, n, C, *size, generator=g, dtype=dtype), torch.randint(0, K, (b,), generator=g))
            for _ in range(steps)]


def _near(got, want, tol, what):
    """Relative error in norm (some gradients are analytically near zero: an element-wise relative tolerance
    would test their rounding, not ddcnn)."""
    got, want = got.double().flatten(), want.double().flatten()
    assert (got - want).norm() <= tol * want.norm() + 1e-7, f"{what}: {(got - want).norm()} vs {want.norm()}"


def _check_vmap_equals_separate_training(backbone, size, tol=1e-5, lr=0.05, dtype=torch.float32, n=N, steps=3):
    """Several SGD steps of the vmap ensemble and of N copies of its local CNNs trained alone: the same outputs,
    gradients, weights and BatchNorm running statistics."""
    ensemble = LocalEnsemble(n, C, K, backbone=backbone, width=4, backend="vmap", seed=1)
    separate = [copy.deepcopy(ensemble.local_model(i)).to(dtype) for i in range(n)]
    ensemble.to(dtype)
    opt = torch.optim.SGD(ensemble.parameters(), lr=lr, momentum=0.9)
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m in separate]
    for step, (x, y) in enumerate(_batches(size, n, steps, dtype=dtype)):
        opt.zero_grad()
        out = ensemble(x)
        local_loss(out, y)[0].backward()
        grads = ensemble.slot_tensors(grads=True)
        for i, (m, o) in enumerate(zip(separate, opts)):
            o.zero_grad()
            single_out = m(x[:, i])
            _near(out[:, i], single_out, tol, f"step {step} slot {i} outputs")
            nn.functional.cross_entropy(single_out.float(), y).backward()  # local_loss takes it in float32
            _near(torch.cat([g[i].flatten() for g in grads]), torch.cat([p.grad.flatten() for p in m.parameters()]),
                  tol, f"step {step} slot {i} gradients")
            o.step()
        opt.step()
    stacked = ensemble.stacked_state_dict()  # local_model(i) would round float64 weights to a float32 CNN
    for i, m in enumerate(separate):
        got = slot_state(stacked, n, i)
        for key, value in m.state_dict().items():  # weights and BatchNorm running statistics
            _near(got[key], value, tol, key)
    x, _ = _batches(size, n, steps=1, dtype=dtype)[0]
    ensemble.eval()
    for i, m in enumerate(separate):
        _near(ensemble(x)[:, i], m.eval()(x[:, i]), tol, "eval outputs")


def test_vmap_trains_a_user_network_with_batchnorm_like_separate_models():
    _check_vmap_equals_separate_training(SmallNet, (8, 8))
    # running statistics moved: the test above compared something that training changes
    e = LocalEnsemble(N, C, K, backbone=SmallNet, backend="vmap", seed=1)
    before = e.net.features[1].running_mean.clone()
    e(_batches((8, 8), steps=1)[0][0])
    assert not torch.equal(before, e.net.features[1].running_mean)


# A whole resnet18 per slot takes seconds on 2 cores: heavy; the user network above keeps vmap training in `make test`.
@pytest.mark.heavy
def test_vmap_trains_torchvision_resnet18_like_separate_models():
    pytest.importorskip("torchvision")
    # No weights: nothing is downloaded; ddcnn adapts the first convolution to one channel. In float64: resnet18's
    # BatchNorm over 6 values per channel in its last stages amplifies float32 rounding from step to step.
    _check_vmap_equals_separate_training("torchvision.models.resnet18", (8, 8), tol=1e-9, dtype=torch.float64,
                                         n=2, steps=2)


def test_monai_densenet_as_local_cnns():
    pytest.importorskip("monai")
    from monai.networks.nets import DenseNet

    def densenet(in_channels, num_classes):
        return DenseNet(spatial_dims=2, in_channels=in_channels, out_channels=num_classes, init_features=4,
                        growth_rate=4, block_config=(1, 1), bn_size=2)

    _check_vmap_equals_separate_training(densenet, (8, 8))


def test_a_factory_gets_the_width_rule_and_a_module_is_a_template_reinitialised_per_slot():
    e = LocalEnsemble(2, C, K, backbone=SmallNet, width=3, backend="loop", seed=0)
    assert [m.width for m in e.models] == [3, 3]
    template = SmallNet(C, K, width=5)
    t = LocalEnsemble(2, C, K, backbone=template, backend="vmap", seed=0)
    a, b = t.local_model(0), t.local_model(1)
    assert a.fc.weight.shape == template.fc.weight.shape
    assert not torch.equal(a.fc.weight, b.fc.weight) and not torch.equal(a.fc.weight, template.fc.weight)
    again = LocalEnsemble(2, C, K, backbone=template, backend="loop", seed=0)
    assert torch.equal(again.local_model(1).fc.weight, b.fc.weight)  # local CNN i from (seed, i) alone


def test_first_convolution_and_last_linear_are_adapted_when_the_factory_is_not_told():
    pytest.importorskip("torchvision")
    net = Family("torchvision.models.resnet18").build(in_channels=1, num_classes=7, width=4, dims=2)
    assert net.conv1.in_channels == 1 and net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2)
    assert net.fc.out_features == 7  # passed as num_classes (the builder takes **kwargs)

    def fixed():  # told nothing: both ends are replaced
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(1), nn.Linear(64, 1000))

    net = GlobalCNN(2, 5, backbone=fixed).net
    assert net[0].in_channels == 2 and net[2].out_features == 5
    assert net(torch.zeros(1, 2, 6, 6)).shape == (1, 5)


def test_cnn_dnn_and_transfer_run_with_a_foreign_backbone():
    d = Decomposition((16, 16), (2, 2))
    model = CNNDNN(d, LocalEnsemble(4, C, K, backbone=SmallNet, backend="vmap", seed=0), DNN(4, K, hidden=[8]))
    out, local = model(torch.randn(5, C, 16, 16), return_local=True)
    assert out.shape == (5, K) and local.shape == (5, 4, K)


def test_what_cannot_be_a_local_cnn_is_refused_naming_the_model_and_the_shape():
    def too_deep(in_channels, num_classes):  # needs at least 8 pixels per axis
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

    d = Decomposition((8, 8), (2, 2))  # subimages of 4x4
    with pytest.raises(ShapeError, match=r"too_deep.*\[1, 1, 4, 4\]"):
        CNNDNN(d, LocalEnsemble(4, C, K, backbone=too_deep, backend="loop"), DNN(4, K))

    def wrong_output(in_channels, num_classes):
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.Flatten())  # no head: (1, 4*h*w)

    with pytest.raises(ShapeError, match=r"wrong_output.*\[1, 64\].*\[1, 4\]"):
        CNNDNN(d, LocalEnsemble(4, C, K, backbone=wrong_output, backend="vmap"), DNN(4, K))


def test_bad_foreign_backbones_are_clear_errors():
    with pytest.raises(ConfigError, match="'no_such_package' is not found"):
        import_backbone("no_such_package.nets:Net")
    with pytest.raises(ConfigError, match="did you mean 'Conv2d'"):
        import_backbone("torch.nn.Conv2e")
    with pytest.raises(ConfigError, match="not a class or function"):
        import_backbone("math.pi")
    with pytest.raises(ConfigError, match="grouped.*'auto'"):
        LocalEnsemble(2, C, K, backbone=SmallNet, backend="grouped")  # it fuses built-ins only
    with pytest.raises(ConfigError, match="depth"):
        LocalEnsemble(2, C, K, backbone=SmallNet, depth=[1], backend="vmap")
    with pytest.raises(ConfigError, match="failed to build.*colour"):
        LocalEnsemble(2, C, K, backbone=SmallNet, backend="vmap", backbone_kwargs={"colour": 1})
    with pytest.raises(ConfigError, match="returned 'int'"):
        LocalEnsemble(2, C, K, backbone=lambda: 3, backend="vmap")

    class Scaled(SmallNet):
        def __init__(self, in_channels, num_classes):
            super().__init__(in_channels, num_classes)
            self.scale = nn.Parameter(torch.tensor(1.0))

    with pytest.raises(ConfigError, match="scale"):
        LocalEnsemble(2, C, K, backbone=Scaled, backend="vmap")
    with pytest.raises(ConfigError, match="lazy"):
        LocalEnsemble(2, C, K, backbone=lambda: nn.Sequential(nn.Flatten(), nn.LazyLinear(K)), backend="vmap")


def test_the_model_settings_import_the_backbone():
    """The config layer imports nothing; ddcnn.models.settings imports (and so checks) a trusted import path."""
    from ddcnn.models.settings import check_model_settings

    def check(data):
        cfg = from_dict(data)
        check_model_settings(cfg.model, cfg.combiner)
        return cfg

    data = tiny_dict(2)
    data["model"] = {"backbone": "torch.nn.Linearr", "backend": "vmap"}
    with pytest.raises(ConfigError, match=r"model.backbone.*did you mean 'Linear'"):
        check(data)
    data["model"] = {"backbone": "nowhere.nets:Net", "backend": "vmap"}
    with pytest.raises(ConfigError, match="model.backbone.*'nowhere' is not found"):
        check(data)
    data["model"] = {"backbone": "torchvision.models.resnet18", "backend": "grouped"}
    with pytest.raises(ConfigError, match="model.backend = 'grouped'.*--set model.backend=auto"):
        check(data)
    data["model"] = {"backbone": "vgg", "backbone_kwargs": {"num_classes": 3}}
    with pytest.raises(ConfigError, match="backbone_kwargs"):
        check(data)
    data["model"] = {"backbone": "torchvision.models.resnet18", "backend": "vmap",
                     "backbone_kwargs": {"zero_init_residual": True}}
    assert check(data).model.backbone_kwargs == {"zero_init_residual": True}


NETS = '''
import torch
from torch import nn


def tiny(in_channels, num_classes, width):
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
'''


@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_a_run_with_an_imported_backbone_trains_every_strategy(tmp_path, monkeypatch, one_thread, backend):
    from ddcnn.finished.run import SavedRun
    from ddcnn.strategies import strategy_names
    from ddcnn.train.protocol import Experiment

    (tmp_path / "user_nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tiny_dict(2)
    data["model"] = {"backbone": "user_nets.tiny", "width": 4, "backend": backend}
    data["stages"] = {s: {"epochs": 1, "batch_size": 32} for s in data["stages"]}
    results = Experiment(from_dict(data), tmp_path / "run", verbose=False).run()
    assert set(results["strategies"]) == set(strategy_names())
    assert results["local_width"] == 2  # round(4 / sqrt(4)): the built-ins' width rule
    with pytest.raises(ConfigError, match="names the backbone 'user_nets.tiny'.*--trust-code"):
        SavedRun(tmp_path / "run")  # the run directory is data: its import path needs the user's word
    saved = SavedRun(tmp_path / "run", trust_code=True)
    assert saved.trained["local"].backend == backend and set(saved.strategies()) == set(strategy_names())


def test_a_torchvision_config_is_refused_when_its_subimages_are_too_small(tmp_path):
    pytest.importorskip("torchvision")
    from ddcnn.build import Models, Shapes

    data = tiny_dict(2)
    data["model"] = {"backbone": "torchvision.models.vit_b_16", "backend": "vmap"}
    with pytest.raises(ShapeError, match=r"vit_b_16.*the global CNN.*\[1, 1, 16, 16\]"):
        Models(from_dict(data), Shapes(1, 3, (16, 16)))


def test_naming_a_network_on_a_shipped_config_needs_one_set(tmp_path, monkeypatch, capsys):
    """configs/fashion_mnist_2x2.yaml sets model.depth (for vgg) and no backend: --set model.backbone=... alone
    builds, with a note that depth is ignored, and the backend auto resolves to loop for 4 local CNNs, vmap for 16."""
    from ddcnn.build import Models, Shapes, with_backend
    from ddcnn.config import load_config

    (tmp_path / "user_nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config("configs/fashion_mnist_2x2.yaml", ["model.backbone=user_nets:tiny"])
    assert cfg.model.depth == [2, 2, 2] and cfg.model.backend == "auto"
    models = Models(cfg, Shapes(1, 10, (28, 28)))
    assert models.ensemble().backend == "loop" and models.depth is None
    assert models.notes == ["model.depth [2, 2, 2] applies to vgg and resnet only: ignored for user_nets:tiny (its "
                            "layers are set through model.backbone_kwargs)"]
    assert with_backend(cfg).model.backend == "loop" and cfg.model.backend == "auto"  # what config.yaml records
    fine = load_config("configs/fashion_mnist_4x4.yaml", ["model.backbone=user_nets:tiny"])
    assert with_backend(fine).model.backend == "vmap"
    builtin = load_config("configs/fashion_mnist_2x2.yaml")
    assert with_backend(builtin).model.backend == "grouped"  # the built-ins: fused
    assert Models(builtin, Shapes(1, 10, (28, 28))).notes == []


# ------------------------------------------------------------------------- networks that fail only in training --
class _Base(nn.Module):
    def __init__(self, in_channels=1, num_classes=3):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, num_classes))


class TupleInTraining(_Base):
    def forward(self, x):
        out = self.net(x)
        return (out, out) if self.training else out


class OnlyBatchOfOne(_Base):
    def forward(self, x):
        return self.net(x).reshape(1, -1)


class NoParameters(nn.Module):
    def __init__(self, in_channels=1, num_classes=3):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        return x.flatten(1)[:, : self.num_classes]


class FailsInTraining(_Base):
    def forward(self, x):
        if self.training:
            raise RuntimeError("this network cannot train")
        return self.net(x)


class InPlaceOnInput(_Base):
    def forward(self, x):
        x.mul_(2)  # changes its input in place: the loop backend's view of the batch
        return self.net(x)


class Dropout(_Base):
    def forward(self, x):
        return nn.functional.dropout(self.net(x), 0.5, self.training)


@pytest.mark.parametrize(("net", "backend", "fragment"), [
    (TupleInTraining, "vmap", "to tuple in training mode"),
    (OnlyBatchOfOne, "loop", "training mode"),
    (NoParameters, "vmap", "no trainable parameters"),
    (FailsInTraining, "loop", "in training mode.*RuntimeError: this network cannot train"),
    (InPlaceOnInput, "loop", "backend 'loop'.* in training mode.*modified by an inplace operation"),
])
def test_networks_that_fail_only_in_training_are_refused_before_training(tmp_path, monkeypatch, net, backend,
                                                                         fragment):
    from ddcnn.build import Models, Shapes

    module = tmp_path / "train_nets.py"
    module.write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    import train_nets

    monkeypatch.setattr(train_nets, "Net", net, raising=False)
    data = tiny_dict(2)
    data["model"] = {"backbone": "train_nets:Net", "backend": backend}
    with pytest.raises((ConfigError, ShapeError), match=fragment):
        Models(from_dict(data), Shapes(1, 3, (16, 16)))


@pytest.mark.parametrize(("net", "backend"), [(InPlaceOnInput, "vmap"), (Dropout, "vmap"), (Dropout, "loop")])
def test_networks_that_change_their_input_or_draw_dropout_train(net, backend, one_thread):
    """Dropout under vmap (its own masks per local CNN) and in-place changes of the input under vmap pass the
    training pre-check and a training step (under loop the input is a view of the batch: refused above)."""
    ensemble = LocalEnsemble(2, 1, 3, backbone=net, width=4, backend=backend, seed=0)
    ensemble.check_subimages(Decomposition((16, 16), [1, 2]))
    ensemble(torch.randn(4, 2, 1, 16, 8)).sum().backward()


class FailsOnLargeBatches(_Base):
    def forward(self, x):
        if self.training and x.shape[0] > 2:  # passes the pre-check's batch of two
            raise RuntimeError("too many images")
        return self.net(x)


def test_an_error_in_a_training_step_names_the_network_and_the_stage(tmp_path, monkeypatch, one_thread):
    from ddcnn.errors import TrainingError
    from ddcnn.train.protocol import Experiment

    (tmp_path / "late_nets.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    import late_nets

    monkeypatch.setattr(late_nets, "Net", FailsOnLargeBatches, raising=False)
    data = tiny_dict(2)
    data["model"] = {"backbone": "late_nets:Net", "backend": "vmap"}
    data["stages"]["global"]["enabled"] = False
    with pytest.raises(TrainingError, match=r"backbone 'late_nets:Net' failed in stage 'local' \(epoch 1, step 1.*"
                                            r"RuntimeError: too many images"):
        Experiment(from_dict(data), tmp_path / "run", verbose=False).run()


class ReadsItsWeights(_Base):
    def __init__(self, in_channels=1, num_classes=3):
        super().__init__(in_channels, num_classes)
        self.scale = float(self.net[0].weight.abs().sum().item()) > 0  # a value: no meta tensor has one

    def forward(self, x):
        return self.net(x)


def test_a_network_that_reads_a_weight_value_in_init_is_sized_not_refused(tmp_path, monkeypatch):
    from ddcnn.build import Models, Shapes
    from ddcnn.train.budget import check_budget

    (tmp_path / "value_nets.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    import value_nets

    monkeypatch.setattr(value_nets, "Net", ReadsItsWeights, raising=False)
    data = tiny_dict(2)
    data["model"] = {"backbone": "value_nets:Net", "backend": "vmap"}
    cfg = from_dict(data)
    models = Models(cfg, Shapes(1, 3, (16, 16)))
    sizes = check_budget(cfg, models, torch.device("cpu"), 128, free=2**40)
    assert {s.stage: s.parameters for s in sizes}["local"] == 4 * sum(p.numel() for p in ReadsItsWeights().parameters())
