"""The report's metrics beyond accuracy: per strategy balanced accuracy, macro precision, recall, F1 and ROC AUC on
the test set, per class for the best strategy, and every strategy's confusion matrix (``test_metrics`` of
results.json, :mod:`ddcnn.metrics`)."""

from __future__ import annotations

from collections.abc import Mapping

from ddcnn.report.tables import format_percent, md_cell, ordered, strategy_label
from ddcnn.strategies import STRATEGIES

COLUMNS = (("balanced_accuracy", "balanced accuracy (%)"), ("macro_precision", "macro precision (%)"),
           ("macro_recall", "macro recall (%)"), ("macro_f1", "macro F1 (%)"), ("roc_auc", "ROC AUC (%)"))


def metrics_section(results: Mapping, best: str | None) -> list[str]:
    """Markdown lines; none when the run predates these metrics."""
    strategies: dict[str, Mapping] = {}
    for name, entry in (results.get("strategies") or {}).items():
        if isinstance((entry or {}).get("test_metrics"), Mapping):
            strategies[name] = entry["test_metrics"]
    if not strategies:
        return []
    lines = ["", "## Metrics beyond accuracy (test set)", "",
             "Macro: every class counts once. ROC AUC: one-vs-rest, the mean of the classes' areas; majority vote "
             "gives votes, not probabilities, so it has none. Computed by scikit-learn.", "",
             "| strategy | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|:---|" + "---:|" * len(COLUMNS)]
    for name in ordered(strategies, tuple(STRATEGIES)):
        values = [format_percent(strategies[name].get(key)) for key, _ in COLUMNS]
        lines.append(f"| {md_cell(strategy_label(name))} | " + " | ".join(values) + " |")
    per_class = (strategies.get(best) or {}).get("per_class") if best else None
    if best and per_class:
        lines += ["", f"Per class, {md_cell(strategy_label(best))}:", "",
                  "| class | precision (%) | recall (%) | F1 (%) | ROC AUC (%) | test images |",
                  "|:---|---:|---:|---:|---:|---:|"]
        for cls, m in per_class.items():
            lines.append(f"| {md_cell(cls)} | {format_percent(m.get('precision'))} | {format_percent(m.get('recall'))} "
                         f"| {format_percent(m.get('f1'))} | {format_percent(m.get('roc_auc'))} | {m.get('support')} |")
    classes = list(results.get("classes") or [])
    lines += ["", "Confusion matrices (rows: true class, columns: predicted class):"]
    for name in ordered(strategies, tuple(STRATEGIES)):
        matrix = strategies[name].get("confusion_matrix") or []
        names = classes if len(classes) == len(matrix) else [str(i) for i in range(len(matrix))]
        lines += ["", f"{md_cell(strategy_label(name))}:", "",
                  "| true \\ predicted | " + " | ".join(md_cell(c) for c in names) + " |",
                  "|:---|" + "---:|" * len(names)]
        lines += [f"| {md_cell(c)} | " + " | ".join(str(v) for v in row) + " |" for c, row in zip(names, matrix)]
    return lines
