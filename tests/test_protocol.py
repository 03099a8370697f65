import json
import shutil

import pytest
import torch

from ddcnn.errors import CheckpointError, ConfigError, TrainingError
from ddcnn.strategies import strategy_names
from ddcnn.train.protocol import Experiment
from ddcnn.train.store.checkpoint import CheckpointDir


def test_a_run_writes_the_whole_run_directory(finished_run):
    out, results = finished_run
    for name in ("config.yaml", "metrics.jsonl", "results.json", "report.md", "data.json", "ddcnn-run.json"):
        assert (out / name).is_file(), name
    for plot in ("learning_curves.png", "local_accuracy.png", "decomposition.png", "confusion_matrix.png",
                 "accuracy_vs_cost.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["strategies"]) == set(strategy_names())
    for entry in saved["strategies"].values():
        assert 0.0 <= entry["test_accuracy"] <= 1.0
        assert entry["train_seconds"] > 0 and entry["parameters"] > 0 and entry["flops_per_image"] > 0
    assert len(saved["local"]["test_accuracy"]) == 4
    assert saved["local"]["critical_path_seconds"] > 0
    assert saved["grid"] == [2, 2] and saved["dataset"] == "generated"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "epoch" in r]
    epochs = {(r["stage"], r["epoch"]) for r in records}
    assert epochs == {("global", 1), ("global", 2), ("local", 1), ("local", 2), ("combine", 1), ("combine", 2),
                      ("coherent", 1), ("transfer", 1), ("transfer", 2)}
    assert all(len(r["val_accuracy_per_subdomain"]) == 4 for r in records if r["stage"] == "local")
    # the transfer strategy's time includes the local and combine stages it builds on
    s = saved["stage_seconds"]
    assert saved["strategies"]["transfer"]["train_seconds"] == pytest.approx(s["local"] + s["combine"] + s["transfer"])
    # confusion matrix counts every test image once
    assert sum(map(sum, saved["confusion_matrix"]["matrix"])) == saved["data_sizes"]["test"]
    # one end-of-stage record per stage, after its epochs; the cost grows epoch by epoch
    ends = [r for r in lines if r.get("event") == "end"]
    assert [r["stage"] for r in ends] == ["global", "local", "combine", "coherent", "transfer"]
    assert all(r["stop_reason"] == "cap" and r["kept_epoch"] == r["epochs_run"] == r["cap"] for r in ends)
    for stage in ("global", "local", "transfer"):
        flops = [r["train_flops"] for r in records if r["stage"] == stage]
        assert flops == sorted(flops) and flops[0] > 0
    # the best strategy is chosen on validation accuracy, reported next to the test accuracy
    val = {name: entry["val_accuracy"] for name, entry in saved["strategies"].items()}
    assert saved["best_strategy"] == max(val, key=val.get) and saved["best_strategy_basis"] == "validation accuracy"
    report = (out / "report.md").read_text()
    assert "## Time to accuracy" in report and "the global CNN's best validation accuracy" in report
    global_best = max(r["val_accuracy"] for r in records if r["stage"] == "global")
    assert saved["target"]["val_accuracy"] == pytest.approx(global_best - 0.005)
    assert saved["strategies"]["global"]["time_to_target"]["stage"] == "global"  # the global CNN reaches its own
    transfer = saved["strategies"]["transfer"]["cost"]
    assert transfer["epochs"] == {"local": 2, "combine": 2, "transfer": 2}
    assert transfer["seconds"] == pytest.approx(saved["strategies"]["transfer"]["train_seconds"])
    assert transfer["train_flops"] == sum(saved["stages"][s]["train_flops"] for s in ("local", "combine", "transfer"))


def test_tensorboard_event_files_are_written_when_tensorboard_is_installed(finished_run):
    pytest.importorskip("tensorboard")
    out, _ = finished_run
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_the_generated_task_is_learnt(tmp_path, tiny_config):
    cfg = tiny_config(overrides=["stages.*.enabled=false", "stages.local.enabled=true", "stages.local.epochs=4",
                                 "stages.local.lr=0.01"])
    results = Experiment(cfg, tmp_path / "run", verbose=False).run()
    assert results["strategies"]["mean_probability"]["test_accuracy"] > 0.6  # 3 classes: chance is 1/3
    assert set(results["strategies"]) == {"mean_probability", "majority_vote"}


def test_a_3d_run_goes_through_every_stage(tmp_path, tiny_config):
    results = Experiment(tiny_config(3), tmp_path / "run3d", verbose=False).run()
    assert set(results["strategies"]) == set(strategy_names())
    assert results["subimage_size"] == [4, 8, 4]
    assert (tmp_path / "run3d" / "plots" / "local_accuracy.png").is_file()


class Crash(Exception):
    pass


def _crash_after(n):
    count = {"records": 0}

    def log(record):
        count["records"] += 1
        if count["records"] == n:
            raise Crash

    return log


# The crash in the second stage (5) runs with the heavy cases: the first (2) keeps the resume path in `make test`.
@pytest.mark.parametrize("crash_at", [2, pytest.param(5, marks=pytest.mark.heavy)])
def test_an_interrupted_run_resumes_to_identical_results(tmp_path, tiny_config, crash_at):
    cfg = tiny_config()
    reference = Experiment(cfg, tmp_path / "ref", verbose=False).run()
    run = Experiment(cfg, tmp_path / "cut", verbose=False)
    real_append = run.run_dir.append_metrics
    crash = _crash_after(crash_at)

    def append(record):
        real_append(record)
        crash(record)

    run.run_dir.append_metrics = append
    with pytest.raises(Crash):
        run.run()
    resumed = Experiment(cfg, tmp_path / "cut", resume=True, verbose=False).run()
    for name in strategy_names():
        assert resumed["strategies"][name]["test_accuracy"] == reference["strategies"][name]["test_accuracy"], name
    assert resumed["local"]["test_accuracy"] == reference["local"]["test_accuracy"]
    for stage in ("global", "local", "transfer"):
        ref_w, _, _ = CheckpointDir(tmp_path / "ref" / "checkpoints").load(stage)
        cut_w, _, _ = CheckpointDir(tmp_path / "cut" / "checkpoints").load(stage)
        for key in ref_w:
            assert torch.equal(ref_w[key], cut_w[key]), (stage, key)


def test_nan_loss_stops_with_the_stage_named_and_resume_with_a_lower_lr_recovers(tmp_path, tiny_config):
    # epoch 1 at lr 0.01, epoch 2 at lr 1e30 (step schedule): the loss explodes in epoch 2
    only_global = ["stages.*.enabled=false", "stages.global.enabled=true", "stages.global.epochs=3",
                   "stages.global.optimizer=sgd", "stages.global.lr=0.01", "stages.global.schedule=step",
                   "stages.global.step_every=1"]
    cfg = tiny_config(overrides=only_global + ["stages.global.step_gamma=1e32"])
    with pytest.raises(TrainingError, match=r"stage 'global', epoch 2, step \d+.*--resume --set stages.global.lr="):
        Experiment(cfg, tmp_path / "run", verbose=False).run()
    assert CheckpointDir(tmp_path / "run" / "checkpoints").state("global")["epoch"] == 1  # the last good one
    fixed = tiny_config(overrides=only_global + ["stages.global.step_gamma=0.5"])
    results = Experiment(fixed, tmp_path / "run", resume=True, verbose=False).run()
    assert results["strategies"]["global"]["test_accuracy"] > 0
    records = list(map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()))
    assert [r["epoch"] for r in records if "event" not in r] == [1, 2, 3]
    assert records[-1]["event"] == "end"  # the end-of-stage record
    # config.yaml now says step_gamma 0.5: metrics.jsonl says from when
    changes = [(r["key"], r["was"], r["now"], r["after_epoch"]) for r in records if r.get("event") not in (None, "end")]
    assert changes == [("stages.global.step_gamma", 1e32, 0.5, 1)]


def test_resume_refuses_a_changed_architecture_and_an_empty_directory(tmp_path, tiny_config, finished_run):
    out, _ = finished_run
    with pytest.raises(CheckpointError, match=r"decomposition.grid was \[2, 2\].*\[4, 4\]"):
        Experiment(tiny_config(overrides=["decomposition.grid=[4, 4]", "model.depth=[1]"]), out, resume=True,
                   verbose=False).run()
    with pytest.raises(CheckpointError, match="no ddcnn run"):
        Experiment(tiny_config(), tmp_path / "nothing", resume=True, verbose=False).run()


def test_an_output_directory_with_other_files_is_refused_unless_forced(tmp_path, tiny_config):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    cfg = tiny_config(overrides=["stages.*.enabled=false", "stages.local.enabled=true", "stages.local.epochs=1"])
    with pytest.raises(ConfigError, match="not a ddcnn run.*--force"):
        Experiment(cfg, out, verbose=False).run()
    Experiment(cfg, out, force=True, verbose=False).run()
    assert (out / "thesis.tex").read_text() == "keep me"
    assert (out / "results.json").is_file()


def test_stages_that_need_the_local_cnns_refuse_to_run_without_them(tiny_config):
    cfg = tiny_config(overrides=["stages.local.enabled=false"])
    with pytest.raises(ConfigError, match="combine.*needs the trained local CNNs"):
        Experiment(cfg, "unused", verbose=False)


def test_asking_for_cuda_without_it_is_a_clear_error(tiny_config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device"):
        Experiment(tiny_config(overrides=["device=cuda"]), "unused", verbose=False)


REAL = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not __import__("os").path.isdir(REAL), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_local_cnns_and_combiners_learn(tmp_path, tiny_config):
    cfg = tiny_config(overrides=[
        "data.name=fashion-mnist", "data.image_size=null", "data.limit_train=3000", "data.limit_test=1000",
        "model.width=8", "model.depth=[1, 1, 1]", "stages.global.enabled=false", "stages.coherent.enabled=false",
        "stages.local.epochs=2", "stages.local.lr=0.003", "stages.combine.epochs=5", "combiner.hidden=null",
        "stages.transfer.enabled=false",
    ])
    results = Experiment(cfg, tmp_path / "fm", verbose=False).run()
    assert results["classes"][0] == "T-shirt/top" and results["data_sizes"]["test"] == 1000
    for name in ("cnn_dnn", "mean_probability", "majority_vote"):
        assert results["strategies"][name]["test_accuracy"] > 0.5, name  # 10 classes: chance is 0.1


# A whole run on an odd-sized training set: seconds on 2 cores, so with the heavy cases.
@pytest.mark.heavy
def test_a_last_batch_of_one_image_is_left_out(tmp_path, tiny_config):
    # 161 training images, batches of 32: 5 full batches and one image, which BatchNorm could not normalise on the
    # 1x1 map of the last stage (grid 8x8 on 16x16 images leaves 2x2 subimages; depth [1, 1] pools them to 1x1).
    cfg = tiny_config(generated_train=161, val_fraction=0.0, overrides=[
        "decomposition.grid=[8, 8]", "stages.*.enabled=false", "stages.local.enabled=true", "stages.local.epochs=1"])
    results = Experiment(cfg, tmp_path / "run", verbose=False).run()
    assert results["data_sizes"]["train"] == 161
    assert len(results["local"]["test_accuracy"]) == 64


ONLY_GLOBAL = ["stages.*.enabled=false", "stages.global.enabled=true", "stages.global.epochs=2"]


def _stopped_after_one_global_epoch(cfg, out) -> None:
    run = Experiment(cfg, out, verbose=False)
    real_append = run.run_dir.append_metrics

    def stop_after_first_epoch(record):
        real_append(record)
        raise Crash

    run.run_dir.append_metrics = stop_after_first_epoch
    with pytest.raises(Crash):
        run.run()


def test_resume_refuses_a_changed_number_of_epochs_or_batch_size(tmp_path, tiny_config):
    _stopped_after_one_global_epoch(tiny_config(overrides=ONLY_GLOBAL), tmp_path / "run")
    for change, fragment in (("stages.global.epochs=1", "epochs = 2"), ("stages.global.batch_size=16",
                                                                         "batch_size = 32"),
                             ("stages.global.optimizer=sgd", "optimizer = adam")):
        with pytest.raises(CheckpointError, match=f"{fragment}.*--set stages.global"):
            Experiment(tiny_config(overrides=ONLY_GLOBAL + [change]), tmp_path / "run", resume=True,
                       verbose=False).run()
    # the data loader's worker count may change: it does not change what is trained
    results = Experiment(tiny_config(overrides=ONLY_GLOBAL + ["data.workers=0"]), tmp_path / "run", resume=True,
                         verbose=False).run()
    assert "global" in results["strategies"]


def test_resume_may_add_epochs_to_an_unfinished_stage_and_records_it(tmp_path, tiny_config):
    """More epochs for a stage cut short: applied, and metrics.jsonl says when config.yaml changed; a changed
    setting that is not a rescue knob (label smoothing), or more epochs once the stage finished, is refused."""
    import yaml

    _stopped_after_one_global_epoch(tiny_config(overrides=ONLY_GLOBAL), tmp_path / "run")
    with pytest.raises(CheckpointError, match="stages.global.label_smoothing was 0.0 when stage 'global' trained 1"):
        Experiment(tiny_config(overrides=ONLY_GLOBAL + ["stages.global.label_smoothing=0.1"]), tmp_path / "run",
                   resume=True, verbose=False).run()
    more = ONLY_GLOBAL + ["stages.global.epochs=3"]
    Experiment(tiny_config(overrides=more), tmp_path / "run", resume=True, verbose=False).run()
    records = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["key"], r["was"], r["now"], r["after_epoch"]) for r in records
            if r.get("event") not in (None, "end")] == [("stages.global.epochs", 2, 3, 1)]
    assert [r["epoch"] for r in records if "event" not in r] == [1, 2, 3]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["stages"]["global"]["epochs"] == 3
    assert CheckpointDir(tmp_path / "run" / "checkpoints").state("global")["epochs"] == 3
    with pytest.raises(CheckpointError, match="epochs = 3 but the config now says 4.*stages.global.epochs=3"):
        Experiment(tiny_config(overrides=ONLY_GLOBAL + ["stages.global.epochs=4"]), tmp_path / "run", resume=True,
                   verbose=False).run()


def test_grad_clip_applies_to_the_global_stage(tmp_path, tiny_config):
    from ddcnn.build import Models, Shapes

    base = ["stages.*.enabled=false", "stages.global.enabled=true", "stages.global.epochs=1",
            "stages.global.optimizer=sgd", "stages.global.momentum=0", "stages.global.lr=0.1"]
    cfg = tiny_config(overrides=base + ["stages.global.grad_clip=1e-9"])
    Experiment(cfg, tmp_path / "clipped", verbose=False).run()
    Experiment(tiny_config(overrides=base), tmp_path / "control", verbose=False).run()
    initial = Models(cfg, Shapes(1, 3, (16, 16))).global_cnn().state_dict()
    clipped, _, _ = CheckpointDir(tmp_path / "clipped" / "checkpoints").load("global")
    control, _, _ = CheckpointDir(tmp_path / "control" / "checkpoints").load("global")
    learnt = [key for key in initial if "running" not in key and "num_batches" not in key]
    # Without the clip the same steps move the weights; with it (5 steps of at most lr * 1e-9) they stay.
    assert any((control[key] - initial[key]).abs().max() > 1e-4 for key in learnt)
    for key in learnt:
        torch.testing.assert_close(clipped[key], initial[key], rtol=0, atol=1e-8, msg=key)


@pytest.mark.heavy  # torch.compile's first compile takes most of it
def test_compiled_stages_train_the_same_weights_as_eager_ones(tmp_path, tiny_config):
    """``compile: true`` (torch.compile of the global CNN, the local ensemble and the CNN-DNN) computes what the
    eager modules compute; the checkpoints hold the plain modules' keys."""
    stages = ["stages.coherent.enabled=false"]
    eager = Experiment(tiny_config(overrides=stages), tmp_path / "eager", verbose=False).run()
    compiled = Experiment(tiny_config(overrides=[*stages, "compile=true"]), tmp_path / "compiled", verbose=False).run()
    for stage in ("global", "local", "transfer"):
        want, _, _ = CheckpointDir(tmp_path / "eager" / "checkpoints").load(stage)
        got, _, _ = CheckpointDir(tmp_path / "compiled" / "checkpoints").load(stage)
        assert got.keys() == want.keys()
        for key in want:  # inductor may sum in another order
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=f"{stage} {key}")
    one_image = 1 / compiled["data_sizes"]["test"]  # a rounding difference may flip a prediction near a tie
    for name in ("global", "mean_probability", "transfer"):
        assert compiled["strategies"][name]["test_accuracy"] == pytest.approx(
            eager["strategies"][name]["test_accuracy"], abs=one_image + 1e-9), name


def test_a_resumed_stage_takes_the_configs_weight_decay_not_the_checkpoints(tmp_path, tiny_config):
    _stopped_after_one_global_epoch(tiny_config(overrides=ONLY_GLOBAL), tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name, decay in (("a", "0.0"), ("b", "0.5")):
        Experiment(tiny_config(overrides=ONLY_GLOBAL + [f"stages.global.weight_decay={decay}"]), tmp_path / name,
                   resume=True, verbose=False).run()
    a, b = (CheckpointDir(tmp_path / name / "checkpoints").load("global")[0] for name in ("a", "b"))
    conv = next(k for k in a if k.endswith("weight") and a[k].dim() == 4)
    assert b[conv].norm() < a[conv].norm()  # the second epoch decayed the weights of the run resumed with 0.5


def test_weights_made_non_finite_by_the_last_step_are_never_checkpointed(tmp_path):
    from ddcnn.config import StageConfig
    from ddcnn.train.engine.loop import StageSpec, fit
    from ddcnn.train.runtime import Runtime

    class OneBatch:
        def set_epoch(self, epoch):
            pass

        def __len__(self):
            return 1

        def __iter__(self):
            yield torch.ones(1, 1), torch.zeros(1, dtype=torch.long)

    model = torch.nn.Linear(1, 1, bias=False)

    def loss_fn(x, y):  # finite (about 1e30), but one SGD step at lr 1e10 takes the weight past float32's range
        return (model(x) * 1e30).sum(), torch.zeros(())

    cfg = StageConfig(epochs=2, batch_size=1, optimizer="sgd", momentum=0.0, lr=1e10, schedule="constant")
    ckpt = CheckpointDir(tmp_path)
    with pytest.raises(TrainingError, match="the weights became NaN or infinite in stage 'x', epoch 1"):
        fit(StageSpec("x", cfg, ckpt, Runtime(torch.device("cpu")), 0, lambda r: None, verbose=False), model,
            loss_fn, OneBatch(), dict)
    assert not ckpt.has("x")


def test_resuming_a_finished_run_repeats_no_work_and_reports_the_same_times(tmp_path, tiny_config, monkeypatch):
    from ddcnn.train import stages

    cfg = tiny_config(overrides=["stages.global.enabled=false", "stages.coherent.enabled=false"])
    first = Experiment(cfg, tmp_path / "run", verbose=False).run()
    passes, real = [], stages.frozen_local_logits

    def counted(ctx, local, images):
        passes.append(len(images))
        return real(ctx, local, images)

    monkeypatch.setattr(stages, "frozen_local_logits", counted)
    second = Experiment(cfg, tmp_path / "run", resume=True, verbose=False).run()
    # the finished combine stage did not recompute its features (the evaluation scores through its own path)
    assert passes == []
    for name in ("cnn_dnn", "transfer"):
        assert second["strategies"][name]["train_seconds"] == first["strategies"][name]["train_seconds"], name
        assert second["strategies"][name]["test_accuracy"] == first["strategies"][name]["test_accuracy"], name


def test_keep_best_hands_the_best_local_cnns_to_the_next_stage(tmp_path, tiny_config):
    """Only epoch 1 of the local stage counts as an improvement (min_delta out of reach): the stage stops after
    ``patience`` epochs and hands on epoch 1's local CNNs, so the combine stage trains and validates exactly as
    after a local stage of one epoch."""
    only = ["stages.global.enabled=false", "stages.coherent.enabled=false", "stages.transfer.enabled=false",
            "stages.local.schedule=constant"]
    stopping = ["stages.local.epochs=4", "stages.local.patience=2", "stages.local.monitor=val_loss",
                "stages.local.min_delta=100"]
    best = Experiment(tiny_config(overrides=only + stopping), tmp_path / "best", verbose=False).run()
    one = Experiment(tiny_config(overrides=only + ["stages.local.epochs=1"]), tmp_path / "one", verbose=False).run()
    assert (best["stages"]["local"]["epochs_run"], best["stages"]["local"]["kept_epoch"]) == (3, 1)
    assert best["stages"]["local"]["stop_reason"] == "patience" and best["stages"]["local"]["cap"] == 4
    records = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("best", "one")]
    combine = [[(r["epoch"], r["val_loss"], r["val_accuracy"]) for r in rs if r.get("stage") == "combine"
                and "epoch" in r] for rs in records]
    assert combine[0] == combine[1] and len(combine[0]) == 2
    for name in ("mean_probability", "majority_vote", "cnn_dnn"):
        assert best["strategies"][name]["val_accuracy"] == one["strategies"][name]["val_accuracy"], name
    # the rules' validation accuracy at the kept epoch is what the evaluation finds for the handed-on CNNs
    local = [r for r in records[0] if r.get("stage") == "local" and "epoch" in r]
    assert best["strategies"]["mean_probability"]["val_accuracy"] == local[0]["val_accuracy_mean_probability"]
    # but the cost counts every epoch the local stage ran
    assert best["strategies"]["cnn_dnn"]["cost"]["epochs"] == {"local": 3, "combine": 2}


def test_every_stages_last_record_gives_the_time_of_results_json(finished_run):
    """The console line, the learning-curve titles (both from metrics.jsonl) and the report's table (from
    stage_seconds) give one time per stage; the combine stage's includes its pass over the training set."""
    out, results = finished_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = {r["stage"]: r["seconds"] for r in records if "epoch" in r}  # the epochs' records, not the stage's end
    assert last == pytest.approx(results["stage_seconds"], rel=1e-12)
    state = CheckpointDir(out / "checkpoints").state("combine")
    assert state["feature_seconds"] > 0 and last["combine"] == state["seconds"] + state["feature_seconds"]


def test_a_finished_run_keeps_the_last_epochs_weights_of_each_stage_and_no_optimizer_state(finished_run):
    out, _ = finished_run
    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    stages = ("global", "local", "combine", "coherent", "transfer")
    assert files == sorted([f"{s}.json" for s in stages] + ["global-e2.weights.safetensors",
                           "local-e2.weights.safetensors", "combine-e2.weights.safetensors",
                           "coherent-e1.weights.safetensors", "transfer-e2.weights.safetensors"])


def test_the_device_name_counts_threads_in_good_grammar(monkeypatch):
    from ddcnn.train.runtime import device_name

    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert device_name(torch.device("cpu")).endswith("CPU, 1 thread")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert device_name(torch.device("cpu")).endswith("CPU, 2 threads")


def test_a_runs_config_records_the_backend_that_ran(finished_run):
    import yaml

    out, _ = finished_run  # the tiny config leaves model.backend at auto: vgg's local CNNs are fused
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["backend"] == "grouped"
