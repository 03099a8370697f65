"""ddcnn.fit in processes of its own: a script killed with SIGKILL and run again with ``resume=True`` ends exactly
where an uninterrupted one ends (the harness of ``benchmarks/kill_resume.py``, as for ``ddcnn run --resume``), and
a script launched by torchrun trains with 2 processes."""

import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A user's script: its own Dataset (ddcnn's generated images, as a plain class) and a random per-sample flip.
SCRIPT = '''
import json, sys
import torch
import ddcnn
from ddcnn.data.generated import make_generated


class Generated(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        data = make_generated(n, [16, 16], 3, 1, seed=seed, noise=1.5)
        self.images, self.labels = data.images, data.labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def flip(image):
    return image.flip(-1) if torch.rand(()) < 0.5 else image


config, out, extra = json.loads(open(sys.argv[1]).read()), sys.argv[3], sys.argv[4:]
ddcnn.fit(Generated(480, 0), Generated(96, 1), transform=flip, config=config, out=out, verbose=False,
          resume="--resume" in extra, force="--force" in extra)
'''


def _load_harness():
    path = ROOT / "benchmarks" / "kill_resume.py"
    spec = importlib.util.spec_from_file_location("ddcnn_bench_kill_resume_python", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _script(tmp_path: Path, config: dict) -> tuple[Path, Path]:
    script, config_path = tmp_path / "train.py", tmp_path / "config.json"
    script.write_text(SCRIPT)
    config_path.write_text(json.dumps(config))
    return script, config_path


@pytest.mark.slow
@pytest.mark.heavy  # two kills and resumes of a whole run: make test-heavy
def test_a_python_run_killed_twice_resumes_to_identical_results(tmp_path, monkeypatch):
    """As tests/test_kill_resume.py for `ddcnn run`: kill 1 at a checkpoint write, kill 2 at a random time, then
    resume to the end; the same test accuracies, weights (SHA-256), epochs and checkpoint files as the
    uninterrupted script. DDCNN_KILL_SEED fixes the draws."""
    h = _load_harness()
    script, config = _script(tmp_path, h.CONFIG)
    monkeypatch.setattr(h, "command", lambda cfg, out, *extra: [sys.executable, str(script), str(cfg), "--out",
                                                                 str(out), *extra])
    seed = int(os.environ.get("DDCNN_KILL_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    start = time.perf_counter()
    reference = subprocess.Popen(h.command(config, tmp_path / "reference"), env=h.ENV, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    out = tmp_path / "killed"
    attempts = [h.run_once(config, out, "fresh", (h.CHECKPOINT, rng.random()))]
    _, reference_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_err
    seconds = time.perf_counter() - start
    if attempts[0].killed_at is not None:
        attempts += h.run_with_kills(config, out, [round(rng.uniform(0.5, seconds), 2)], h.next_mode(out))
    log = f"seed {seed}, uninterrupted run {seconds:.1f} s\n" + "\n".join(a.describe() for a in attempts)
    print(log)
    assert attempts[-1].returncode == 0, log + "\n" + attempts[-1].stderr
    assert attempts[0].killed_at is not None, "the kill at a checkpoint write did not happen:\n" + log
    assert not h.differences(h.outcome(tmp_path / "reference"), h.outcome(out)), log
    assert json.loads((out / "results.json").read_text())["data_source"]["source"] == "python"


@pytest.mark.slow
@pytest.mark.heavy  # torchrun with 2 processes: make test-heavy
def test_a_script_launched_by_torchrun_trains_with_two_processes(tmp_path):
    from conftest import tiny_dict

    config = tiny_dict(2)
    config["data"] = {"val_fraction": 0.2, "workers": 1}
    script, config_path = _script(tmp_path, config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    outs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        done = subprocess.run([*launcher, str(script), str(config_path), "--out", str(out)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        outs[processes] = json.loads((out / "results.json").read_text())
    assert outs[2]["processes"] == 2 and outs[1]["processes"] == 1
    assert outs[2]["data_source"]["fingerprints"] == outs[1]["data_source"]["fingerprints"]
    # The local CNNs and the model-parallel CNN-DNNs are those of one process to float32 rounding (the global CNN
    # is data-parallel: BatchNorm sees half batches); at most one of the 64 test images may flip.
    for name in ("mean_probability", "majority_vote", "cnn_dnn", "coherent", "transfer"):
        assert outs[2]["strategies"][name]["test_accuracy"] == \
            pytest.approx(outs[1]["strategies"][name]["test_accuracy"], abs=1 / 64 + 1e-9), name
