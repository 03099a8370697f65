"""Width decomposition: sub-networks of width w / N, recomposed into the global CNN (ddcnn.models.width), the
global_transfer stage, its strategies, its tools and its refusals."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_dict
from ddcnn.build import Models, Shapes
from ddcnn.config import STAGES, active, from_dict
from ddcnn.data.fetch import find_dataset
from ddcnn.errors import ConfigError, DDCNNError
from ddcnn.models import GlobalCNN, LocalEnsemble
from ddcnn.models.width import MeanLogits, WholeImages, recompose, sub_width
from ddcnn.train.protocol import Experiment
from ddcnn.train.store.checkpoint import CheckpointDir

WIDTH = ["decomposition.kind=width", "decomposition.parts=4", "model.width=8", "stages.global_transfer.epochs=1",
         "stages.global_transfer.batch_size=32"]
ROOT = Path(__file__).resolve().parents[1]


def _trained_ensemble(backbone, dims, backend="grouped", parts=4):
    """Sub-networks whose BatchNorm statistics and affine parameters are not the fresh ones."""
    size = (8,) * dims
    ensemble = LocalEnsemble(parts, 2, 5, backbone, width=2, depth=[1, 1], dims=dims, backend=backend, seed=3)
    with torch.no_grad():
        for name, p in ensemble.named_parameters():
            if "bn" in name or p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    images = torch.randn(6, 2, *size)
    ensemble.train()(WholeImages(size, parts).split(images))  # running statistics of a batch
    return ensemble.eval(), size


@pytest.mark.parametrize(("backbone", "dims", "backend"), [
    ("vgg", 2, "grouped"), ("vgg", 3, "grouped"), ("resnet", 2, "grouped"), ("resnet", 3, "grouped"),
    ("resnet", 2, "loop"),  # any backend: the recomposition reads the stacked layout
])
def test_the_recomposed_global_cnn_gives_the_sub_networks_averaged_logits(backbone, dims, backend):
    torch.manual_seed(0)
    ensemble, size = _trained_ensemble(backbone, dims, backend)
    cnn = GlobalCNN(2, 5, backbone, 8, [1, 1], dims)
    recompose(cnn.net, ensemble.stacked_state_dict(), 4)
    images = torch.randn(5, 2, *size)
    with torch.no_grad():
        expected = MeanLogits(4, 5)(ensemble(WholeImages(size, 4).split(images)))
        got = cnn.eval()(images)
    assert expected.abs().max() > 0.1  # the comparison is not of zeros
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_cross_group_blocks_start_at_zero_or_at_a_fraction_of_the_initialisation():
    ensemble, _ = _trained_ensemble("vgg", 2)
    stacked = ensemble.stacked_state_dict()
    for scale in (0.0, 0.25):
        torch.manual_seed(1)
        cnn = GlobalCNN(2, 5, "vgg", 8, [1, 1], 2)
        fresh = cnn.net.stage2[1][0].weight.detach().clone()  # stage 2's conv: (16, 8, 3, 3), blocks of (4, 2)
        recompose(cnn.net, stacked, 4, cross_scale=scale)
        weight = cnn.net.stage2[1][0].weight.detach()
        sub = stacked["stage2.1.0.weight"]
        for i in range(4):
            for j in range(4):
                block = weight[4 * i:4 * (i + 1), 2 * j:2 * (j + 1)]
                expected = sub[4 * i:4 * (i + 1)] if i == j else scale * fresh[4 * i:4 * (i + 1), 2 * j:2 * (j + 1)]
                assert torch.equal(block, expected), (scale, i, j)
        # the first convolution: every sub-network reads both input channels, stacked on the output channels
        assert torch.equal(cnn.net.stage1[0][0].weight, stacked["stage1.0.0.weight"])


def test_sub_networks_of_another_width_are_refused():
    ensemble, _ = _trained_ensemble("vgg", 2)
    with pytest.raises(DDCNNError, match="global CNN's width must be the sub-networks' width times their number"):
        recompose(GlobalCNN(2, 5, "vgg", 12, [1, 1], 2).net, ensemble.stacked_state_dict(), 4)
    with pytest.raises(DDCNNError, match="the sub-networks have no 'stage1.1.0.weight'.*backbone and depth"):
        recompose(GlobalCNN(2, 5, "vgg", 8, [2, 1], 2).net, ensemble.stacked_state_dict(), 4)
    deeper = GlobalCNN(2, 5, "vgg", 8, [2, 1], 2).net.state_dict()
    with pytest.raises(DDCNNError, match="the sub-networks hold .*which the global CNN lacks"):
        recompose(GlobalCNN(2, 5, "vgg", 8, [1, 1], 2).net,
                  {**ensemble.stacked_state_dict(), "stage1.1.0.weight": deeper["stage1.1.0.weight"]}, 4)


def test_whole_images_give_every_sub_network_the_image():
    d = WholeImages((6, 5), 3)
    x = torch.randn(2, 1, 6, 5)
    assert torch.equal(d.split(x), torch.stack([x] * 3, dim=1))
    assert d.split(x, range(1, 3)).shape == (2, 2, 1, 6, 5)
    assert d.region(range(1, 2)) == ((0, 0), (6, 5))
    assert d.n_subdomains == 3 and d.subimage_size == (6, 5)


@pytest.mark.parametrize(("width", "parts", "message"), [
    (10, 4, "does not split into decomposition.parts = 4.*divisible by 4"),
    (4, 4, "width 1, narrower than 2.*model.width >= 8"),
])
def test_a_width_that_does_not_split_is_one_clear_error(width, parts, message):
    with pytest.raises(ConfigError, match=message):
        sub_width(width, parts)
    assert sub_width(16, 4) == 4


@pytest.mark.parametrize(("overrides", "message"), [
    (["decomposition.parts=4"], "decomposition.parts = 4 applies to decomposition.kind: width"),
    (["decomposition.kind=width", "decomposition.input=subimage", "decomposition.parts=3"],
     "one sub-network per subimage of grid \\[2, 2\\] \\(4\\); set decomposition.parts=4"),
    (["decomposition.kind=width", "model.local_width=3"], "model.local_width = 3 does not apply"),
    (["decomposition.kind=depth"], "decomposition.kind"),
    (["decomposition.kind=width", "decomposition.cross_scale=-1"], "cross_scale = -1.0 must not be negative"),
    (["decomposition.kind=width", "decomposition.parts=1"], "at least 2 sub-networks"),
])
def test_width_settings_are_checked_with_the_config(overrides, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(tiny_dict(2), overrides)


def test_a_foreign_backbone_is_refused_before_it_is_imported():
    cfg = from_dict(tiny_dict(2), ["decomposition.kind=width", "model.backbone=no_such_package.nets:Net"])
    with pytest.raises(ConfigError, match="recomposes the built-in backbones \\(vgg, resnet\\) only"):
        Models(cfg, Shapes(1, 3, (16, 16)))


def test_global_transfer_runs_only_with_width_and_the_cnn_dnn_only_on_subimages():
    spatial, width = from_dict(tiny_dict(2)), from_dict(tiny_dict(2), WIDTH)
    subimage = from_dict(tiny_dict(2), [*WIDTH[:1], "decomposition.input=subimage", *WIDTH[2:]])
    assert [s for s in STAGES if active(spatial, s)] == ["global", "local", "combine", "coherent", "transfer"]
    assert [s for s in STAGES if active(width, s)] == ["global", "local", "global_transfer"]
    assert [s for s in STAGES if active(subimage, s)] == list(STAGES)


@pytest.fixture(scope="module")
def width_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("width") / "run"
    cfg = from_dict(tiny_dict(2), WIDTH)
    return out, Experiment(cfg, out, verbose=False).run()


def test_a_width_run_scores_the_global_cnn_with_and_without_transfer(width_run):
    out, results = width_run
    strategies = results["strategies"]
    assert list(strategies) == ["global", "mean_probability", "majority_vote", "sub_networks", "global_transfer"]
    assert results["decomposition"] == {"kind": "width", "parts": 4, "input": "whole", "cross_scale": 0.0}
    assert results["local_width"] == 2 and results["n_local"] == 4
    # the recomposed CNN is the global CNN: same parameters and FLOPs; its cost counts the sub-networks' stage
    assert strategies["global_transfer"]["parameters"] == strategies["global"]["parameters"]
    assert strategies["global_transfer"]["flops_per_image"] == strategies["global"]["flops_per_image"]
    cost, local = strategies["global_transfer"]["cost"], strategies["sub_networks"]["cost"]
    assert cost["epochs"] == {"local": 2, "global_transfer": 1}
    assert cost["train_flops"] > local["train_flops"] > 0
    assert results["curves"]["global_transfer"][0]["seconds"] >= local["seconds"]
    assert [p["stage"] for p in results["curves"]["sub_networks"]] == ["local", "local"]
    assert "sub-network ensemble" in (out / "report.md").read_text()
    assert not CheckpointDir(out / "checkpoints").has("combine")


def test_a_width_run_loads_evaluates_and_exports(width_run, tmp_path):
    from ddcnn.export import export_run
    from ddcnn.train.evaluate import evaluate_run

    out, results = width_run
    evaluation = evaluate_run(out, trust_code=False)
    for name, entry in results["strategies"].items():
        assert evaluation["strategies"][name]["test_accuracy"] == pytest.approx(entry["test_accuracy"]), name
    for name in ("global_transfer", "sub_networks"):
        exported = export_run(out, name, "pt2", out=tmp_path / f"{name}.pt2")
        assert exported.path.is_file() and exported.agree == exported.checked > 0 and exported.layout != "separate"


def test_show_describes_the_sub_networks(tmp_path):
    from ddcnn.describe import describe

    text = describe(from_dict(tiny_dict(2), WIDTH))
    assert "4 sub-networks of width 2, each on the whole [16, 16] image" in text and "recomposed" in text
    assert "\nCNN-DNN " not in text  # no CNN-DNN is trained on whole images


@pytest.mark.parametrize("backbone", ["vgg", "resnet"])
def test_the_subimage_option_runs_every_strategy_end_to_end(tmp_path, backbone, one_thread):
    cfg = from_dict(tiny_dict(2), [*WIDTH[:1], "decomposition.input=subimage", *WIDTH[2:], f"model.backbone={backbone}",
                                   "stages.coherent.enabled=false"] + [f"stages.{s}.epochs=1" for s in STAGES])
    results = Experiment(cfg, tmp_path / "run", verbose=False).run()
    assert list(results["strategies"]) == ["global", "cnn_dnn", "mean_probability", "majority_vote", "transfer",
                                           "sub_networks", "global_transfer"]
    assert results["grid"] == [2, 2] and results["subimage_size"] == [8, 8] and results["local_width"] == 2


def test_3d_width_runs_end_to_end(tmp_path, one_thread):
    cfg = from_dict(tiny_dict(3), [*WIDTH, "stages.global.enabled=false", "stages.local.epochs=1"])
    results = Experiment(cfg, tmp_path / "run", verbose=False).run()
    assert list(results["strategies"]) == ["mean_probability", "majority_vote", "sub_networks", "global_transfer"]


def test_a_spatial_run_has_no_width_keys(finished_run):
    _, results = finished_run
    assert "decomposition" not in results and "sub_networks" not in results["strategies"]
    assert "global_transfer" not in results["stages"]


@pytest.mark.heavy  # reads all of Fashion-MNIST: half a minute on 2 cores (make test-heavy)
def test_the_issue_command_trains_sub_networks_recomposes_them_and_trains_the_global_cnn(tmp_path):
    """``ddcnn run configs/fashion_mnist_2x2.yaml --set decomposition.kind=width --set decomposition.parts=4`` at a
    tiny budget, on the real Fashion-MNIST files."""
    if find_dataset("fashion-mnist") is None:
        pytest.skip("Fashion-MNIST is not installed (ddcnn data fetch fashion-mnist)")
    out = tmp_path / "run"
    tiny = ["data.limit_train=400", "data.limit_test=200", "model.width=8", "stages.*.epochs=1", "device=cpu"]
    proc = subprocess.run([sys.executable, "-m", "ddcnn", "run", str(ROOT / "configs/fashion_mnist_2x2.yaml"),
                           "--set", "decomposition.kind=width", "--set", "decomposition.parts=4",
                           *[a for s in tiny for a in ("--set", s)], "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", **__import__("os").environ},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["strategies"]) == {"global", "mean_probability", "majority_vote", "sub_networks",
                                          "global_transfer"}
    assert results["local_width"] == 2
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["decomposition"]["kind"] == "width" and saved["decomposition"]["parts"] == 4


@pytest.mark.heavy  # two runs, one under torchrun: about a minute on 2 cores (make test-heavy)
def test_two_processes_train_the_same_sub_networks_and_recomposed_cnn_as_one(tmp_path):
    """torchrun shards the sub-networks as the local stage shards local CNNs (the loop backend: bit for bit); the
    recomposed global CNN, trained spatial-parallel (every process sees every batch), agrees to float32 rounding."""
    from test_distributed import _finish, _records, _run, _weights

    data = tiny_dict(2, generated_train=160, generated_test=64)
    data["stages"]["global"]["enabled"] = False
    data["model"].update(width=8, backend="loop")
    data["decomposition"].update(kind="width", parts=4)
    data["stages"]["global_transfer"] = {"epochs": 2, "batch_size": 32, "lr": 0.01, "parallel": "spatial"}
    path = tmp_path / "width.yaml"
    path.write_text(yaml.safe_dump(data))
    one, two = _run(["run", str(path)], tmp_path / "one"), _run(["run", str(path)], tmp_path / "two", processes=2)
    _finish(one), _finish(two)
    a, b = _weights(tmp_path / "one", "local"), _weights(tmp_path / "two", "local")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    a, b = _weights(tmp_path / "one", "global_transfer"), _weights(tmp_path / "two", "global_transfer")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4, msg=key)
    r1, r2 = (json.loads((p / "results.json").read_text()) for p in (tmp_path / "one", tmp_path / "two"))
    assert r2["processes"] == 2 and r2["parallel"] == {"global_transfer": "spatial"}
    assert r1["strategies"]["sub_networks"]["test_accuracy"] == r2["strategies"]["sub_networks"]["test_accuracy"]
    # the logged loss is the mean over the shards' sums: equal to float32 rounding
    assert [r["train_loss"] for r in _records(tmp_path / "one", "local")] == \
        pytest.approx([r["train_loss"] for r in _records(tmp_path / "two", "local")], rel=1e-6)


def test_a_run_directory_written_before_width_decomposition_resumes(finished_run, tmp_path):
    """A config.yaml without decomposition.kind, parts, input, cross_scale and stages.global_transfer: their
    defaults held, so it is neither corrupt nor changed."""
    from ddcnn.train.store.rundir import RunDir

    saved = yaml.safe_load((finished_run[0] / "config.yaml").read_text())
    assert saved["decomposition"].pop("kind") == "spatial"
    for key in ("parts", "input", "cross_scale"):
        saved["decomposition"].pop(key)
    saved["stages"].pop("global_transfer")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    from ddcnn.build import with_backend

    assert RunDir(tmp_path).check_same_config(with_backend(from_dict(tiny_dict(2)))) == saved
    with pytest.raises(DDCNNError, match="decomposition.kind was 'spatial' when the checkpoints were written"):
        RunDir(tmp_path).check_same_config(with_backend(from_dict(tiny_dict(2), WIDTH[:2])))


def _curve(costs, accuracies):
    return [{"seconds": c, "critical_path_seconds": c / 2, "train_flops": 10 * c, "val_accuracy": a}
            for c, a in zip(costs, accuracies)]


def _width_runs(differences):
    from ddcnn.study.aggregate import RunData

    runs = []
    for seed, d in enumerate(differences):
        # global: 0.70 at cost 4, 0.80 at 8; global_transfer (after 3 of sub-networks): 0.78 + d at 5, 0.9 at 12
        curves = {"global": _curve([4, 8], [0.7, 0.8]), "global_transfer": _curve([5, 12], [0.78 + d, 0.9])}
        ten = {"seconds": 10.0, "critical_path_seconds": 10.0}
        strategies = {"global": {"test_accuracy": 0.8, "time_to_target": ten},
                      "sub_networks": {"test_accuracy": 0.75, "time_to_target": None},
                      "global_transfer": {"test_accuracy": 0.8 + d,
                                          "time_to_target": {"seconds": 5.0, "critical_path_seconds": 4.0}}}
        runs.append(RunData("c", seed, {"strategies": strategies, "curves": curves}))
    return runs


@pytest.mark.parametrize(("differences", "verdict"), [
    ([0.001, -0.002, 0.0, 0.002, -0.001], "non-inferior"),      # within 0.5 pp
    ([0.02, -0.03, 0.01, -0.02, 0.0], "not shown"),             # an interval reaching below -0.5 pp
])
def test_the_study_judges_global_transfer_against_the_global_cnn_as_non_inferiority(differences, verdict):
    from ddcnn.study.aggregate import CLAIMS, aggregate, aggregate_cell
    from ddcnn.study.report import claims_table, equal_cost_lines

    cell = aggregate_cell(_width_runs(differences))
    assert list(cell["claims"]) == ["global_transfer - global", "global_transfer - sub_networks",
                                    "sub_networks - global"]
    claim = cell["claims"]["global_transfer - global"]
    assert claim["noninferiority"] == {"margin": 0.005, "verdict": verdict}
    assert claim["mean"] == pytest.approx(sum(differences) / 5)
    assert cell["time_claims"]["global_transfer / global"]["seconds"]["geometric_mean"] == pytest.approx(0.5)
    assert cell["time_claims"]["sub_networks / global"]["not_reached"] == {str(s): ["sub_networks"] for s in range(5)}
    # at equal cost: the budget is global's whole cost (8), within which global_transfer reached 0.78 + d
    equal = cell["equal_cost_claims"]["global_transfer - global"]
    for key in ("seconds", "critical_path_seconds", "train_flops"):
        assert equal[key]["per_seed"] == {str(s): pytest.approx(d - 0.02) for s, d in enumerate(differences)}
    # a study of spatial and width cells: every cell answers every claim, the paper's first for the spatial cell
    spatial = RunDataOf("s", {"global": 0.8, "transfer": 0.81, "coherent": 0.7, "cnn_dnn": 0.79,
                              "mean_probability": 0.78, "majority_vote": 0.77})
    data = aggregate([{"id": "c", "label": "c", "values": {}}, {"id": "s", "label": "s", "values": {}}],
                     [*_width_runs(differences), *spatial], {})
    assert data["claims"][:3] == list(cell["claims"]) and data["claims"][3:] == [f"{a} - {b}" for a, b in CLAIMS]
    assert data["cells"][0]["claims"]["transfer - coherent"]["verdict"] == "not measured"
    assert data["cells"][1]["claims"]["global_transfer - global"]["verdict"] == "not measured"
    text = claims_table(data)
    assert "## At equal cost" in "\n".join(equal_cost_lines(data))
    assert ("non-inferior at 0.50 pp" if verdict == "non-inferior" else "non-inferiority at 0.50 pp not shown") in text


def RunDataOf(cell, accuracies):
    from ddcnn.study.aggregate import RunData

    return [RunData(cell, seed, {"strategies": {k: {"test_accuracy": v + 0.001 * seed} for k, v in accuracies.items()}})
            for seed in range(3)]


def test_a_spatial_study_keeps_its_claims():
    from ddcnn.study.aggregate import CLAIMS, TIME_CLAIMS, aggregate

    runs = RunDataOf("s", {"global": 0.8, "transfer": 0.81, "coherent": 0.7, "cnn_dnn": 0.79,
                           "mean_probability": 0.78, "majority_vote": 0.77})
    data = aggregate([{"id": "s", "label": "s", "values": {}}], runs, {})
    assert data["claims"] == [f"{a} - {b}" for a, b in CLAIMS]
    assert data["time_claims"] == [f"{a} / {b}" for a, b in TIME_CLAIMS]
    assert "noninferiority" not in str(data) and "equal_cost_claims" not in data["cells"][0]


def test_the_shipped_width_study_is_a_valid_study_of_width_runs():
    from ddcnn.study.spec import load_study

    study = load_study(ROOT / "studies/fashion_mnist_width.yaml")
    cfg = from_dict(study.base, ["model.backbone=vgg"])  # the base with the study's `set` applied
    assert [s for s in STAGES if active(cfg, s)] == ["global", "local", "global_transfer"]
    assert study.seeds == [0, 1, 2, 3, 4]
