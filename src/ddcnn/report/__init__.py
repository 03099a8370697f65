"""Tables, plots and a Markdown report of a training run.

Inputs are the plain data the training code writes: ``results`` (``results.json``) and ``metrics`` (the records of
``metrics.jsonl``, one per epoch per stage). Every plotting function takes the path of the PNG to write, creates its
folder and returns the path. Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (no pyplot, no
global backend state), so this module is safe to use from threads, notebooks and headless machines.
"""

from ddcnn.report.markdown import write_report
from ddcnn.report.plots import (
    plot_confusion_matrix,
    plot_decomposition,
    plot_learning_curves,
    plot_subdomain_heatmap,
)
from ddcnn.report.tables import (
    STAGE_LABELS,
    format_table,
    results_table,
)

__all__ = [
    "STAGE_LABELS",
    "plot_confusion_matrix",
    "plot_decomposition",
    "plot_learning_curves",
    "plot_subdomain_heatmap",
    "format_table",
    "results_table",
    "write_report",
]
