"""Results tables: Markdown for the report, aligned text for the terminal."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ddcnn.strategies import STRATEGIES

STAGE_LABELS = {
    "global": "global CNN",
    "local": "local CNNs",
    "combine": "DNN (combine)",
    "coherent": "coherent CNN-DNN",
    "transfer": "transfer CNN-DNN",
    "global_transfer": "global CNN from sub-networks",
}

_COLUMNS = ("strategy", "val accuracy (%)", "test accuracy (%)", "train time (s)", "parameters",
            "forward MFLOPs / image")
MISSING = "—"


# --------------------------------------------------------------------------------------------------- formatting


def finite_number(value) -> float | None:
    """``value`` as a finite float, or None when it is absent, not a number, NaN or infinite."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def format_percent(value) -> str:
    value = finite_number(value)
    return MISSING if value is None else f"{100 * value:.2f}"


def format_seconds(value) -> str:
    value = finite_number(value)
    return MISSING if value is None else f"{value:,.1f}"


def format_count(value) -> str:
    value = finite_number(value)
    return MISSING if value is None else f"{round(value):,}"


def _mflops(value) -> str:
    value = finite_number(value)
    if value is None:
        return MISSING
    mflops = value / 1e6
    # Two decimals for ordinary networks; three significant digits for the tiny ones (e.g. a DNN alone).
    return f"{mflops:,.2f}" if mflops >= 0.1 or mflops == 0 else f"{mflops:.3g}"


def strategy_label(name: str) -> str:
    return STRATEGIES[name].label if name in STRATEGIES else str(name)


def stage_label(name: str) -> str:
    return STAGE_LABELS.get(name, str(name))


def ordered(names, order: Sequence[str]) -> list[str]:
    """``names`` in the fixed ``order``, followed by any unknown names in the order they came."""
    names = list(dict.fromkeys(names))
    return [n for n in order if n in names] + [n for n in names if n not in order]


def _strategy_rows(results: Mapping) -> list[tuple[str, ...]]:
    strategies = results.get("strategies") or {}
    rows: list[tuple[str, ...]] = []
    for name in ordered(strategies, tuple(STRATEGIES)):
        entry = strategies[name] or {}
        rows.append(
            (
                strategy_label(name),
                format_percent(entry.get("val_accuracy")),
                format_percent(entry.get("test_accuracy")),
                format_seconds(entry.get("train_seconds")),
                format_count(entry.get("parameters")),
                _mflops(entry.get("flops_per_image")),
            )
        )
    return rows


def md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table: the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|:---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def md_code(text) -> str:
    """``text`` as an inline Markdown code span, whatever backticks it holds."""
    text = str(text).replace("\n", " ")
    runs, current = [], 0
    for ch in text:
        current = current + 1 if ch == "`" else 0
        runs.append(current)
    longest = max(runs, default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def dims_text(values) -> str:
    return "×".join(str(v) for v in values) if values is not None else MISSING


def results_table(results: Mapping) -> str:
    """The results as a Markdown table, one row per strategy that ran.

    Rows come in the order of :data:`~ddcnn.strategies.STRATEGIES` (strategies not in
    ``results["strategies"]`` are skipped, unknown ones follow at the end); a missing number shows as "—".
    """
    lines = [
        "| " + " | ".join(_COLUMNS) + " |",
        "|:---|" + "---:|" * (len(_COLUMNS) - 1),
    ]
    for row in _strategy_rows(results):
        lines.append("| " + " | ".join(md_cell(cell) for cell in row) + " |")
    return "\n".join(lines)


def format_table(results: Mapping) -> str:
    """The results as a plain text table with aligned columns, for the terminal (same rows as :func:`results_table`)."""
    rows = [_COLUMNS, *_strategy_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]

    def fmt(row):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(row) for row in rows[1:]]
    return "\n".join(lines)


def _flops(value) -> str:
    number = finite_number(value)
    return MISSING if number is None else f"{number:.3g}"


def time_to_accuracy_table(results: Mapping) -> str:
    """Per strategy: its validation accuracy, its whole training cost (every stage it depends on) and the cost at
    which its validation accuracy first reached the target, as Markdown ("not reached" when it never did)."""
    lines = ["| strategy | val accuracy (%) | epochs per stage | cost: s | critical path: s | FLOPs | "
             "to target: s | critical path: s | FLOPs |", "|:---|---:|:---|---:|---:|---:|---:|---:|---:|"]
    strategies = results.get("strategies") or {}
    for name in ordered(strategies, tuple(STRATEGIES)):
        entry = strategies[name] or {}
        cost = entry.get("cost") or {}
        epochs = ", ".join(f"{stage} {n}" for stage, n in (cost.get("epochs") or {}).items()) or MISSING
        reached = entry.get("time_to_target")
        to_target = [format_seconds(reached["seconds"]), format_seconds(reached["critical_path_seconds"]),
                     _flops(reached["train_flops"])] if reached else ["not reached", "", ""]
        lines.append("| " + " | ".join(md_cell(c) for c in [
            strategy_label(name), format_percent(entry.get("val_accuracy")), epochs,
            format_seconds(cost.get("seconds")),
            format_seconds(cost.get("critical_path_seconds")), _flops(cost.get("train_flops")), *to_target]) + " |")
    return "\n".join(lines)
