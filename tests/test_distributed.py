"""Several processes: torchrun on the CPU (gloo), 2 processes, free ports only (torchrun --standalone)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import tiny_dict
from ddcnn.errors import ConfigError
from ddcnn.train.dist import DistEnv
from ddcnn.train.protocol import Experiment
from ddcnn.train.store.checkpoint import CheckpointDir

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# Every process of these tests is on this machine: gloo talks over the loopback interface only.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _config(tmp_path, local_epochs=3, train=240, transfer_epochs=2):
    data = tiny_dict(2, generated_train=train, generated_test=200)
    for stage in data["stages"].values():
        stage["lr"] = 0.01
    data["stages"]["local"]["epochs"] = local_epochs
    data["stages"]["transfer"]["epochs"] = transfer_epochs
    path = tmp_path / "dist.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _run(args, out, processes=1, extra=()):
    if processes == 1:
        cmd = [sys.executable, "-m", "ddcnn", *args, "--out", str(out), "--quiet"]
    else:
        cmd = [*TORCHRUN, f"--nproc-per-node={processes}", *extra, "-m", "ddcnn", *args, "--out", str(out),
               "--quiet"]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _weights(out, stage):
    return CheckpointDir(Path(out) / "checkpoints").load(stage)[0]


def _records(out, stage):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
            if r["stage"] == stage and "epoch" in r]


@pytest.mark.parametrize("stages", [[], ["stages.local.enabled=false", "stages.combine.enabled=false",
                                         "stages.transfer.enabled=false"]])
def test_more_processes_than_local_cnns_is_a_clear_error(tiny_config, tmp_path, stages):
    """The local stage, or a model-parallel coherent stage alone, gives every process at least one local CNN."""
    cfg = tiny_config(overrides=["decomposition.grid=[1, 2]", *stages])
    with pytest.raises(ConfigError, match="3 processes but only 2 local CNNs"):
        Experiment(cfg, tmp_path / "r", verbose=False, env=DistEnv(rank=0, world=3)).setup()


def test_evaluating_with_more_processes_than_local_cnns_is_the_same_clear_error(finished_run):
    """Every rank refuses alike, before any process group or shard is made (a grid of 2x2: four local CNNs)."""
    from ddcnn.train.saved import ShardedRun

    for rank in range(5):
        with pytest.raises(ConfigError, match="5 processes but only 4 local CNNs.*--nproc-per-node"):
            ShardedRun(finished_run[0], env=DistEnv(rank=rank, world=5))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    cfg = _config(tmp)
    # The coherent stage data-parallel (DDP), the transfer stage model-parallel (the default).
    data_parallel = ["--set", "stages.coherent.parallel=data"]
    one, two = _run(["run", cfg, *data_parallel], tmp / "one"), _run(["run", cfg, *data_parallel], tmp / "two",
                                                                     processes=2)
    _finish(one), _finish(two)
    return cfg, tmp / "one", tmp / "two"


def test_two_processes_train_the_same_local_cnns_as_one(two_runs):
    """The grouped backend on 2 shards of 2 slots sums in another vectorised order than on 4 slots, so the
    weights agree to float32 rounding (bit-identical with the loop backend: see the next test)."""
    _, one, two = two_runs
    for stage in ("local", "combine"):  # sharded, then trained once and broadcast
        a, b = _weights(one, stage), _weights(two, stage)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=f"{stage} {key}")
    for r1, r2 in zip(_records(one, "local"), _records(two, "local"), strict=True):
        assert r1["epoch"] == r2["epoch"]
        assert r1["train_loss"] == pytest.approx(r2["train_loss"], rel=1e-5)
        assert r1["val_accuracy_per_subdomain"] == pytest.approx(r2["val_accuracy_per_subdomain"], abs=1e-9)
    r1, r2 = (json.loads((p / "results.json").read_text()) for p in (one, two))
    one_image = 1 / r1["data_sizes"]["test"]
    for name in ("cnn_dnn", "mean_probability", "majority_vote"):
        assert r1["strategies"][name]["test_accuracy"] == pytest.approx(r2["strategies"][name]["test_accuracy"],
                                                                       abs=one_image + 1e-9)
    assert r2["local"]["processes"] == 2


@pytest.mark.parametrize("backend", ["loop", "grouped", "vmap"])
def test_shards_trained_apart_equal_the_whole_ensemble(backend):
    """What each process does in the local stage, in one process: shards {0, 1} and {2, 3} of a 4-CNN ensemble
    trained on the same batches, gathered with cat_states, equal the 4-CNN ensemble trained at once."""
    from ddcnn import LocalEnsemble, local_loss
    from ddcnn.train.dist import cat_states

    def train(indices):
        e = LocalEnsemble(len(indices), 1, 3, width=4, depth=(1, 1), backend=backend, seed=3, indices=indices)
        opt = torch.optim.Adam(e.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            x, y = torch.randn(8, 4, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            local_loss(e(x[:, indices]), y)[0].backward()
            opt.step()
        return e.stacked_state_dict()

    whole = train([0, 1, 2, 3])
    gathered = cat_states([train([0, 1]), train([2, 3])])
    for key, value in whole.items():
        if backend == "loop":
            assert torch.equal(gathered[key], value), key
        else:
            torch.testing.assert_close(gathered[key], value, rtol=1e-5, atol=1e-6)


def test_data_parallel_stages_agree_within_the_batchnorm_tolerance(two_runs):
    """Same global batches, averaged gradients; but BatchNorm normalises each process's half batch (no SyncBN
    on the CPU), so the DDP stages follow a slightly different trajectory. On 200 test images of an easy task
    we allow 10 points."""
    _, one, two = two_runs
    r1, r2 = (json.loads((p / "results.json").read_text()) for p in (one, two))
    assert r2["parallel"] == {"coherent": "data", "transfer": "model"}
    for name in ("global", "coherent"):
        assert abs(r1["strategies"][name]["test_accuracy"] - r2["strategies"][name]["test_accuracy"]) <= 0.10, name


def test_a_model_parallel_grouped_transfer_stage_agrees_to_float32_rounding(two_runs):
    """The grouped backend sums 2-slot shards in another order than 4 slots: the local stage agrees to rounding,
    and the model-parallel transfer stage that starts from it stays within rounding of the 1-process run."""
    _, one, two = two_runs
    a, b = _weights(one, "transfer"), _weights(two, "transfer")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def _ddp_step_worker(rank, world, store_path, result_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ddcnn import GlobalCNN

    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = GlobalCNN(1, 3, width=4, depth=(1, 1)).eval()  # BatchNorm on running statistics: no per-rank stats
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    part = slice(rank * 4, rank * 4 + 4)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x[part]), y[part]).backward()
        opt.step()
    if rank == 0:
        torch.save(model.state_dict(), result_path)
    dist.barrier()
    dist.destroy_process_group()


def test_a_data_parallel_step_equals_the_single_process_step(tmp_path):
    import torch.multiprocessing as mp

    from ddcnn import GlobalCNN

    mp.spawn(_ddp_step_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "w.pt")), nprocs=2)
    torch.manual_seed(0)
    model = GlobalCNN(1, 3, width=4, depth=(1, 1)).eval()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    got = torch.load(tmp_path / "w.pt", weights_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)


def _children(pid):
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return kids


@pytest.mark.heavy  # a torchrun restart after a kill: half a minute on 2 cores (make test-heavy)
def test_a_killed_worker_is_restarted_and_the_run_completes_with_the_same_results(loop_runs, tmp_path):
    """torchrun restarts both workers after one is killed in the middle of the model-parallel transfer stage; they
    resume from the checkpoints (the sharded local stage's too) and end bit-identical to an unbroken run."""
    cfg, _, two = loop_runs
    out = tmp_path / "killed"
    proc = _run(["run", cfg, *MODEL_PARALLEL], out, processes=2, extra=["--max-restarts=2"])
    manifest = out / "checkpoints" / "transfer.json"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            state = json.loads(manifest.read_text())["state"]
            if state["epoch"] >= 1 and not state["done"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    else:
        proc.kill()
        pytest.fail("the transfer stage was never seen between two checkpoints")
    workers = _children(proc.pid)
    assert workers, "no worker processes found"
    os.kill(max(workers), signal.SIGKILL)  # one worker dies mid-stage
    _finish(proc)
    r_ref = json.loads((two / "results.json").read_text())
    r_got = json.loads((out / "results.json").read_text())
    for name, entry in r_ref["strategies"].items():
        assert r_got["strategies"][name]["test_accuracy"] == entry["test_accuracy"], name
    for done_stage in ("local", "coherent", "transfer"):
        a, b = _weights(two, done_stage), _weights(out, done_stage)
        for key in a:
            assert torch.equal(a[key], b[key]), (done_stage, key)


def test_a_batch_size_that_does_not_divide_among_the_processes_is_a_clear_error():
    from ddcnn.data import DeviceBatches, make_generated

    batches = DeviceBatches(make_generated(40, (8, 8), num_classes=2), batch_size=32)
    with pytest.raises(ConfigError, match="batch size 32 does not divide among 3 processes"):
        batches.shard(0, 3)


SHUTDOWN_SCRIPT = """
import os
import torch
from ddcnn.train import dist

dist.init(dist.env_from_environment(), "cpu")
torch.optim.Adam([torch.nn.Parameter(torch.ones(1))])  # the first optimizer imports torch._dynamo
dist.shutdown()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
with open(os.path.join(os.path.dirname(__file__), f"rank{os.environ['RANK']}.txt"), "w") as f:
    f.write(str(sum("gloo" in name for name in names)))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_shutdown_leaves_no_gloo_threads_to_race_the_interpreter_exit(tmp_path):
    """A process group that outlives shutdown (kept by a module imported after it was made) leaves gloo's worker
    threads running into the interpreter's finalisation, where they can abort the process at exit."""
    script = tmp_path / "shutdown.py"
    script.write_text(SHUTDOWN_SCRIPT)
    proc = subprocess.run([*TORCHRUN, "--nproc-per-node=2", str(script)], env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["0", "0"]  # gloo threads left


# ----------------------------------------------------------------------------------- model-parallel CNN-DNN stages
MODEL_PARALLEL = ["--set", "stages.global.enabled=false", "--set", "model.backend=loop"]
# Early stopping in the sharded local stage and the model-parallel transfer stage: only the first epoch improves
# (min_delta is out of reach), so local stops at epoch 2 of 2 and transfer at epoch 3 of 4, both keeping epoch 1.
EARLY_STOPPING = [a for stage, patience in (("local", 1), ("transfer", 2)) for a in (
    "--set", f"stages.{stage}.patience={patience}", "--set", f"stages.{stage}.monitor=val_loss",
    "--set", f"stages.{stage}.min_delta=10")]
MODEL_PARALLEL += EARLY_STOPPING


@pytest.fixture(scope="module")
def loop_runs(tmp_path_factory):
    """The loop backend without the (data-parallel) global stage: 1 and 2 processes, model-parallel coherent and
    transfer stages by default."""
    tmp = tmp_path_factory.mktemp("model-parallel")
    cfg = _config(tmp, local_epochs=2, transfer_epochs=4)  # 3 checkpoints mid-transfer to kill a worker at
    one = _run(["run", cfg, *MODEL_PARALLEL], tmp / "one")
    two = _run(["run", cfg, *MODEL_PARALLEL], tmp / "two", processes=2)
    _finish(one), _finish(two)
    return cfg, tmp / "one", tmp / "two"


def test_model_parallel_coherent_and_transfer_equal_one_process_bit_for_bit(loop_runs):
    """Each process holds 2 of the 4 local CNNs and sees whole batches: with the loop backend every stage, the
    checkpoints included (so resuming with another number of processes works), equals the 1-process run."""
    _, one, two = loop_runs
    for stage in ("local", "combine", "coherent", "transfer"):
        a, b = _weights(one, stage), _weights(two, stage)
        assert a.keys() == b.keys(), stage
        for key in a:
            assert torch.equal(a[key], b[key]), f"{stage} {key}"
    for stage in ("coherent", "transfer"):
        assert [r["train_loss"] for r in _records(one, stage)] == [r["train_loss"] for r in _records(two, stage)]
    r1, r2 = (json.loads((p / "results.json").read_text()) for p in (one, two))
    for name, entry in r1["strategies"].items():
        assert entry["test_accuracy"] == r2["strategies"][name]["test_accuracy"], name
        assert entry["parameters"] == r2["strategies"][name]["parameters"], name
        assert entry["flops_per_image"] == r2["strategies"][name]["flops_per_image"], name
    assert r2["processes"] == 2 and r2["parallel"] == {"coherent": "model", "transfer": "model"}
    assert r1["parallel"] == {"coherent": "single", "transfer": "single"}
    # every process stopped on the same epoch as one process, and kept the same (best) epoch
    assert r1["stages"]["local"]["stop_reason"] == r2["stages"]["local"]["stop_reason"] == "patience"
    for stage, stopped in (("local", 2), ("transfer", 3)):
        for r in (r1, r2):
            assert (r["stages"][stage]["epochs_run"], r["stages"][stage]["kept_epoch"]) == (stopped, 1), stage


# Two torchrun launches on a finished run: with the heavy cases (the 2-process training cases stay in make test).
@pytest.mark.heavy
def test_evaluate_and_predict_with_two_processes_equal_one(loop_runs, tmp_path, capsys):
    """Under torchrun each process loads its shard of the local CNNs and of the CNN-DNNs; the evaluation and the
    predictions (the local CNNs' votes included) equal those of one process."""
    from ddcnn.cli import main

    _, one, _ = loop_runs
    evaluation = Path(one) / "evaluation.json"
    picture = tmp_path / "picture.npy"
    np.save(picture, np.random.default_rng(0).random((1, 16, 16)).astype(np.float32))
    predict = ["predict", str(one), str(picture), "--strategy", "transfer"]
    assert main(["evaluate", str(one)]) == 0 and main(predict) == 0  # one process
    alone = json.loads(evaluation.read_text())["strategies"], capsys.readouterr().out.split("written: ")[1]
    evaluation.unlink()
    for args in (["evaluate", str(one)], predict):
        done = subprocess.run([*TORCHRUN, "--nproc-per-node=2", "-m", "ddcnn", *args], env=ENV, capture_output=True,
                              text=True, timeout=240)
        assert done.returncode == 0, done.stdout + done.stderr
    shown = done.stdout
    assert json.loads(evaluation.read_text())["strategies"] == alone[0]
    assert shown == alone[1].split("\n", 1)[1] and "subdomain 3" in shown


@pytest.mark.heavy  # vmap under torchrun: the grouped backend's model-parallel tests stay in make test
def test_the_vmap_backend_trains_model_parallel_like_one_process(tmp_path):
    """Any CNN's batched backend (vmap) under torchrun: the sharded local stage and the model-parallel CNN-DNN
    stages end with the weights of one process, to float32 rounding (vmap batches 2 slots in another order than
    4, as the grouped backend does)."""
    cfg = _config(tmp_path, local_epochs=1, transfer_epochs=1)
    args = ["run", cfg, "--set", "stages.global.enabled=false", "--set", "model.backend=vmap"]
    one, two = _run(args, tmp_path / "one"), _run(args, tmp_path / "two", processes=2)
    _finish(one), _finish(two)
    for stage in ("local", "combine", "coherent", "transfer"):
        a, b = _weights(tmp_path / "one", stage), _weights(tmp_path / "two", stage)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{stage} {key}")
