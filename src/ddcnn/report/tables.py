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
}

_COLUMNS = ("strategy", "test accuracy (%)", "train time (s)", "parameters", "forward MFLOPs / image")
_MISSING = "—"


# --------------------------------------------------------------------------------------------------- formatting


def number(value) -> float | None:
    """``value`` as a finite float, or None when it is absent, not a number, NaN or infinite."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _percent(value) -> str:
    value = number(value)
    return _MISSING if value is None else f"{100 * value:.2f}"


def _seconds(value) -> str:
    value = number(value)
    return _MISSING if value is None else f"{value:,.1f}"


def _count(value) -> str:
    value = number(value)
    return _MISSING if value is None else f"{round(value):,}"


def _mflops(value) -> str:
    value = number(value)
    if value is None:
        return _MISSING
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


def _strategy_rows(results: Mapping) -> list[tuple[str, str, str, str, str]]:
    strategies = results.get("strategies") or {}
    rows = []
    for name in ordered(strategies, tuple(STRATEGIES)):
        entry = strategies[name] or {}
        rows.append(
            (
                strategy_label(name),
                _percent(entry.get("test_accuracy")),
                _seconds(entry.get("train_seconds")),
                _count(entry.get("parameters")),
                _mflops(entry.get("flops_per_image")),
            )
        )
    return rows


def md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


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
    return "×".join(str(v) for v in values) if values is not None else _MISSING


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
