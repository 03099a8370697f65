"""report/volume_plots.py: 3D figures on three orthogonal slices, every subdomain visible, orientation labelled."""

import torch

from ddcnn.decomposition import Decomposition
from ddcnn.report.volume_plots import (
    axis_ends,
    decomposition_3d_figure,
    plot_decomposition_3d,
    plot_subdomain_heatmap_3d,
    subdomain_heatmap_3d_figure,
)


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_the_axis_ends_follow_the_orientation_codes():
    assert axis_ends("RAS") == [("I", "S"), ("P", "A"), ("L", "R")]
    assert axis_ends("lps") == [("I", "S"), ("A", "P"), ("R", "L")]
    assert axis_ends(None) == [("D-", "D+"), ("H-", "H+"), ("W-", "W+")]


def test_every_subdomain_is_in_every_view_of_the_decomposition_and_the_edges_are_labelled(tmp_path):
    d = Decomposition((8, 12, 16), (2, 3, 2))
    fig = decomposition_3d_figure(torch.rand(1, 8, 12, 16), d, "RAS")
    for ax, edges in zip(fig.axes, ({"L", "R", "P", "A"}, {"L", "R", "I", "S"}, {"P", "A", "I", "S"})):
        texts = _texts(ax)
        shown = sorted(int(i) for t in texts if t[0].isdigit() for i in t.split("/"))
        assert shown == list(range(d.n_subdomains))
        assert edges <= set(texts)
    assert plot_decomposition_3d(torch.rand(8, 12, 16), d, tmp_path / "d.png").stat().st_size > 0


def test_each_view_of_the_heat_map_shows_every_subdomain_once_over_the_anatomy(tmp_path):
    d = Decomposition((8, 12, 16), (2, 3, 2))
    values = torch.linspace(0.2, 0.9, d.n_subdomains)
    fig = subdomain_heatmap_3d_figure(values, d, torch.rand(1, 8, 12, 16), "RAS")
    panels = [ax for ax in fig.axes if ax.get_title()]
    for view in ("axial", "coronal", "sagittal"):
        numbers = [t for ax in panels if ax.get_title().startswith(view) for t in _texts(ax) if "." in t]
        assert sorted(numbers) == sorted(f"{100 * v:.1f}" for v in values.tolist())
        assert sum(len(ax.images) == 2 for ax in panels if ax.get_title().startswith(view)) == d.grid[
            {"axial": 0, "coronal": 1, "sagittal": 2}[view]]  # anatomy and the painted values in each panel
    assert plot_subdomain_heatmap_3d(values, d, tmp_path / "h.png").stat().st_size > 0
