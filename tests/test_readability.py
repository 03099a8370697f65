"""What a run says: the end-of-stage line, the kept epoch on the learning curves, an untinted colour picture,
`show` for a backbone that takes no width, and `ddcnn --version` without importing torch."""

import subprocess
import sys

import torch
import yaml

from conftest import tiny_dict
from ddcnn.cli import main
from ddcnn.decomposition import Decomposition
from ddcnn.train.store.metrics import end_line


def test_patience_that_runs_out_at_the_cap_is_no_early_stop():
    record = {"stage": "local", "stop_reason": "patience", "epochs_run": 10, "cap": 10, "kept_epoch": 7,
              "best_epoch": 7, "monitor": "val_accuracy", "best_value": 0.5}
    assert "ran 10 of 10 epochs" in end_line(record) and "early" not in end_line(record)
    assert "stopped early after 6 of 10 epochs" in end_line({**record, "epochs_run": 6})


def test_the_learning_curves_mark_the_kept_epoch():
    from ddcnn.report.plots import learning_curves_figure

    records = [{"stage": "global", "epoch": e, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0,
                "val_accuracy": 0.5, "seconds": e} for e in (1, 2, 3)]
    fig = learning_curves_figure([*records, {"stage": "global", "event": "end", "kept_epoch": 2}])
    marks = [line for ax in fig.axes for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(marks) == 2 and all(list(line.get_xdata()) == [2, 2] for line in marks)
    assert not any(line.get_linestyle() == "--" for ax in learning_curves_figure(records).axes
                   for line in ax.get_lines())


def test_a_colour_picture_is_not_tinted_by_the_subimages(monkeypatch, tmp_path):
    from matplotlib.patches import Rectangle

    from ddcnn.report import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    d = Decomposition((8, 8), (2, 2))
    for channels, tinted in ((3, False), (1, True)):
        plots.plot_decomposition(torch.rand(channels, 8, 8), d, tmp_path / "d.png")
        fills = [p.get_facecolor()[3] for p in figures[-1].axes[0].patches if isinstance(p, Rectangle)]
        assert any(alpha > 0 for alpha in fills) == tinted


NETS = '''
from torch import nn


def nowidth(in_channels, num_classes):
    return nn.Sequential(nn.Conv2d(in_channels, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(3, num_classes))
'''


def test_show_prints_no_width_for_a_backbone_that_takes_none(tmp_path, monkeypatch, capsys):
    (tmp_path / "user_nets_w.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tiny_dict(2)
    data["model"] = {"backbone": "user_nets_w:nowidth", "width": 8}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    assert main(["show", str(tmp_path / "c.yaml")]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["model", "width"]) + 1
    table = [line.rsplit(maxsplit=3) for line in lines[start:start + 4]]  # model, width, parameters, MFLOPs
    assert [row[1] for row in table] == ["—"] * 4 and "takes no width" in printed
    assert "global width" not in printed


def test_version_answers_without_importing_torch():
    code = ("import sys\nfrom ddcnn.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["ddcnn 0.1.0", "False"]
