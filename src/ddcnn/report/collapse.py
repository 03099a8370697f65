"""Strategies that predict one class for almost every test item: their accuracy reflects the class balance.

With a 1:2 split, a model that always says the larger class scores 67 %; a report that ranks strategies on such
numbers picks a "best" that has learnt nothing. :func:`collapse_warnings` finds them from the per-class counts of
test predictions that ``results.json`` records (``strategies.<name>.test_predicted``).
"""

from __future__ import annotations

from collections.abc import Mapping

COLLAPSE = 0.95  # "almost every": the share of test items given one class above which a strategy is flagged


def collapsed(counts) -> tuple[int, float] | None:
    """``(class index, share)`` when one class takes at least :data:`COLLAPSE` of ``counts``, else None."""
    total = sum(int(c) for c in counts)
    if total == 0:
        return None
    top = max(range(len(counts)), key=lambda k: counts[k])
    share = counts[top] / total
    return (top, share) if share >= COLLAPSE else None


def collapse_warnings(results: Mapping) -> list[str]:
    """One sentence per strategy that predicts one class for almost every test item."""
    classes = results.get("classes") or []
    lines = []
    for name, entry in (results.get("strategies") or {}).items():
        found = collapsed((entry or {}).get("test_predicted") or [])
        if found is None:
            continue
        k, share = found
        label = classes[k] if k < len(classes) else str(k)
        lines.append(f"{name} predicts class {label!r} for {100 * share:.0f} % of the test items: its accuracy "
                     f"reflects the class balance, not what it learnt; set data.balance (weights or sampler) and "
                     f"compare the per-class results")
    return lines
